"""Orbax checkpoints: one layout for every recipe and every entry point.

A checkpoint directory is an orbax ``CheckpointManager`` root; each step holds named items:

    variables   model variables {'params': ..., 'quantizer': ...} (what inference needs)
    meta        JSON: recipe, config spec and overrides, step, free-form info
    (trainers add opt_state, data-iterator state and so on as further items)

Inference entry points restore only ``variables`` (and ``meta``), into an abstract target built from
``jax.eval_shape`` of the model with the caller's shardings, so a checkpoint written on one mesh loads
on another. Before restoring anything, the stored tree is compared with the target and every missing,
unexpected or differently shaped entry is reported in one error.

Damage and full disks are user errors too (:class:`CheckpointDamagedError`, :class:`CheckpointSaveError`): a
stored file that cannot be read or decoded is named with its step; a trainer resumes from the newest step that
reads back (:meth:`TrainCheckpointer.restore_newest`); a failed save removes its partial folder and stops the run
with the disk's error, keeping every earlier step.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from tokenflow_jax import parallel, prng
from tokenflow_jax.errors import CheckpointError, CheckpointNotFoundError
from tokenflow_jax.utils import file_errors, trees

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _SkipUnrequestedItemNotices(logging.Filter):
    """Inference restores only ``variables``/``meta`` from training checkpoints on purpose; orbax warns
    once per other item (optimizer state, data iterator) on every read, which buries the real output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was found in the checkpoint, but could not be restored" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkipUnrequestedItemNotices())


class _SkipBackgroundSaveTracebacks(logging.Filter):
    """A failed asynchronous save makes each of orbax's background threads log the same exception with its
    traceback (hundreds of lines); the exception itself reaches the main thread, where :class:`TrainCheckpointer`
    turns it into one :class:`CheckpointSaveError`. ``TOKENFLOW_DEBUG=1`` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or os.environ.get("TOKENFLOW_DEBUG"):
            return True
        return not any("orbax" in frame.filename for frame in traceback.extract_tb(record.exc_info[2]))


logging.getLogger("absl").addFilter(_SkipBackgroundSaveTracebacks())

VARIABLES = "variables"
META = "meta"


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's stored tree does not match the model it is restored into."""


class CheckpointDamagedError(CheckpointError):
    """A file of a stored step cannot be read or decoded (truncated, overwritten, missing).

    Attributes: ``step``, ``file`` (the path of the damaged file, or of the step when no one file is to blame) and
    ``reason`` (what the reader said, one line).
    """

    def __init__(self, message: str, step: int, file: str, reason: str):
        super().__init__(message)
        self.step, self.file, self.reason = step, file, reason


class CheckpointSaveError(CheckpointError):
    """Writing a step failed (a full disk, a lost mount, no permission). Its partial folder is removed and every
    earlier step is intact, so the same command resumes from the newest of them once the cause is fixed."""


# ------------------------------------------------------------------------------------------- damaged steps
def _damaged(directory: Any, step: int, file: str, reason: str, older: list[int] | None) -> CheckpointDamagedError:
    message = f"checkpoint {directory} step {step} is damaged: cannot read {file}" + (f" ({reason})" if reason else "")
    if older:
        step_dir = epath.Path(str(directory)) / str(step)
        message += (f"; the older steps there ({', '.join(map(str, older))}) may be intact: move {step_dir} out of "
                    f"{directory} to use step {older[-1]}")
    return CheckpointDamagedError(message, step, file, reason)


@contextlib.contextmanager
def _reading(directory: Any, step: int, older: list[int] | None = None):
    """Turns a failure to read or decode the files of ``step`` into one :class:`CheckpointDamagedError` naming
    the step and the file; ``older`` (the older steps there) adds how to use them instead."""
    file_errors.drop_orbax_leftovers()
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        problem = file_errors.file_problem(epath.Path(str(directory)) / str(step), error)
        if problem is None:
            raise
        raise _damaged(directory, step, *problem, older) from error


def _stored_tree(directory: Any, step: int, item: str, metadata: Any, older: list[int] | None = None) -> Any:
    """The stored tree of ``item`` from its metadata. A missing ``_METADATA``, which orbax reads as an empty tree
    (so that every key would be reported missing), is damage, not a mismatch."""
    tree = getattr(metadata, "tree", metadata)
    if not jax.tree.leaves(tree):
        path = epath.Path(str(directory)) / str(step) / item / "_METADATA"
        if not path.exists():
            raise _damaged(directory, step, str(path), "missing", older)
    return tree


