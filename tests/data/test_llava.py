"""LLaVA JSONL input: bad records skipped and counted, image pre-processing, resume, process slicing."""
import collections
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from tests.data.helpers import png_bytes
from tokenflow_jax.data import conversation as conv
from tokenflow_jax.data import llava, replacement, text
from tokenflow_jax.shapes import vqa as shapes_vqa

SIZE, TOKENS, MAX_LEN = 16, 4, 64
IMG_WIDE = np.random.default_rng(0).integers(0, 255, (10, 24, 3), dtype=np.uint8)  # H=10, W=24
IMG_TALL = np.random.default_rng(1).integers(0, 255, (30, 12, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tok():
    return text.load_text_tokenizer("builtin:shapes_chat")


def _turns(*texts):
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


# index -> (line, expected skip reason or None)
def _records():
    q, a = "<image>\nHow many circles are there?", "2"
    long_turns = _turns(q, a, *["What colour is the square?", "red"] * 10)
    return [
        (dict(id="wide", image="wide.png", conversations=_turns(q, a)), None),
        (dict(id="missing", image="nowhere.png", conversations=_turns(q, a)), "image_missing"),
        (dict(id="tall", image="sub/tall.png", conversations=_turns(q, a, "Is there a red circle?", "yes")), None),
        (dict(id="broken", image="broken.png", conversations=_turns(q, a)), "image_corrupt"),
        (dict(id="noplace", image="wide.png", conversations=_turns("How many circles are there?", a)),
         "no_image_placeholder"),
        (dict(id="empty", image="wide.png", conversations=_turns(q, "")), "empty_reply"),
        (dict(id="textonly", conversations=_turns("Is there a red circle?", "no"), image="None"), None),
        (dict(id="long", image="sub/tall.png", conversations=long_turns), None),
        ("{not json", "bad_record"),
        (dict(id="square", image="square.png", conversations=_turns(q, "3")), None),
    ]


@pytest.fixture
def jsonl(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(IMG_WIDE).save(root / "wide.png")
    Image.fromarray(IMG_TALL).save(root / "sub" / "tall.png")
    Image.fromarray(IMG_WIDE[:, :10]).save(root / "square.png")
    good = png_bytes(Image.fromarray(IMG_WIDE))
    (root / "broken.png").write_bytes(good[: len(good) // 2])
    lines = [r if isinstance(r, str) else json.dumps(r) for r, _ in _records()]
    lines.insert(3, "")  # blank lines are not records
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    return str(path), str(root)


def _dataset(source, tok, **kwargs):
    args = dict(tokenizer=tok, template="qwen_2_5", num_image_tokens=TOKENS, max_length=MAX_LEN, image_size=SIZE,
                aspect="pad", global_batch_size=10, seed=0, shuffle=False, num_epochs=1, num_threads=2)
    return llava.build_vlm_dataset(source, **{**args, **kwargs})


def _expected_pixels(array: np.ndarray, aspect: str) -> np.ndarray:
    """LLaVA's expand2square + the SigLIP processor, written out with PIL directly."""
    img = Image.fromarray(array)
    w, h = img.size
    if aspect == "pad" and w != h:
        canvas = Image.new("RGB", (max(w, h),) * 2, (127, 127, 127))
        canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        img = canvas
    out = np.asarray(img.resize((SIZE, SIZE), Image.BICUBIC)).astype(np.float32)
    return (out / 255.0 - 0.5) / 0.5


def test_bad_records_are_replaced_and_counted(jsonl, tok):
    path, root = jsonl
    source = llava.LlavaJsonlSource(path, image_root=root)
    assert len(source) == 10
    (batch,) = list(_dataset(source, tok))
    # Each bad record is replaced by the first good one of its probes (the next record, then pseudo-random ones:
    # data/replacement.py); its reason rides on the replacement.
    good = {i for i, (_, reason) in enumerate(_records()) if reason is None}
    expected_index = [i if i in good else next(j for j in replacement.probe_indices(i, 10, 40) if j in good)
                      for i in range(10)]
    assert batch["index"].tolist() == expected_index
    assert expected_index[:3] == [0, 2, 2] and expected_index[8:] == [9, 9]  # the successor, when it is good
    assert batch["skip_reason"].tolist() == ["", "image_missing", "", "image_corrupt", "no_image_placeholder",
                                             "empty_reply", "", "", "bad_record", ""]
    assert batch["skipped/image_missing"].tolist() == [0, 1] + [0] * 8  # per-element fields the batch sums
    stats = llava.vlm_stats(batch)
    expected = collections.Counter(reason for _, reason in _records() if reason)
    for reason in llava.SKIP_REASONS:
        assert stats[f"data/skipped/{reason}"] == expected[reason], reason
    assert stats["data/skipped"] == 5 and stats["data/valid"] == 10
    assert stats["data/truncated"] == expected_index.count(7)  # the over-long record, wherever it stands in
    assert stats["data/has_image"] == sum(i != 6 for i in expected_index)  # 6: the text-only record
    assert stats["data/tokens"] == int(batch["length"].sum())
    assert batch["truncated"].tolist() == [i == 7 for i in batch["index"]]
    assert batch["input_ids"].shape == batch["labels"].shape == (10, MAX_LEN)
    assert batch["image"].shape == (10, SIZE, SIZE, 3) and batch["image"].dtype == np.float32

    # Row 0 in full: the image as LLaVA pre-processes it, the ids as encode_conversation gives them.
    np.testing.assert_allclose(batch["image"][0], _expected_pixels(IMG_WIDE, "pad"), atol=1e-6)
    np.testing.assert_allclose(batch["image"][0, 0, 0], 127 / 127.5 - 1, atol=1e-6)  # padded band (rows 0..6 of 24)
    np.testing.assert_allclose(batch["image"][1], _expected_pixels(IMG_TALL, "pad"), atol=1e-6)
    enc = conv.encode_conversation(_records()[0][0]["conversations"], tok, "qwen_2_5", num_image_tokens=TOKENS,
                                   max_length=MAX_LEN)
    n = len(enc.input_ids)
    assert batch["length"][0] == n and batch["has_image"][0]
    np.testing.assert_array_equal(batch["input_ids"][0, :n], enc.input_ids)
    np.testing.assert_array_equal(batch["labels"][0, :n], enc.labels)
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all() and (batch["labels"][0, n:] == conv.IGNORE_INDEX).all()
    # The text-only record: zero image, no image tokens, trained reply.
    row = batch["index"].tolist().index(6)
    assert not batch["has_image"][row] and not batch["image"][row].any()
    assert not (batch["input_ids"][row] == conv.IMAGE_TOKEN_INDEX).any()
    # qwen_2_5 trains the reply with its header and every <|im_start|> / <|im_end|> / lone "\n" (the reference).
    assert tok.decode(batch["labels"][row][batch["labels"][row] >= 0]) == (
        "<|im_start|> \n <|im_end|> \n <|im_start|> \n <|im_end|> \n <|im_start|> assistant \n no <|im_end|> \n")
    # The over-long one is cut at max_length but keeps its image and some replies.
    row = batch["index"].tolist().index(7)
    assert batch["length"][row] == MAX_LEN and (batch["input_ids"][row] == conv.IMAGE_TOKEN_INDEX).sum() == TOKENS


def test_eval_mode_keeps_bad_records_as_invalid(jsonl, tok):
    path, root = jsonl
    (batch,) = list(_dataset(llava.LlavaJsonlSource(path, root), tok, replace_bad=False))
    bad = [reason is not None for _, reason in _records()]
    assert batch["valid"].tolist() == [not b for b in bad]
    assert batch["index"].tolist() == [i if i != 8 else -1 for i in range(10)]  # the bad line has no record
    assert (batch["labels"][np.array(bad)] == conv.IGNORE_INDEX).all() and (batch["length"][np.array(bad)] == 0).all()
    assert llava.vlm_stats(batch)["data/skipped"] == 5


def test_square_aspect_and_image_errors(tok):
    np.testing.assert_allclose(llava.preprocess_image(Image.fromarray(IMG_TALL), SIZE, "square"),
                               _expected_pixels(IMG_TALL, "square"), atol=1e-6)
    np.testing.assert_array_equal(llava.preprocess_image(IMG_TALL, SIZE, "pad"),  # uint8 arrays too
                                  llava.preprocess_image(Image.fromarray(IMG_TALL), SIZE, "pad"))
    with pytest.raises(ValueError, match="aspect"):
        llava.preprocess_image(Image.fromarray(IMG_TALL), SIZE, "crop")
    with pytest.raises(ValueError, match="max_length"):
        llava.VlmExampleEncoder(tok, "qwen_2_5", num_image_tokens=40, max_length=44, image_size=SIZE)
    with pytest.raises(ValueError, match="chat_template"):
        no_template = text.load_text_tokenizer("builtin:shapes")
        llava.VlmExampleEncoder(no_template, "tokenizer", num_image_tokens=4, max_length=64, image_size=SIZE)


def test_json_list_and_question_file(tmp_path, tok):
    qfile = shapes_vqa.write_question_file(str(tmp_path / "q"), num_per_category=2, seed=0, image_size=SIZE)
    source = llava.LlavaJsonlSource(qfile)  # images resolve next to the file
    assert len(source) == 10 and source[0]["image"] == str(tmp_path / "q" / "images" / "count_00000.png")
    records = [json.loads(line) for line in open(qfile)]
    (tmp_path / "list.json").write_text(json.dumps(records))
    as_list = llava.LlavaJsonlSource(str(tmp_path / "list.json"), image_root=str(tmp_path / "q"))
    assert [as_list[i] for i in range(10)] == [source[i] for i in range(10)]
    copied = pickle.loads(pickle.dumps(source))  # what grain worker processes get
    assert [copied[i] for i in range(10)] == [source[i] for i in range(10)]
    (batch,) = list(_dataset(as_list, tok))
    assert batch["valid"].all() and llava.vlm_stats(batch)["data/skipped"] == 0
    vqa = shapes_vqa.ShapesVqaSource(2, 0, SIZE, kinds=("count",), split="eval")
    np.testing.assert_allclose(batch["image"][0], _expected_pixels(vqa[0]["image"], "pad"), atol=1e-6)


def test_resume_from_iterator_state(tok):
    source = shapes_vqa.ShapesVqaSource(40, seed=0, image_size=SIZE)
    ds = _dataset(source, tok, global_batch_size=4, shuffle=True, num_epochs=None)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(12)]  # crosses the epoch boundary at batch 10
    again = iter(_dataset(source, tok, global_batch_size=4, shuffle=True, num_epochs=None))
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in ("index", "input_ids", "labels", "image"):
            np.testing.assert_array_equal(got[key], want[key])
    epoch = [b["index"] for b in expected[:7]]  # batches 3..9 = the rest of epoch 0
    assert len(set(np.concatenate(epoch).tolist())) == 28


def test_two_processes_read_disjoint_slices(tok):
    source = shapes_vqa.ShapesVqaSource(11, seed=0, image_size=SIZE)
    seen = []
    for process in (0, 1):
        batches = list(_dataset(source, tok, global_batch_size=4, process_index=process, process_count=2,
                                shuffle=True))
        assert len(batches) == 3 and all(b["input_ids"].shape == (2, MAX_LEN) for b in batches)  # same count
        rows = np.concatenate([b["index"][b["valid"]] for b in batches]).tolist()
        assert len(rows) == len(set(rows)) == (6, 5)[process]
        assert all(i % 2 == process for i in rows)
        seen.append(set(rows))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(11))
