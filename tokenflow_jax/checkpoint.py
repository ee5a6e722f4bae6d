"""Orbax checkpoints: one layout for every recipe and every entry point.

A checkpoint directory is an orbax ``CheckpointManager`` root; each step holds named items:

    variables   model variables {'params': ..., 'quantizer': ...} (what inference needs)
    meta        JSON: recipe, config spec and overrides, step, free-form info
    (trainers add opt_state, data-iterator state and so on as further items)

Inference entry points restore only ``variables`` (and ``meta``), into an abstract target built from
``jax.eval_shape`` of the model with the caller's shardings, so a checkpoint written on one mesh loads
on another. Before restoring anything, the stored tree is compared with the target and every missing,
unexpected or differently shaped entry is reported in one error.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

import flax.linen as nn
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from tokenflow_jax import parallel, prng
from tokenflow_jax.errors import CheckpointError, CheckpointNotFoundError
from tokenflow_jax.utils import trees

logger = logging.getLogger(__name__)


class _SkipUnrequestedItemNotices(logging.Filter):
    """Inference restores only ``variables``/``meta`` from training checkpoints on purpose; orbax warns
    once per other item (optimizer state, data iterator) on every read, which buries the real output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was found in the checkpoint, but could not be restored" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkipUnrequestedItemNotices())

VARIABLES = "variables"
META = "meta"


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's stored tree does not match the model it is restored into."""


def item_handlers() -> dict[str, Any]:
    """Handlers for the items every checkpoint has; a manager needs them to read metadata."""
    return {VARIABLES: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}


def _manager(directory: str, create: bool = False, **options: Any) -> ocp.CheckpointManager:
    directory = os.path.abspath(os.path.expanduser(directory)) if "://" not in directory else directory
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=create, **options), item_handlers=item_handlers()
    )


def latest_step(directory: str) -> int | None:
    """The newest complete step in ``directory``, or None when there is none (or no directory)."""
    if "://" not in directory and not os.path.isdir(directory):
        return None
    return _manager(directory).latest_step()


