"""Broken and unusual images: converted when possible, otherwise skipped and counted, never fatal."""
import collections

import numpy as np
import pytest
from PIL import Image

from tests.data.helpers import CROP, png_bytes
from tokenflow_jax.data import decode, images, pipeline
from tokenflow_jax.data.sources import ImageFolderSource
from tokenflow_jax.errors import DataError


def _eval_batches(source, batch=4):
    ds = pipeline.build_dataset(source, image_size=CROP, global_batch_size=batch, train=False, num_threads=2)
    return list(ds)


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_decode_to_rgb_reports_stored_mode(broken_folder):
    root, files = broken_folder
    _, mode = decode.decode_to_rgb(files["i_cmyk.jpg"][0])
    assert mode == "CMYK"
    img, mode = decode.decode_to_rgb(f"{root}/h_gray16.png")
    assert (img.mode, mode) == ("RGB", "I;16")
    img, mode = decode.decode_to_rgb(np.zeros((5, 7), np.uint16))
    assert (img.mode, img.size, mode) == ("RGB", (7, 5), "I;16")
    img, mode = decode.decode_to_rgb(np.frombuffer(files["a_good.png"][0], np.uint8))  # bytes as a uint8 vector
    assert (img.size, mode) == ((48, 40), "RGB")


@pytest.mark.parametrize(
    "image, reason",
    [
        (b"", "empty"),
        (png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "corrupt"),
        (b"plain text", "not_image"),
        ("/nonexistent/x.png", "unreadable"),
        (np.zeros((4, 4, 2), np.uint8), "bad_array"),
        (np.zeros((4, 4, 3), np.float32), "bad_array"),
        (None, "unreadable"),
        (12345, "bad_array"),
    ],
)
def test_skip_reasons(image, reason):
    with pytest.raises((decode.BadRecord, images.ImageReadError)) as info:
        decode.decode_to_rgb(image)
    assert decode.skip_reason(info.value) == reason


def test_eval_counts_every_bad_image_and_converts_the_rest(broken_folder):
    root, files = broken_folder
    source = ImageFolderSource(root)
    assert source.paths == sorted(files)
    batches = _eval_batches(source)
    assert len(batches) == 3 and all(len(b["valid"]) == 4 for b in batches)
    out = _concat(batches)
    n = len(files)
    # 11 images -> 12 elements; the last one is padding.
    assert out["index"].tolist() == list(range(n)) + [-1]
    stats = pipeline.image_stats(out)
    expected_skips = collections.Counter(reason for _, reason, _, _ in files.values() if reason)
    expected_conversions = collections.Counter(conv for _, _, conv, _ in files.values() if conv)
    for reason in decode.SKIP_REASONS:
        assert stats[f"data/skipped/{reason}"] == expected_skips[reason], reason
    for kind in decode.CONVERSIONS:
        assert stats[f"data/converted/{kind}"] == expected_conversions[kind], kind
    assert stats["data/skipped"] == 3 and stats["data/valid"] == n - 3
    np.testing.assert_array_equal(out["bad_images"], out["skipped"].sum(1))

    for i, (name, (_, reason, _, colour)) in enumerate(files.items()):
        image = out["image"][i]
        assert image.shape == (CROP, CROP, 3) and image.dtype == np.float32
        assert bool(out["valid"][i]) == (reason is None), name
        if reason is not None:
            assert not image.any() and out["skipped"][i, decode.SKIP_REASONS.index(reason)] == 1
        if colour is not None:
            np.testing.assert_allclose(images.model_to_uint8(image[CROP // 2, CROP // 2]), colour, atol=1)
    cmyk = images.model_to_uint8(out["image"][sorted(files).index("i_cmyk.jpg")])
    np.testing.assert_allclose(cmyk[CROP // 2, CROP // 2], (255, 0, 0), atol=3)
    palette = images.model_to_uint8(out["image"][sorted(files).index("j_palette.png")])
    np.testing.assert_array_equal(palette[2, CROP // 2], (255, 255, 255))  # transparent -> white
    np.testing.assert_array_equal(palette[-3, CROP // 2], (20, 200, 40))
    assert out["caption"][0] == "a red rectangle" and set(out["caption"][1:]) == {""}


def test_train_replaces_bad_images_without_changing_the_batch(broken_folder):
    root, files = broken_folder
    n = len(files)
    ds = pipeline.build_dataset(ImageFolderSource(root), image_size=CROP, global_batch_size=n, seed=3, num_threads=2)
    it = iter(ds)
    epochs = [next(it) for _ in range(2)]  # batch = shard length: each batch is one epoch, shuffled
    for batch in epochs:
        assert batch["image"].shape == (n, CROP, CROP, 3) and batch["valid"].all()
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        stats = pipeline.image_stats(batch)
        assert stats["data/skipped"] == 3 and batch["bad_images"].sum() == 3
        for reason in ("empty", "corrupt", "not_image"):
            assert stats[f"data/skipped/{reason}"] == 1
        # Each bad file is replaced by its successor (a plain RGB image): that one appears twice.
        counts = collections.Counter(batch["index"].tolist())
        good_after_bad = {2, 4, 6}  # c_good, e_good, g_good
        assert {i for i, c in counts.items() if c == 2} == good_after_bad
        assert set(counts) == set(range(n)) - {1, 3, 5}
        for kind in ("high_bit_depth", "cmyk", "palette", "upscaled"):
            assert stats[f"data/converted/{kind}"] == 1
    assert not np.array_equal(epochs[0]["index"], epochs[1]["index"])  # reshuffled per epoch


def test_all_bad_records_stop_training_before_it_starts(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"")
    # Raised while the pipeline is built (before any model or compile), as one line.
    with pytest.raises(DataError) as info:
        pipeline.build_dataset(ImageFolderSource(str(tmp_path)), image_size=CROP, global_batch_size=2, num_threads=1)
    assert str(info.value).startswith(f"no usable image in {tmp_path}: all 5 images are unusable (empty: 5)")


def test_array_records_decode(rng):
    arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
    record = decode.decode_record({"image": arr, "caption": b"bytes caption", "label": 7, "index": 3}, CROP)
    np.testing.assert_array_equal(np.asarray(record["image"]), arr)
    assert record["caption"] == "bytes caption" and record["label"] == 7 and record["index"] == 3
    assert record["converted"][decode.CONVERSIONS.index("upscaled")] == 1
    rgba = decode.decode_record({"image": png_bytes(Image.new("RGBA", (40, 40), (0, 0, 0, 0)))}, CROP)
    assert rgba["converted"].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert np.asarray(rgba["image"]).min() == 255  # fully transparent -> white
