"""Damaged checkpoints and failed saves, on real orbax files: a trainer resumes from the newest step that reads
back (warning once, setting the damaged step aside), inference names the damaged step and file, and a save that
cannot be written (a real OS write error: the process's file-size limit) stops with one message, removes its
partial folder and leaves the earlier steps restorable."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax import checkpoint
from tokenflow_jax.errors import UserError


def state(step, size=(4, 3)):
    """(variables, train_state) whose every value says which step wrote it."""
    return ({"params": {"w": jnp.full(size, float(step))}, "quantizer": {"count": jnp.arange(5) * step}},
            {"step": jnp.asarray(step, jnp.int32), "opt_state": {"mu": jnp.ones(size) * step}})


def targets(size=(4, 3)):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state(0, size))


def saved_run(tmp_path, steps=(1, 2, 3)) -> checkpoint.TrainCheckpointer:
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "run"), keep=5)
    for step in steps:
        ckpt.save(step, *state(step), None, {"recipe": "test"}, force=True)
    ckpt.wait()
    return ckpt


def assert_state(restored, step):
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state(step)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def chunk(item):
    """The step's one array data file of ``item`` (tiny arrays: one OCDBT data file holds them all)."""
    return lambda step_dir: sorted((step_dir / item / "d").iterdir())[0]


DAMAGES = {
    "variables data file truncated": (chunk("variables"), truncate, r"Requested byte range .* is not valid"),
    "train_state data file flipped": (chunk("train_state"), flip, r"Error decoding"),
    "variables _METADATA truncated": (lambda d: d / "variables" / "_METADATA", truncate, r"Expecting|Unterminated"),
    "meta truncated": (lambda d: d / "meta" / "metadata", truncate, r"Expecting|Unterminated"),
    "variables _METADATA deleted": (lambda d: d / "variables" / "_METADATA", os.remove, r"missing"),
}


# ------------------------------------------------------------------------------------------ a trainer's resume
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_step_is_warned_about_set_aside_and_the_previous_one_restores(tmp_path, caplog, damage):
    ckpt = saved_run(tmp_path)
    which, how, reason = DAMAGES[damage]
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    damaged_file = which(step_dir)
    how(damaged_file)

    with caplog.at_level(logging.WARNING, logger="tokenflow_jax.checkpoint"):
        step, restored = ckpt.restore_newest(lambda s: ckpt.restore(s, *targets(), None))
    assert step == 2
    assert_state(restored, 2)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tokenflow_jax.checkpoint"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"checkpoint step 3 is damaged: cannot read {damaged_file} (")
    assert re.search(reason, warnings[0]) and "resuming from step 2" in warnings[0]

    # Set aside where orbax does not look, so the resumed run writes step 3 again.
    assert not step_dir.exists() and (tmp_path / "run" / "checkpoints" / "damaged" / "3").is_dir()
    assert ckpt.latest_step() == 2
    ckpt.save(3, *state(3), None, {"recipe": "test"}, force=True)
    ckpt.wait()
    assert_state(ckpt.restore(3, *targets(), None), 3)
    ckpt.close()
    assert checkpoint.read_meta(str(tmp_path / "run" / "checkpoints"))["step"] == 3


def test_with_no_readable_step_the_error_names_each_one_and_nothing_is_moved(tmp_path):
    ckpt = saved_run(tmp_path, steps=(1, 2))
    for step in (1, 2):
        truncate(chunk("variables")(tmp_path / "run" / "checkpoints" / str(step)))
    with pytest.raises(checkpoint.CheckpointDamagedError,
                       match=r"no checkpoint in .*/run/checkpoints reads back: step 2: cannot read .*/2/variables/d/"
                             r".*; step 1: cannot read .*/1/variables/d/") as info:
        ckpt.restore_newest(lambda s: ckpt.restore(s, *targets(), None))
    assert isinstance(info.value, UserError)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
    ckpt.close()


def test_a_step_that_does_not_match_the_run_is_not_damage(tmp_path):
    ckpt = saved_run(tmp_path, steps=(1, 2))
    variables, rest = targets(size=(4, 4))  # another model: a real mistake, not a reason to go back a step
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"step 2, item 'variables', does not match this run:\n  params/w: expected shape \(4, 4"):
        ckpt.restore_newest(lambda s: ckpt.restore(s, variables, rest, None))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
    ckpt.close()


def test_an_empty_workdir_restores_nothing(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "run"))
    assert ckpt.restore_newest(lambda s: pytest.fail("no step to restore")) is None
    ckpt.close()


# -------------------------------------------------------------------------------------------------- inference
def test_inference_names_the_damaged_step_and_file_and_does_not_fall_back(tmp_path):
    saved_run(tmp_path).close()
    directory = str(tmp_path / "run" / "checkpoints")
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    data_file = chunk("variables")(step_dir)
    truncate(data_file)
    with pytest.raises(checkpoint.CheckpointDamagedError) as info:
        checkpoint.restore_variables(directory, targets()[0])
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError)
    assert message.startswith(f"checkpoint {directory} step 3 is damaged: cannot read {data_file} (Requested byte")
    assert message.endswith(f"the older steps there (1, 2) may be intact: move {step_dir} out of {directory} to use "
                            "step 2")
    assert (info.value.step, info.value.file) == (3, str(data_file))
    assert step_dir.is_dir()  # inference moves nothing
    older = checkpoint.restore_variables(directory, targets()[0], step=2)  # what the message offers reads back
    np.testing.assert_array_equal(np.asarray(older["params"]["w"]), np.full((4, 3), 2.0))


