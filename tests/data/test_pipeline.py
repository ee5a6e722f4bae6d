"""make_dataset: exact resume, per-process shards, evaluation padding, global batches."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.data.helpers import CROP
from tokenflow_jax.data import pipeline
from tokenflow_jax.data.sources import ShapesSource

SHAPES = dict(source="shapes", image_size=CROP, num_examples=40, num_threads=2)


def _make(config, train=True, global_batch_size=8, process_index=0, process_count=1, seed=0):
    return pipeline.make_dataset(config, global_batch_size=global_batch_size, process_index=process_index,
                                 process_count=process_count, seed=seed, train=train)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _check_resume(ds, k=3, m=4):
    it = iter(ds)
    for _ in range(k):
        next(it)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # what a checkpoint stores must survive JSON
    expected = [next(it) for _ in range(m)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        _assert_batches_equal(next(resumed), want)
    return expected


def test_resume_is_exact_for_shapes():
    # 40 examples, batch 8: 3 + 4 batches run past the first epoch (new shuffle, new crops).
    batches = _check_resume(_make({**SHAPES, "crop": "adm", "random_flip": True}))
    assert len({b["index"].tobytes() for b in batches}) == len(batches)


def test_resume_is_exact_for_a_folder(broken_folder):
    root, _ = broken_folder
    _check_resume(_make(dict(source="folder", path=root, image_size=CROP, num_threads=2), global_batch_size=4))


def test_resume_is_exact_for_evaluation():
    _check_resume(_make(SHAPES, train=False, global_batch_size=4), k=2, m=3)


def test_same_seed_same_stream_other_seed_other_stream():
    first = lambda seed: next(iter(_make(SHAPES, seed=seed)))
    _assert_batches_equal(first(0), first(0))
    assert not np.array_equal(first(0)["index"], first(1)["index"])


def test_shapes_defaults_keep_captions_true():
    # Shapes are rendered at the crop size: centre crop and no flip leave pixels as rendered.
    source = ShapesSource(40, CROP, seed=0)
    batch = next(iter(_make(SHAPES)))
    for row, index in enumerate(batch["index"]):
        np.testing.assert_allclose((batch["image"][row] + 1) * 127.5, source[int(index)]["image"], atol=1e-3)
        assert batch["caption"][row] == source[int(index)]["caption"]
        assert batch["label"][row] == source[int(index)]["label"]


def test_processes_read_disjoint_shards():
    seen = []
    for process_index in range(2):
        it = iter(_make(SHAPES, process_index=process_index, process_count=2, global_batch_size=8))
        indices = np.concatenate([next(it)["index"] for _ in range(5)])  # 5 x 4 = one epoch of a 20 shard
        assert sorted(indices.tolist()) == list(range(process_index, 40, 2))
        seen.append(set(indices.tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


@pytest.mark.parametrize("num_examples", [37, 40])
def test_evaluation_counts_exactly_n_images(num_examples):
    config = {**SHAPES, "num_examples": num_examples}
    per_process = []
    for process_index in range(2):
        batches = list(_make(config, train=False, process_index=process_index, process_count=2, global_batch_size=8))
        assert len(batches) == pipeline.num_eval_batches(num_examples, 8, 2) == 5  # same on every process
        assert all(b["image"].shape == (4, CROP, CROP, 3) for b in batches)
        valid = np.concatenate([b["valid"] for b in batches])
        index = np.concatenate([b["index"] for b in batches])
        assert not np.concatenate([b["image"] for b in batches])[~valid].any()  # padding is zeros
        assert (index[~valid] == -1).all()
        per_process.append(index[valid].tolist())
    assert sorted(per_process[0] + per_process[1]) == list(range(num_examples))


def test_evaluation_uses_other_scenes_than_training():
    train = next(iter(_make(SHAPES)))
    evaluation = next(iter(_make(SHAPES, train=False)))
    source_train, source_eval = ShapesSource(40, CROP, 0), ShapesSource(40, CROP, 1)
    i = int(evaluation["index"][0])
    assert evaluation["caption"][0] == source_eval[i]["caption"]
    assert train["caption"][0] == source_train[int(train["index"][0])]["caption"]


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        _make(SHAPES, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="expected one of"):
        _make({**SHAPES, "source": "laion"})
    with pytest.raises(ValueError, match="needs config.data.path"):
        _make(dict(source="folder", image_size=CROP))
    with pytest.raises(ValueError, match="image_size"):
        _make(dict(source="shapes"))
    with pytest.raises(ValueError, match="crop"):
        _make({**SHAPES, "crop": "random"})


def test_config_dict_works():
    import ml_collections

    config = ml_collections.ConfigDict(dict(source="shapes", image_size=CROP, num_examples=16, num_workers=0))
    assert next(iter(_make(config)))["image"].shape == (8, CROP, CROP, 3)


def test_to_global_batch(mesh222):
    batch = next(iter(_make(SHAPES)))
    global_batch = pipeline.to_global_batch(batch, mesh222)
    assert isinstance(global_batch["caption"], np.ndarray)  # strings stay on the host
    for key in ("image", "label", "index", "valid", "skipped", "bad_images", "converted"):
        array = global_batch[key]
        assert isinstance(array, jax.Array) and array.shape == batch[key].shape
        assert array.sharding.spec == P(("data", "fsdp"), *[None] * (batch[key].ndim - 1))
        assert len(array.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(array), batch[key])
    # Batch rows are split over data x fsdp = 4 ways and replicated over tensor.
    assert {s.data.shape[0] for s in global_batch["image"].addressable_shards} == {2}
    stats = pipeline.image_stats(global_batch)
    assert {k: int(v) for k, v in stats.items()} == pipeline.image_stats(batch)
    subset = pipeline.to_global_batch(batch, mesh222, keys=("image", "bad_images", "no_such_field"))
    assert set(subset) == {"image", "bad_images"}
    with pytest.raises(ValueError, match="per-process batch must divide"):
        pipeline.to_global_batch({"image": batch["image"][:6]}, mesh222)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume(broken_folder):
    """Worker processes (spawned: ~3 s to start) deliver the threads-only stream, bad images included."""
    root, _ = broken_folder
    config = dict(source="folder", path=root, image_size=CROP, num_threads=2)
    threads = iter(_make(config, global_batch_size=4))
    expected = [next(threads) for _ in range(6)]
    workers = iter(_make({**config, "num_workers": 2}, global_batch_size=4))
    try:
        for want in expected[:3]:
            _assert_batches_equal(next(workers), want)
        state = workers.get_state()
        resumed = iter(_make({**config, "num_workers": 2}, global_batch_size=4))
        resumed.set_state(state)
        try:
            for want in expected[3:]:
                _assert_batches_equal(next(resumed), want)
        finally:
            resumed.close()
    finally:
        workers.close()
