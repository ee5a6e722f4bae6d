"""Paths named in data files stay under their root: absolute paths and '..' escapes are refused, counted as
``image_outside_root`` in LLaVA records, and never opened."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tokenflow_jax.data import images, llava, paths, text, token_shards
from tokenflow_jax.errors import DataError
from tokenflow_jax.recipes.vlm import evaluate as vqa_eval

SIZE = 16
INSIDE = (200, 30, 30)
OUTSIDE = (30, 200, 30)  # a colour only the image outside the root has


def test_resolve_under_accepts_relative_paths_and_refuses_escapes(tmp_path):
    root = str(tmp_path / "root")
    assert paths.resolve_under(root, "a/b.png") == os.path.join(root, "a", "b.png")
    assert paths.resolve_under(root, "a/../b.png") == os.path.join(root, "b.png")  # stays inside
    assert paths.resolve_under(root, "./a//b.png") == os.path.join(root, "a", "b.png")
    for escape in ("/etc/passwd", "../outside/x.png", "a/../../x.png", "..", "~/x.png", "", "a/../../../etc/passwd"):
        with pytest.raises(paths.OutsideRootError, match="is outside"):
            paths.resolve_under(root, escape)


@pytest.fixture
def escaping_jsonl(tmp_path):
    """A LLaVA file under ``root`` whose records name one image inside the root and three outside it (two of
    them real, loadable images)."""
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (20, 20), INSIDE).save(root / "img" / "in.png")
    outside = tmp_path / "outside" / "x.png"
    Image.new("RGB", (20, 20), OUTSIDE).save(outside)
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    images_named = ["img/in.png", "../outside/x.png", str(outside), "/etc/passwd", "img/../../outside/x.png"]
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "image": name, "conversations": turns})
                              for i, name in enumerate(images_named)) + "\n")
    return str(path), str(root)


def _dataset(source, tok, **kwargs):
    return llava.build_vlm_dataset(source, tokenizer=tok, template="vicuna_v1", num_image_tokens=4, max_length=64,
                                   image_size=SIZE, aspect="square", global_batch_size=5, seed=0, shuffle=False,
                                   num_epochs=1, num_threads=1, **kwargs)


def test_llava_images_outside_the_root_are_refused_counted_and_never_opened(escaping_jsonl, monkeypatch):
    path, root = escaping_jsonl
    opened = []
    read_image = images.read_image
    monkeypatch.setattr(images, "read_image", lambda source, name=None: (opened.append(source),
                                                                         read_image(source, name))[1])
    tok = text.load_text_tokenizer("builtin:shapes_chat")
    source = llava.LlavaJsonlSource(path, image_root=root)
    with pytest.raises(paths.OutsideRootError):
        source[1]

    (batch,) = list(_dataset(source, tok))  # training: each escape is replaced by the record inside the root
    assert batch["valid"].all() and batch["index"].tolist() == [0] * 5
    stats = llava.vlm_stats(batch)
    assert stats["data/skipped/image_outside_root"] == 4 and stats["data/skipped"] == 4
    assert batch["skip_reason"].tolist() == [""] + ["image_outside_root"] * 4
    inside = (np.array(INSIDE) / 127.5 - 1).astype(np.float32)
    np.testing.assert_allclose(batch["image"][:, SIZE // 2, SIZE // 2], np.tile(inside, (5, 1)), atol=1e-2)

    (kept,) = list(_dataset(source, tok, replace_bad=False))  # evaluation: kept in place as invalid rows
    assert kept["valid"].tolist() == [True, False, False, False, False]
    assert kept["skip_reason"].tolist() == [""] + ["image_outside_root"] * 4
    assert opened and all(os.path.realpath(p).startswith(os.path.realpath(root) + os.sep) for p in opened), opened


def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    (tmp_path / "evil.arrayrecord").write_bytes(b"")
    manifest = {"format": token_shards.FORMAT_VERSION, "complete": True, "num_records": 0,
                "shards": [{"file": "../evil.arrayrecord"}]}
    (folder / token_shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists a shard outside the folder"):
        token_shards.tokenized_source(str(folder))


def test_a_question_file_naming_an_image_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "questions"
    folder.mkdir()
    Image.new("RGB", (SIZE, SIZE), INSIDE).save(folder / "in.png")
    Image.new("RGB", (SIZE, SIZE), OUTSIDE).save(tmp_path / "out.png")
    good = {"image": "in.png", "question": "What colour?", "answer": "red"}
    questions = folder / "q.jsonl"
    questions.write_text(json.dumps(good) + "\n")
    assert vqa_eval.file_questions(str(questions))[0]["image"][0, 0].tolist() == list(INSIDE)
    for escape in ("../out.png", str(tmp_path / "out.png")):
        questions.write_text(json.dumps(good) + "\n" + json.dumps({**good, "image": escape}) + "\n")
        with pytest.raises(DataError, match=r"q\.jsonl:2: path .* is outside"):
            vqa_eval.file_questions(str(questions))
