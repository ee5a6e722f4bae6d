"""Shapes-VQA: answers recomputed from the scene metadata, determinism, split disjointness, the chat
tokenizer's coverage, chance levels and the question file."""
import collections
import hashlib
import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from tokenflow_jax.data import conversation as conv
from tokenflow_jax.data import text
from tokenflow_jax.shapes import scenes as shapes
from tokenflow_jax.shapes import vqa as shapes_vqa

SIZE = 48


def _recompute(question: str, objects: list[dict]) -> str:
    """The answer from the question text and the metadata alone (no shapes_vqa code)."""
    if m := re.fullmatch(r"How many (\w+ )?(\w+) are there\?", question):
        adjective, noun = (m.group(1) or "").strip(), m.group(2)
        if noun == "objects":
            return str(sum(not adjective or o["colour"] == adjective for o in objects))
        return str(sum(o["shape"] + "s" == noun for o in objects))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (obj,) = [o for o in objects if o["shape"] == m.group(1)]  # unique, or the unpacking fails
        return obj["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj,) = [o for o in objects if o["colour"] == m.group(1)]
        return obj["shape"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in objects if (o["colour"], o["shape"]) == m.groups()]
        row, col = obj["cell"]
        return f"{('top', 'middle', 'bottom')[row]} {('left', 'centre', 'right')[col]}"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["colour"], o["shape"]) == m.groups() for o in objects) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_match_the_scene():
    source = shapes_vqa.ShapesVqaSource(600, seed=3, image_size=SIZE)
    categories = collections.Counter()
    for i in range(len(source)):
        record = source[i]
        question, answer = record["question"], record["answer"]
        assert record["conversations"] == [{"from": "human", "value": f"<image>\n{question}"},
                                           {"from": "gpt", "value": answer}]
        assert _recompute(question, record["objects"]) == answer, (i, question)
        assert record["category"] == shapes_vqa.CATEGORIES[i % 5]
        categories[record["category"]] += 1
        # The image shows the metadata: each object's palette colour at its box centre.
        for obj in record["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            centre = record["image"][(y0 + y1) // 2, (x0 + x1) // 2]
            np.testing.assert_array_equal(centre, shapes.COLOURS[obj["colour"]])
    assert set(categories.values()) == {120}
    caption = shapes_vqa.ShapesVqaSource(5, 0, SIZE, kinds=("caption",))[2]
    scene = [shapes.ShapeObject(o["shape"], o["colour"], *o["cell"], 0, 0, 0) for o in caption["objects"]]
    assert caption["answer"] == shapes.caption(scene) and caption["question"] == shapes_vqa.CAPTION_PROMPT


def _digest(record) -> str:
    return hashlib.sha1(record["image"].tobytes() + record["question"].encode()).hexdigest()


def test_deterministic_and_disjoint_splits():
    a = shapes_vqa.ShapesVqaSource(100, seed=0, image_size=SIZE)
    b = pickle.loads(pickle.dumps(shapes_vqa.ShapesVqaSource(100, seed=0, image_size=SIZE)))
    for i in (0, 17, 99):
        assert _digest(a[i]) == _digest(b[i]) and a[i]["answer"] == b[i]["answer"]
    train = {_digest(a[i]) for i in range(100)}
    evaluation = shapes_vqa.ShapesVqaSource(100, seed=0, image_size=SIZE, split="eval")
    other_seed = shapes_vqa.ShapesVqaSource(100, seed=1, image_size=SIZE)
    assert not train & {_digest(evaluation[i]) for i in range(100)}
    assert not train & {_digest(other_seed[i]) for i in range(100)}
    images = {a[i]["image"].tobytes() for i in range(100)}
    assert not images & {evaluation[i]["image"].tobytes() for i in range(100)}
    with pytest.raises(IndexError):
        a[100]
    with pytest.raises(ValueError, match="kinds"):
        shapes_vqa.ShapesVqaSource(10, 0, SIZE, kinds=("colours",))


def test_chat_tokenizer_covers_every_record():
    tok = text.load_text_tokenizer("builtin:shapes_chat")
    assert tok.eos_token == "</s>" and tok.unk_token_id is not None
    for special in ("</s>", "<|im_start|>", "<|im_end|>", "\n"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    every = shapes_vqa.ShapesVqaSource(300, seed=5, image_size=16, kinds=shapes_vqa.KINDS)
    for i in range(len(every)):
        record = every[i]
        plain = ("plain",) if record["category"] == "caption" else ()  # plain trains captions only
        for template in ("vicuna_v1", "qwen_2_5", "tokenizer") + plain:
            enc = conv.encode_conversation(record["conversations"], tok, template, num_image_tokens=2, max_length=512)
            assert tok.unk_token_id not in enc.input_ids.tolist(), (template, record["conversations"])
    ids = tok(shapes_vqa.all_questions() + [shapes.caption(shapes.sample_scene(shapes.scene_rng(i, 0)))
                                            for i in range(500)])["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)


def test_chance_and_answer_sets():
    expected = {
        "count": {"0", "1", "2", "3", "4"},
        "colour": set(shapes.COLOURS),
        "shape": set(shapes.SHAPES),
        "position": {f"{r} {c}" for r in shapes.ROW_NAMES for c in shapes.COL_NAMES},
        "exists": {"yes", "no"},
    }
    for category, answers in expected.items():
        freq = shapes_vqa.answer_frequencies(category, draws=3000)
        assert set(freq) == answers, category
        assert abs(sum(freq.values()) - 1) < 1e-9
        # Balanced by construction: the most frequent answer is near uniform.
        assert 1 / len(answers) <= max(freq.values()) < 1 / len(answers) + 0.04, (category, freq)
    assert 0.49 < shapes_vqa.chance("exists") < 0.51


@pytest.mark.parametrize("given, normal", [
    ("Two.", "2"), ("2", "2"), (" YES! ", "yes"), ("the Top  Left", "top left"), ("middle center", "middle centre"),
    ("A red circle", "red circle"), ("four", "4"), ("Color", "colour"),
])
def test_normalize_answer(given, normal):
    assert shapes_vqa.normalize_answer(given) == normal


def test_question_file(tmp_path):
    path = shapes_vqa.write_question_file(str(tmp_path), num_per_category=3, seed=0, image_size=SIZE)
    lines = [json.loads(line) for line in open(path)]
    assert len(lines) == 15 and [r["category"] for r in lines] == [c for c in shapes_vqa.CATEGORIES for _ in range(3)]
    for line in lines:
        image = np.asarray(Image.open(tmp_path / line["image"]))
        assert image.shape == (SIZE, SIZE, 3)
        assert line["conversations"][0]["value"] == "<image>\n" + line["question"]
        assert line["conversations"][1]["value"] == line["answer"]
    in_memory = shapes_vqa.eval_questions(3, seed=0, image_size=SIZE)
    for line, record in zip(lines, in_memory, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / line["image"])), record["image"])
        assert (line["id"], line["question"], line["answer"]) == (record["id"], record["question"], record["answer"])
    first = shapes_vqa.ShapesVqaSource(3, 0, SIZE, kinds=("count",), split="eval")[0]
    assert in_memory[0]["id"] == first["id"] and in_memory[0]["answer"] == first["answer"]
