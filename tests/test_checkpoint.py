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
