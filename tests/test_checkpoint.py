"""The training checkpointer on its own: async saves under a relative workdir, keep N, restore into
targets with shardings, the stored tree checked against the target before anything is read."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax import checkpoint


def state(step):
    return ({"params": {"w": jnp.full((4, 3), float(step))}, "quantizer": {"count": jnp.arange(5) * step}},
            {"step": jnp.asarray(step, jnp.int32), "opt_state": {"mu": jnp.ones((4, 3)) * step}})


def test_async_saves_in_a_relative_workdir_keep_n_and_restore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoint.TrainCheckpointer("run", keep=2, use_async=True)
    for step in (1, 2, 3):
        variables, rest = state(step)
        ckpt.save(step, variables, rest, None, {"recipe": "test"}, force=True)
    ckpt.close()
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]

    ckpt = checkpoint.TrainCheckpointer("run", keep=2)
    assert ckpt.latest_step() == 3
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state(0))
    variables, rest = ckpt.restore(3, *targets, None)
    expected_vars, expected_rest = state(3)
    for got, want in zip(jax.tree.leaves((variables, rest)), jax.tree.leaves((expected_vars, expected_rest))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert checkpoint.read_meta(str(tmp_path / "run" / "checkpoints"))["recipe"] == "test"

    wrong = ({"params": {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=sharding)},
              "quantizer": targets[0]["quantizer"]}, targets[1])
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/w: expected shape \(\d+,.*\), found"):
        ckpt.restore(3, *wrong, None)
    ckpt.close()


def test_a_state_saved_on_the_222_mesh_restores_onto_one_device_and_back(tmp_path, mesh222):
    """What a trainer's resume on another mesh shape needs (the end-to-end tokenizer run is in the slow tier):
    arrays saved sharded over (fsdp, tensor) come back whole on one device, and one device's save comes back
    resharded over the 8 devices, values exact."""
    from jax.sharding import NamedSharding, PartitionSpec

    split = NamedSharding(mesh222, PartitionSpec("fsdp", "tensor"))
    values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    variables = {"params": {"w": jax.device_put(values, split)}}
    rest = {"step": jnp.asarray(7, jnp.int32)}
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "a"), keep=1)
    ckpt.save(7, variables, rest, None, {"recipe": "test"}, force=True)
    ckpt.close()

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = lambda sharding: ({"params": {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=sharding)}},  # noqa: E731
                               {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one)})
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "a"), keep=1)
    got, got_rest = ckpt.restore(7, *target(one), None)
    ckpt.close()
    assert got["params"]["w"].sharding == one and int(got_rest["step"]) == 7
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), values)

    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "b"), keep=1)
    ckpt.save(7, got, got_rest, None, {"recipe": "test"}, force=True)
    ckpt.close()
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "b"), keep=1)
    back, _ = ckpt.restore(7, *target(split), None)
    ckpt.close()
    assert back["params"]["w"].sharding == split
    assert back["params"]["w"].addressable_shards[0].data.shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(back["params"]["w"]), values)


def test_a_single_process_save_of_replicated_shards_compiles_nothing(tmp_path, mesh222):
    """orbax's replica-parallel saving slices every replicated shard with one eager XLA program per shape (hundreds
    of compiles for a model's state on 8 devices); in one process there is no other host to share the writing, so
    the checkpointer writes whole shards and compiles nothing. The stored values are exact."""
    from jax import monitoring
    from jax.sharding import NamedSharding, PartitionSpec

    replicated_over_data = NamedSharding(mesh222, PartitionSpec("fsdp"))  # each shard held by 4 devices
    variables = {"params": {f"w{i}": jax.device_put(np.full((4 * (i + 1), 3), float(i), np.float32),
                                                     replicated_over_data) for i in range(3)}}
    compiles = []

    def listener(event, duration, **_):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "a"), keep=1, use_async=False)
        ckpt.save(1, variables, {"step": jnp.asarray(1, jnp.int32)}, None, {"recipe": "test"}, force=True)
        ckpt.close()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    stored, _ = checkpoint.restore_variables_partially(str(tmp_path / "a" / "checkpoints"), variables)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(stored["params"][f"w{i}"]), np.full((4 * (i + 1), 3), float(i)))