# ----------------------------------------------------------------------------------------------- inference
@functools.cache
def _write_whole_shards_in_one_process() -> None:
    """In a single-process run, orbax's replica-parallel saving (its default on CPU and TPU) only adds work: it
    splits every replicated shard among replicas that this one process writes anyway, dispatching one eager
    slice per shard, which XLA compiles once per shape (~380 compiles, ~1 min, for the tokenizer's state on 8
    CPU devices). Multi-process runs keep orbax's default, where the split spreads the writing over hosts. The
    files are the same either way. Runs once, when the first manager is built (after jax.distributed.initialize)."""
    if jax.process_count() == 1:
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # orbax warns on every override of a registered type, intended here
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        finally:
            absl_logger.setLevel(level)


def item_handlers() -> dict[str, Any]:
    """Handlers for the items every checkpoint has; a manager needs them to read metadata."""
    _write_whole_shards_in_one_process()
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
    """The JSON ``meta`` item of ``step`` (default: latest). Raises CheckpointDamagedError naming the file when it
    does not decode."""
    step = _require_step(directory, step)
    manager = _manager(directory)
    with _reading(manager.directory, step, _older(manager, step)):
        return dict(manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])


def _older(manager: ocp.CheckpointManager, step: int) -> list[int]:
    return sorted(s for s in manager.all_steps() if s < step)


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
      CheckpointDamagedError: a file of the step cannot be read or decoded (named, with the older steps there).
        Inference does not fall back to an older step on its own: its output would silently come from other weights.
    """
    step = _require_step(directory, step)
    manager = _manager(directory)
    older = _older(manager, step)
    with _reading(manager.directory, step, older):
        stored_tree = _stored_tree(manager.directory, step, VARIABLES, manager.item_metadata(step)[VARIABLES], older)
        problems = tree_differences(stored_tree, target)
        if problems:
            shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50
                                                 else "")
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

    A save that fails (a full disk) raises :class:`CheckpointSaveError` at the first step boundary after it
    (:meth:`reached_preemption`, which the loop asks every step), at the next :meth:`save` or at :meth:`close`,
    whichever comes first, after removing the step's partial folder; earlier steps are untouched.
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
        self._writing: int | None = None  # the step of the last save, until its success or failure is known

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # ------------------------------------------------------------------------------------------- saving
    def save(self, step: int, variables: Any, train_state: Any, data_iterator: Any, meta: dict[str, Any],
             force: bool = False) -> bool:
        """Starts saving ``step`` (returns at once when async). True if a save was started.

        Raises CheckpointSaveError when this save, or the asynchronous one before it, could not be written."""

        self._finish_writing(wait=True)
        items = {
            VARIABLES: ocp.args.StandardSave(variables),
            TRAIN_STATE: ocp.args.StandardSave(train_state),
            META: ocp.args.JsonSave(dict(meta, step=step)),
        }
        for item, iterator in self._data(data_iterator).items():
            items[item] = grain.checkpoint.CheckpointSave(iterator)
        with self._writing_step(step):
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if started:
            self._writing = step
        return started

    def _finish_writing(self, wait: bool) -> None:
        """Raises a failed asynchronous save's CheckpointSaveError; ``wait=False`` returns at once while it runs."""
        if self._writing is None or (not wait and self.manager.is_saving_in_progress()):
            return
        step, self._writing = self._writing, None
        with self._writing_step(step):
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _writing_step(self, step: int):
        file_errors.drop_orbax_leftovers()
        try:
            yield
        except Exception as error:
            problem = file_errors.file_problem(epath.Path(str(self.directory)), error)
            if problem is None:
                raise
            removed = self._remove_partial_steps()
            self.manager.reload()
            latest = self.manager.latest_step()
            file, reason = problem
            raise CheckpointSaveError(
                f"could not save checkpoint step {step} in {self.directory}: {reason} (writing "
                f"{os.path.relpath(file, self.directory) if '://' not in file else file}); "
                + (f"removed the partial {', '.join(removed)}; " if removed else "")
                + (f"the newest complete step is {latest}: free space (or fix the folder) and run the same command "
                   "again to resume from it" if latest is not None else "no earlier step was saved")
            ) from error

    def _remove_partial_steps(self) -> list[str]:
        """Removes the unfinished step folders (``<step>.orbax-checkpoint-tmp*``, on a full disk the space they
        hold is needed) on the primary process; returns their names."""
        partial = sorted(p for p in epath.Path(str(self.directory)).iterdir() if ".orbax-checkpoint-tmp" in p.name)
        if ocp.multihost.is_primary_host(0):
            for path in partial:
                with contextlib.suppress(OSError):
                    path.rmtree() if path.is_dir() else path.unlink()
        return [p.name for p in partial]

    def _data(self, data_iterator: Any) -> dict[str, Any]:
        """{item name: iterator} of one iterator (item ``data``), of ``{stream: iterator}`` (items ``data_<stream>``)
        or of None (nothing); a stream's None is left out (its position is not restored)."""
        if data_iterator is None:
            return {}
        if not isinstance(data_iterator, dict):
            return {DATA: data_iterator}
        return {self.data_items[name]: it for name, it in data_iterator.items() if it is not None}

    # ----------------------------------------------------------------------------------------- restoring
    def restore(self, step: int, variables_target: Any, train_state_target: Any, data_iterator: Any) -> tuple[Any, Any]:
        """Restores ``step`` into the targets; the data iterator is positioned in place.

        Raises CheckpointMismatchError (the stored trees differ from the targets) or CheckpointDamagedError (a file
        of the step cannot be read or decoded)."""

        with _reading(self.directory, step):
            stored = self.manager.item_metadata(step)
            for name, target in ((VARIABLES, variables_target), (TRAIN_STATE, train_state_target)):
                problems = tree_differences(_stored_tree(self.directory, step, name, stored[name]), target)
                if problems:
                    raise CheckpointMismatchError(
                        f"checkpoint {self.directory} step {step}, item {name!r}, does not match this run:\n  "
                        + "\n  ".join(problems[:50])
                    )
            items = {VARIABLES: ocp.args.StandardRestore(variables_target),
                     TRAIN_STATE: ocp.args.StandardRestore(train_state_target)}
            if META in stored:  # not needed to resume, but inference reads it: a step whose meta is damaged is too
                items[META] = ocp.args.JsonRestore()
            for item, iterator in self._data(data_iterator).items():
                items[item] = grain.checkpoint.CheckpointRestore(iterator)
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[VARIABLES], restored[TRAIN_STATE]

    def restore_newest(self, restore: Callable[[int], T]) -> tuple[int, T] | None:
        """``(step, restore(step))`` for the newest step that reads back, or None when there is no step.

        ``restore(step)`` restores one step (through :meth:`restore`). A step whose files are damaged is skipped
        for the next older one; once one restores, each damaged newer step gets one warning (the step, the file,
        the reader's complaint) and is moved to ``checkpoints/damaged/<step>``, so the run saves that step afresh.
        Raises CheckpointDamagedError naming every step when none reads back, and moves nothing then. A mismatch
        with this run (CheckpointMismatchError) is not damage and is raised at once.
        """
        damaged: list[CheckpointDamagedError] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                result = restore(step)
            except CheckpointDamagedError as error:
                damaged.append(error)
                continue
            for error in damaged:
                moved = self._set_aside(error.step)
                logger.warning("checkpoint step %d is damaged: cannot read %s%s; resuming from step %d (the damaged "
                               "step is moved to %s)", error.step, error.file,
                               f" ({error.reason})" if error.reason else "", step, moved)
            return step, result
        if not damaged:
            return None
        raise CheckpointDamagedError(
            f"no checkpoint in {self.directory} reads back: "
            + "; ".join(f"step {e.step}: cannot read {e.file} ({e.reason})" for e in damaged)
            + f". Move {self.directory} aside to start the run afresh", damaged[0].step, damaged[0].file,
            damaged[0].reason)

    def _set_aside(self, step: int) -> str:
        """Moves step ``step`` to ``checkpoints/damaged/<step>`` (``<step>-2``, ... when taken), where orbax does not
        look for steps; every process then forgets it."""
        folder = epath.Path(str(self.directory)) / "damaged"
        target, n = folder / str(step), 1
        while target.exists():
            n += 1
            target = folder / f"{step}-{n}"
        if ocp.multihost.is_primary_host(0):
            folder.mkdir(parents=True, exist_ok=True)
            (epath.Path(str(self.directory)) / str(step)).rename(target)
        ocp.multihost.sync_global_processes(f"tokenflow_jax:set_aside_damaged_step_{step}")
        self.manager.reload()
        return str(target)

    # ------------------------------------------------------------------------------------------ the loop
    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (TPU maintenance events via JAX's service).

        The loop asks at every step boundary, so this is also where an asynchronous save that failed since the
        last boundary raises its CheckpointSaveError."""
        self._finish_writing(wait=False)
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self._finish_writing(wait=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def restore_variables_partially(directory: str, target: Any, skip: tuple[str, ...] = (),
                                step: int | None = None) -> tuple[Any, list[str]]:
    """Restores every entry of ``target`` that the checkpoint holds with the same shape, except paths
    matching a ``skip`` regex (e.g. ``('^params/pixel_decoder/',)`` to rebuild the decoder in stage 2).

    Returns (restored subset as a nested dict, sorted paths of ``target`` that were NOT restored and
    must come from a fresh init). Paths are '/'-joined keys.
    """

    step = _require_step(directory, step)
    manager = _manager(directory)
    with _reading(manager.directory, step):
        stored = trees.flat_shapes(_stored_tree(manager.directory, step, VARIABLES,
                                                manager.item_metadata(step)[VARIABLES]) or {})
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
    with _reading(manager.directory, step):
        restored = manager.restore(step, args=ocp.args.Composite(
            **{VARIABLES: ocp.args.PyTreeRestore(item=subset, restore_args=restore_args, partial_restore=True)}
        ))[VARIABLES]
    return restored, missing
