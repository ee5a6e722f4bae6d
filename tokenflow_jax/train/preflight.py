"""What ``tokenflow-jax train`` checks after building its config and before a trainer creates anything (workdir,
metrics file, checkpoints) or compiles: the workdir can be a folder, every batch of the config divides over the
processes and over the mesh's data-parallel devices, and a decoder's training rows fit its positions and end its
length buckets. Each problem is a ConfigError naming the field or path. (Every field's range was checked when the
config was built: ``tokenflow_jax/config_rules.py``; these only matter to training.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokenflow_jax import parallel
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.train import loop
from tokenflow_jax.utils import logs

# The global batches a trainer shards over the data axes: one per recipe, two for the unified one.
BATCH_FIELDS = ("global_batch_size", "t2i_batch_size", "vlm_batch_size")


def check(config, workdir: str) -> None:
    """Raises ConfigError when ``workdir`` is a file, a batch cannot be split as the run would split it, or a
    training row does not fit."""
    logs.check_workdir(workdir)
    _check_rows(config)
    mesh = parallel.mesh_from_config(config.mesh)
    processes = jax.process_count()
    for field in BATCH_FIELDS:
        if field not in config.train:
            continue
        name, batch = f"config.train.{field}", int(config.train[field])
        if batch % processes:
            raise ConfigError(f"{name}={batch} must be a multiple of the {processes} processes (each reads an equal "
                              "share)")
        loop.abstract_batch(mesh, (batch,), jnp.float32, field=name)


def _check_rows(config) -> None:
    """Conversation rows (``data.max_length``; the unified recipe's ``data.vlm.max_length``) are padded to the
    last of ``train.length_buckets`` and must fit ``model.llm.max_positions``."""
    data, llm = config.get("data"), config.get("model", {}).get("llm")
    section, name = (data.get("vlm"), "config.data.vlm") if data and "vlm" in data else (data, "config.data")
    if not section or "max_length" not in section:
        return
    max_length = int(section.max_length)
    if llm and max_length > int(llm.max_positions):
        raise ConfigError(f"{name}.max_length={max_length} is longer than config.model.llm.max_positions="
                          f"{llm.max_positions}")
    buckets = tuple(config.train.get("length_buckets", ()) or ())
    if buckets and buckets[-1] != max_length:
        raise ConfigError(f"config.train.length_buckets={buckets} must end at {name}.max_length={max_length} (rows "
                          "are padded to it)")
