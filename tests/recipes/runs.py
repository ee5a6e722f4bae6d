"""Reading a trainer's workdir in tests: its metrics rows, its stored parameters, and a copy of it as a preempted
run would have left it."""
import json
import os
import shutil

import jax


def read_metrics(workdir):
    """The rows of ``workdir/metrics.jsonl``, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stored_item(workdir, step, item):
    """Item ``item`` ('variables', 'train_state') of ``workdir``'s checkpoint ``step`` as host arrays (no target)."""
    import orbax.checkpoint as ocp

    return jax.device_get(ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), item)))


def restored_params(workdir, step):
    """{'params/a/b': host array} of the model variables checkpoint ``step`` of ``workdir`` holds."""
    from flax import traverse_util

    return traverse_util.flatten_dict(stored_item(workdir, step, "variables"), sep="/")


def preempted_copy(workdir, dest, step):
    """Copies a finished run's ``workdir`` to ``dest`` as if the run had been killed after saving checkpoint
    ``step``: newer checkpoints are gone, while the metrics rows and event files the lost steps wrote stay (the
    resume must drop or overwrite them). Restarting the same command in ``dest`` then redoes the steps after
    ``step``; a trainer that resumes exactly ends with ``workdir``'s final parameters and rows, bit for bit. One
    uninterrupted run serves as both the reference and the preempted run, with the same configuration."""
    shutil.copytree(workdir, dest)
    checkpoints = os.path.join(dest, "checkpoints")
    newer = [name for name in os.listdir(checkpoints) if name.isdigit() and int(name) > step]
    assert os.path.isdir(os.path.join(checkpoints, str(step))) and newer, (step, os.listdir(checkpoints))
    for name in newer:
        shutil.rmtree(os.path.join(checkpoints, name))
    return dest