def save_variables(directory: str, variables: Any, meta: dict[str, Any], step: int = 0) -> str:
    """Writes ``variables`` and ``meta`` as step ``step`` (synchronously). Returns the step path."""
    manager = _manager(directory, create=True, enable_async_checkpointing=False)
    manager.save(step, args=ocp.args.Composite(
        **{VARIABLES: ocp.args.StandardSave(variables), META: ocp.args.JsonSave(dict(meta, step=step))}
    ))
    manager.wait_until_finished()
    manager.close()
    return os.path.join(str(manager.directory), str(step))


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` item of ``step`` (default: latest)."""
    step = _require_step(directory, step)
    manager = _manager(directory)
    return dict(manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])


def _require_step(directory: str, step: int | None) -> int:
    if step is None:
        step = latest_step(directory)
    if step is None:
        raise CheckpointNotFoundError(f"no checkpoint found in {directory!r} (expected an orbax checkpoint directory)")
    return step


def tree_differences(stored: Any, target: Any) -> list[str]:
    """``'path: what'`` for every leaf the checkpoint (``stored``) lacks, has in excess or holds in another shape
    than the model (``target``)."""
    return [f"{path}: {what}" for path, what in trees.shape_differences(stored, target)]


def restore_variables(directory: str, target: Any, step: int | None = None) -> Any:
    """Restores the ``variables`` item into ``target``.

    Args:
      directory: checkpoint root.
      target: tree of ``jax.ShapeDtypeStruct`` with shardings (from ``jax.eval_shape`` of the model's
        init plus the caller's shardings); arrays come back with those shardings and dtypes.
      step: default latest.
    Raises:
      CheckpointNotFoundError (a FileNotFoundError): no checkpoint in ``directory``.
      CheckpointMismatchError: the stored tree differs from ``target`` (every difference listed).
    """
    step = _require_step(directory, step)
    manager = _manager(directory)
    stored = manager.item_metadata(step)[VARIABLES]
    stored_tree = getattr(stored, "tree", stored)
    problems = tree_differences(stored_tree, target)
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointMismatchError(
            f"checkpoint {directory!r} step {step} does not match the model built from the config:\n  {shown}"
        )
    restored = manager.restore(step, args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardRestore(target)}))
    return restored[VARIABLES]


def abstract_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``abstract`` carrying ``shardings`` (a tree of the same structure): restore targets,
    and the abstract inputs of ahead-of-time compiles."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, np.dtype(a.dtype), sharding=s), abstract, shardings)


def model_target(model: Any, init_args: tuple, mesh: Any = None, rules: Any = parallel.DEFAULT_RULES) -> Any:
    """ShapeDtypeStructs of ``model``'s variables (unboxed), each carrying where it lives: sharded over ``mesh``
    by the logical-axis ``rules``, or on the first local device when ``mesh`` is None. Nothing is allocated:
    the target of a restore, or the abstract input of an ahead-of-time compile.

    init_args: ``model.init``'s inputs after the key (arrays or ShapeDtypeStructs).
    """
    key = prng.make_key(0)  # outside the mesh: compile-only devices cannot hold it
    if mesh is None:
        abstract = parallel.unbox_without_constraints(jax.eval_shape(model.init, key, *init_args))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return abstract_target(abstract, jax.tree.map(lambda _: device, abstract))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(model.init, key, *init_args)
        shardings = parallel.shardings_from_abstract(boxed, mesh, rules)
    return abstract_target(parallel.unbox_without_constraints(boxed), shardings)


def restore_model(model: Any, init_args: tuple, directory: str, *, mesh: Any = None,
                  rules: Any = parallel.DEFAULT_RULES, collections: tuple[str, ...] | None = None,
                  step: int | None = None) -> Any:
    """The ``variables`` of ``model`` from the checkpoint in ``directory``, placed as :func:`model_target` says.

    collections: restore only these (e.g. ``('params',)``: a decoder's inference needs no optimizer state and no
    other collection); default all of the model's. Mismatches are listed key by key before anything is read.
    """
    target = model_target(model, init_args, mesh, rules)
    if collections is not None:
        target = {name: target[name] for name in collections}
    return restore_variables(directory, target, step)


# --------------------------------------------------------------------------------------------- training
TRAIN_STATE = "train_state"
DATA = "data"


def data_item(stream: str) -> str:
    """The checkpoint item of a named input stream's position."""
    return f"{DATA}_{stream}"


class TrainCheckpointer:
    """Async checkpoints of a training run under ``workdir/checkpoints``, keeping the latest ``keep``.

    Items per step: ``variables`` (what inference loads), ``train_state`` (optimizer state,
    discriminator, EMA, step: everything else that must survive a restart), ``data`` (the grain
    iterator's position, one JSON file per process) and ``meta``. Restores go into abstract targets
    carrying the *current* run's shardings, so a run can resume on a different mesh.

    A run that reads several input streams names them (``data_streams``, e.g. ``('t2i', 'vlm')``) and passes
    ``{name: iterator}`` where one iterator is otherwise passed; each position is its own item ``data_<name>``.
    """

    def __init__(self, workdir: str, keep: int = 3, use_async: bool = True, save_interval_steps: int = 1,
                 data_streams: tuple[str, ...] = ()):
        self.data_items = {name: data_item(name) for name in data_streams}
        handlers = {**item_handlers(), TRAIN_STATE: ocp.StandardCheckpointHandler(),
                    DATA: grain.checkpoint.CheckpointHandler(),
                    **{item: grain.checkpoint.CheckpointHandler() for item in self.data_items.values()}}
        # orbax's async writers need an absolute path (a relative one fails at the first async save).
        self.directory = (os.path.join(os.path.abspath(workdir), "checkpoints") if "://" not in workdir
                          else workdir + "/checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=use_async, create=True,
                save_interval_steps=save_interval_steps,
            ),
            item_handlers=handlers,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, variables: Any, train_state: Any, data_iterator: Any, meta: dict[str, Any],
             force: bool = False) -> bool:
        """Starts saving ``step`` (returns at once when async). True if a save was started."""

        items = {
            VARIABLES: ocp.args.StandardSave(variables),
            TRAIN_STATE: ocp.args.StandardSave(train_state),
            META: ocp.args.JsonSave(dict(meta, step=step)),
        }
        for item, iterator in self._data(data_iterator).items():
            items[item] = grain.checkpoint.CheckpointSave(iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _data(self, data_iterator: Any) -> dict[str, Any]:
        """{item name: iterator} of one iterator (item ``data``), of ``{stream: iterator}`` (items ``data_<stream>``)
        or of None (nothing); a stream's None is left out (its position is not restored)."""
        if data_iterator is None:
            return {}
        if not isinstance(data_iterator, dict):
            return {DATA: data_iterator}
        return {self.data_items[name]: it for name, it in data_iterator.items() if it is not None}

    def restore(self, step: int, variables_target: Any, train_state_target: Any, data_iterator: Any) -> tuple[Any, Any]:
        """Restores ``step`` into the targets; the data iterator is positioned in place."""

        stored = self.manager.item_metadata(step)
        for name, target in ((VARIABLES, variables_target), (TRAIN_STATE, train_state_target)):
            problems = tree_differences(getattr(stored[name], "tree", stored[name]), target)
            if problems:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory} step {step}, item {name!r}, does not match this run:\n  "
                    + "\n  ".join(problems[:50])
                )
        items = {VARIABLES: ocp.args.StandardRestore(variables_target),
                 TRAIN_STATE: ocp.args.StandardRestore(train_state_target)}
        for item, iterator in self._data(data_iterator).items():
            items[item] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[VARIABLES], restored[TRAIN_STATE]

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (TPU maintenance events via JAX's service)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_variables_partially(directory: str, target: Any, skip: tuple[str, ...] = (),
                                step: int | None = None) -> tuple[Any, list[str]]:
    """Restores every entry of ``target`` that the checkpoint holds with the same shape, except paths
    matching a ``skip`` regex (e.g. ``('^params/pixel_decoder/',)`` to rebuild the decoder in stage 2).

    Returns (restored subset as a nested dict, sorted paths of ``target`` that were NOT restored and
    must come from a fresh init). Paths are '/'-joined keys.
    """

    step = _require_step(directory, step)
    stored = trees.flat_shapes(getattr(_manager(directory).item_metadata(step)[VARIABLES], "tree", None) or {})
    skip_re = [re.compile(p) for p in skip]
    flat_target = traverse_util.flatten_dict(target, sep="/")
    keep = {k: v for k, v in flat_target.items()
            if k in stored and stored[k] == tuple(v.shape) and not any(r.search(k) for r in skip_re)}
    missing = sorted(set(flat_target) - set(keep))
    if not keep:
        return {}, missing
    subset = traverse_util.unflatten_dict(keep, sep="/")
    manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory,
        item_handlers={VARIABLES: ocp.PyTreeCheckpointHandler()},
    )
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), subset
    )
    restored = manager.restore(step, args=ocp.args.Composite(
        **{VARIABLES: ocp.args.PyTreeRestore(item=subset, restore_args=restore_args, partial_restore=True)}
    ))[VARIABLES]
    return restored, missing
