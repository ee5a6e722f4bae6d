"""Unusable records in training: streaks of bad files, few or no usable ones, the skip budget, exact resume,
per-reason counts and the fixed preview set."""
import collections
import json

import numpy as np
import pytest
from PIL import Image

from tests.data.helpers import CROP, png_bytes, solid
from tokenflow_jax.data import decode, pipeline, replacement
from tokenflow_jax.errors import ConfigError, DataError


def _good(colour):
    return png_bytes(solid(colour))


def _broken(kind: str, rng) -> bytes:
    """A truncated PNG (-> 'corrupt'), random bytes (-> 'not_image') or a zero-byte file (-> 'empty')."""
    if kind == "corrupt":
        data = png_bytes(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)))
        return data[: len(data) // 2]
    return rng.integers(0, 255, 300, dtype=np.uint8).tobytes() if kind == "not_image" else b""


BROKEN_KINDS = {"corrupt": "corrupt", "not_image": "not_image", "empty": "empty"}


def _folder(tmp_path, num_good: int, bad: dict[str, int]):
    """``num_good`` solid images (a grey level per index) in the root, then a sub-folder ``z_broken`` holding
    ``bad[kind]`` broken files of each kind, which sorts after them: one streak of bad records."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "z_broken").mkdir(parents=True)
    for i in range(num_good):
        (root / f"good_{i:03d}.png").write_bytes(_good((i, i, i)))
    for kind, count in bad.items():
        for i in range(count):
            (root / "z_broken" / f"{kind}_{i:03d}.png").write_bytes(_broken(kind, rng))
    return str(root)


def _dataset(root, batch, **kwargs):
    config = dict(source="folder", path=root, image_size=CROP, num_threads=2, **kwargs)
    return pipeline.make_dataset(config, global_batch_size=batch, process_index=0, process_count=1, seed=0,
                                 train=True)


def test_probe_budget_scales_with_the_batch_and_is_checked():
    assert replacement.probe_budget(4, 8) == 32 and replacement.probe_budget(4, 64) == 256
    assert replacement.probe_budget(0.5, 3) == 2 and replacement.probe_budget(0.01, 2) == 1
    for bad in (0, -1, "4", True, None):
        with pytest.raises(ConfigError, match="config.data.skip_budget"):
            replacement.probe_budget(bad, 8)


def test_probes_start_at_the_successor_then_spread_over_the_shard():
    probes = replacement.probe_indices(100, 1000, 32)
    assert probes == replacement.probe_indices(100, 1000, 32)  # a pure function of the index: resumable
    assert probes[0] == 101 and len(probes) == 32 and len(set(probes)) == 32 and 100 not in probes
    assert max(probes) - min(probes) > 300  # not a run of neighbours a sorted streak of bad files could cover
    assert probes != replacement.probe_indices(101, 1000, 32)
    assert replacement.probe_indices(999, 1000, 3)[0] == 0  # wraps around
    small = replacement.probe_indices(3, 6, 32)  # a shard no larger than the budget: every other record once
    assert small[0] == 4 and sorted(small) == [0, 1, 2, 4, 5]
    assert replacement.probe_indices(0, 1, 8) == []


def test_a_sorted_streak_of_bad_files_does_not_stop_training(tmp_path):
    # 24 good images, then a sub-folder of 40 broken ones: longer than the old limit of 32 consecutive bad records.
    bad = {"corrupt": 20, "not_image": 12, "empty": 8}
    root = _folder(tmp_path, 24, bad)
    n = 24 + 40
    it = iter(_dataset(root, n, skip_budget=1.0))  # a batch is one epoch of the shard
    for _ in range(2):
        batch = next(it)
        assert batch["valid"].all() and (batch["index"] < 24).all()  # every element is a good image
        assert int(batch["bad_images"].sum()) == 40
        counts = collections.Counter()
        pipeline.count_images(counts, batch)
        assert counts["bad_images"] == 40
        for kind, count in bad.items():
            assert counts[f"bad_images/{BROKEN_KINDS[kind]}"] == count, kind
        assert counts["bad_images/unreadable"] == 0 and counts["converted_images/grey"] == 0
        assert set(counts) == ({"bad_images"} | {f"bad_images/{r}" for r in decode.SKIP_REASONS}
                               | {f"converted_images/{c}" for c in decode.CONVERSIONS})


def test_a_few_usable_images_among_many_bad_ones_train(tmp_path):
    # 2 good + 200 bad: the probes (budget 1 x 8) mostly miss, so the images found usable before training stand in.
    root = _folder(tmp_path, 2, {"not_image": 150, "empty": 50})
    it = iter(_dataset(root, 8, skip_budget=1.0))
    indices = np.concatenate([next(it)["index"] for _ in range(6)])
    assert set(indices.tolist()) == {0, 1}


def test_no_usable_image_fails_before_training_with_one_line(tmp_path):
    root = _folder(tmp_path, 0, {"corrupt": 30, "not_image": 150, "empty": 20})
    with pytest.raises(DataError) as info:
        _dataset(root, 8)  # raised while the pipeline is built, before any batch
    message = str(info.value)
    assert message == (f"no usable image in {root}: all 200 images are unusable (not_image: 150, corrupt: 30, "
                       "empty: 20); check config.data.path / config.data.source")
    assert "\n" not in message


def test_a_large_unusable_source_is_judged_on_a_sample(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(300):
        (root / f"{i:03d}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"all 256 images sampled \(of 300\) are unusable \(empty: 256\)"):
        _dataset(str(root), 4)


def test_the_budget_comes_from_the_config(tmp_path):
    root = _folder(tmp_path, 2, {"empty": 3})
    with pytest.raises(ConfigError, match="config.data.skip_budget=0"):
        _dataset(root, 4, skip_budget=0)


def test_resume_is_exact_through_replacements(tmp_path):
    root = _folder(tmp_path, 6, {"not_image": 10, "empty": 4})
    ds = _dataset(root, 4, skip_budget=0.5, crop="adm")
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert sum(int(b["bad_images"].sum()) for b in expected) > 0  # the stretch did replace bad images


def test_preview_images_are_the_first_usable_ones_in_source_order(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    for name, level in (("b", 10), ("c", 20), ("d", 30), ("e", 40)):
        (root / f"{name}.png").write_bytes(_good((level, level, level)))
    config = dict(source="folder", path=str(root), image_size=CROP)
    preview = pipeline.preview_images(config, 3)
    assert preview.shape == (3, CROP, CROP, 3) and preview.dtype == np.float32
    levels = np.round((preview[:, CROP // 2, CROP // 2, 0] + 1) * 127.5).tolist()
    assert levels == [10, 20, 30]  # a.png (empty) left out
    np.testing.assert_array_equal(pipeline.preview_images(config, 3), preview)
    assert pipeline.preview_images(config, 10).shape[0] == 4  # fewer usable images than asked for