def test_a_truncated_metadata_file_is_named(tmp_path):
    saved_run(tmp_path, steps=(1,)).close()
    directory = str(tmp_path / "run" / "checkpoints")
    metadata = tmp_path / "run" / "checkpoints" / "1" / "variables" / "_METADATA"
    truncate(metadata)
    with pytest.raises(checkpoint.CheckpointDamagedError,
                       match=rf"^checkpoint {directory} step 1 is damaged: cannot read {metadata} \((Expecting|"
                             r"Unterminated)[^;]*\)$"):
        checkpoint.restore_variables(directory, targets()[0])
    meta = tmp_path / "run" / "checkpoints" / "1" / "meta" / "metadata"
    truncate(meta)
    with pytest.raises(checkpoint.CheckpointDamagedError, match=rf"step 1 is damaged: cannot read {meta} \("):
        checkpoint.read_meta(directory)


# ------------------------------------------------------------------------------------------------ failed saves
@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG ('File too large'), as a full disk fails them with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel stops the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("use_async", [True, False])
def test_a_save_that_cannot_be_written_stops_with_one_line_and_removes_its_partial_step(tmp_path, caplog, use_async):
    size = (256, 256)
    rng = np.random.default_rng(0)  # incompressible: each array file is ~256 KB
    big = {step: ({"params": {"w": jnp.asarray(rng.normal(size=size), jnp.float32)}},
                  {"step": jnp.asarray(step, jnp.int32)}) for step in (1, 2, 3)}
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "run"), keep=2, use_async=use_async)
    for step in (1, 2):
        ckpt.save(step, *big[step], None, {"recipe": "test"}, force=True)
    ckpt.wait()

    with caplog.at_level(logging.ERROR), file_size_limit(64 * 1024):
        with pytest.raises(checkpoint.CheckpointSaveError) as info:
            ckpt.save(3, *big[3], None, {"recipe": "test"}, force=True)
            for _ in range(400):  # the loop's step boundaries, while the asynchronous save runs
                ckpt.reached_preemption(3)
                time.sleep(0.025)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    directory = str(tmp_path / "run" / "checkpoints")
    assert message.startswith(f"could not save checkpoint step 3 in {directory}: Failed to write ")
    assert re.search(r"File too large \(writing 3\.orbax-checkpoint-tmp/variables\.orbax-checkpoint-tmp/.*\); "
                     r"removed the partial 3\.orbax-checkpoint-tmp; the newest complete step is 2: free space", message)
    # orbax's background threads logged the error with tracebacks; those stay quiet
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []

    assert sorted(os.listdir(directory)) == ["1", "2"]  # keep=2 did not drop step 1 for the failed step
    ckpt.close()  # the failure was reported once; closing does not raise it again
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "run"), keep=2)
    assert ckpt.latest_step() == 2
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), big[2])
    variables, rest = ckpt.restore(2, *target, None)
    np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), np.asarray(big[2][0]["params"]["w"]))
    ckpt.close()


# ------------------------------------------------------------------------------------------- a real trainer
@pytest.mark.slow
def test_a_trainer_whose_newest_checkpoint_is_damaged_resumes_from_the_previous_one_exactly(tmp_path, caplog):
    """The t2i trainer (a small decoder, one device): 4 steps with checkpoints at 2 and 4; step 4's data file is
    truncated; the same command warns, resumes at step 2 and ends with the first run's step-4 parameters and
    losses, bit for bit."""
    from tests.recipes.runs import read_metrics, restored_params
    from tests.recipes.t2i.test_train import small_config
    from tokenflow_jax.recipes.t2i import train as t2i_trainer

    config = small_config("train.num_steps=4", "mesh.shape=(1, 1, 1)", "mesh.num_devices=1")
    workdir = str(tmp_path / "run")
    t2i_trainer.train(config, workdir)
    first, first_rows = restored_params(workdir, 4), read_metrics(workdir)
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    damaged_file = chunk("variables")(step_dir)
    truncate(damaged_file)

    with caplog.at_level(logging.WARNING, logger="tokenflow_jax.checkpoint"):
        t2i_trainer.train(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tokenflow_jax.checkpoint"]
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint step 4 is damaged: cannot read {damaged_file}")
    assert "resuming from step 2" in warnings[0]
    assert (tmp_path / "run" / "checkpoints" / "damaged" / "4").is_dir()
    again = restored_params(workdir, 4)
    assert again.keys() == first.keys()
    for key in first:
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)
    assert [r["loss"] for r in read_metrics(workdir)] == [r["loss"] for r in first_rows]
