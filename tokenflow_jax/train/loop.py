"""What every trainer's loop shares: its tail (log, finite check, throughput, checkpoint or stop), preemption
handling, state shardings, resume, and the update step built from a model's abstract init."""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokenflow_jax import checkpoint, parallel, prng
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.train import optim
from tokenflow_jax.utils import logs, trees

logger = logging.getLogger(__name__)


# The exit status of a run stopped before its last step by SIGTERM or a cluster preemption notice, after its
# checkpoint is complete: 128 + SIGTERM, what a shell reports for a process SIGTERM ended. A retry loop keyed on the
# exit code (0 finished, 2 a user error) runs the same command again, and it resumes.
EXIT_STOPPED = 128 + signal.SIGTERM


class Stopped(Exception):
    """A run stopped before its last step by a signal (SIGTERM, SIGINT) or a cluster preemption notice, raised when
    the loop's context is left, after its checkpoint at ``step`` is complete. Not an error: ``exit_code`` is 128 +
    the signal (:data:`EXIT_STOPPED` = 143 for SIGTERM and preemption notices, 130 for Ctrl-C)."""

    def __init__(self, step: int, num_steps: int, exit_code: int):
        super().__init__(f"stopped at step {step} of {num_steps} by a termination request; its checkpoint is saved, "
                         "run the same command again to resume")
        self.step, self.num_steps, self.exit_code = step, num_steps, exit_code


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag the loop checks at step boundaries, so the trainer can save
    a checkpoint and exit cleanly instead of dying mid-step. A second signal exits at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signum: int | None = None  # the signal that asked to stop
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame):
        if self.requested:
            raise SystemExit(128 + signum)
        logger.warning("received signal %d: saving a checkpoint at the end of this step, then exiting", signum)
        self.requested, self.signum = True, signum

    @property
    def exit_code(self) -> int:
        """128 + the signal received; :data:`EXIT_STOPPED` when none was (a cluster preemption notice)."""
        return EXIT_STOPPED if self.signum is None else 128 + self.signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def flatten_metrics(metrics: dict[str, Any], scale_names: list[str] | None = None) -> dict[str, float]:
    """Scalars stay; vectors (e.g. per-scale perplexity) become name/scale_k entries."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[name] = float(value)
        else:
            for i, v in enumerate(value.reshape(-1)):
                label = scale_names[i] if scale_names and len(scale_names) == value.size else str(i)
                out[f"{name}/{label}"] = float(v)
    return out


def check_finite(step: int, metrics: dict[str, float]) -> None:
    """A NaN or inf loss stops the run with the offending names (big_vision does the same)."""
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise FloatingPointError(f"non-finite metrics at step {step}: {bad}")


def optimizer_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer moments take their parameter's sharding; counts and other scalars are replicated.

    A state leaf belongs to a parameter when its path ends with that parameter's full path (optax keeps
    moments in trees shaped like the params, under ``mu``/``nu``/``inner_states[...]``); frozen
    parameters appear as leafless ``MaskedNode``s and need nothing.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {
        tuple(trees.path_key_name(k) for k in path): sharding
        for path, sharding in jax.tree_util.tree_flatten_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    }

    def pick(path, leaf):
        keys = tuple(trees.path_key_name(k) for k in path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= len(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def mesh_and_rules(config):
    """The run's mesh (``config.mesh``) and logical-axis rules (``config.mesh.rules``, default the project's)."""

    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.mesh)
    logger.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    return mesh, rules


def save_if_due(ckpt, guard: PreemptionGuard, done: int, num_steps: int, every: int, *items) -> bool:
    """``ckpt.save(done, *items)`` every ``every`` steps, at the last step and when a termination was requested
    (SIGTERM, or a preemption the cluster announced); returns True when the loop must stop after this step."""
    stop = guard.requested or ckpt.reached_preemption(done)
    if done % every == 0 or done == num_steps or stop:
        ckpt.save(done, *items, force=True)
    if stop:
        logger.warning("stopping at step %d after a termination request; checkpoint saved", done)
    return stop


def checkpointer(workdir: str, config, data_streams: tuple[str, ...] = ()) -> checkpoint.TrainCheckpointer:
    """The run's checkpoints under ``workdir/checkpoints``, kept and written as ``config.train`` says;
    ``data_streams`` names the input streams of a run that reads several."""
    tc = config.train
    return checkpoint.TrainCheckpointer(workdir, keep=tc.keep_checkpoints, use_async=tc.async_checkpoints,
                                        data_streams=data_streams)


def run_meta(config, recipe: str) -> dict[str, Any]:
    """The checkpoint's ``meta`` item: which recipe, config file and overrides made it (inference rebuilds the
    model from these), and the whole config as JSON."""
    return {"recipe": recipe, "config_spec": config.get("config_spec", ""),
            "config_overrides": list(config.get("config_overrides", [])), "config": config.to_json()}


class LoopTail:
    """What every trainer does after its update step: log, check, measure, save or stop.

    Every ``config.train.log_every`` steps (and at the last) the device metrics are fetched, flattened (vectors
    per scale), joined by the host-side counters of :attr:`counts` since the last log (skipped records, dropped
    captions, ...), checked finite, given the throughput since the last log (``<unit>_per_second`` for each unit
    of ``per_step``, default ``config.train.global_batch_size`` of ``unit``, and ``tokens_per_second`` when the
    loop reports tokens) and written to ``metrics.jsonl`` and TensorBoard; the
    progress bar shows ``postfix``. A checkpoint is saved every ``config.train.checkpoint_every`` steps, at the
    last step, and when SIGTERM / SIGINT or a cluster preemption notice arrives, after which the loop stops.

    Use as a context manager around the loop: leaving it (normally or by an exception) closes the checkpointer
    (waiting for an async save), the writer and the bar, and restores the previous signal handlers. A loop that
    stopped before ``num_steps`` then raises :class:`Stopped` (its checkpoint complete), so the command exits with
    its ``exit_code`` (143 for SIGTERM) rather than 0 and a retry loop knows to run it again::

        with loop.LoopTail(config, workdir, ckpt, start, recipe="t2i") as tail:
            for step in range(start, num_steps):
                state, metrics = step_fn(state, batch)
                if tail.end_step(step + 1, metrics, variables, rest, data_iter):
                    break
        return tail.last
    """

    def __init__(self, config, workdir: str, ckpt, start: int, *, recipe: str, unit: str = "images",
                 per_step: dict[str, int] | None = None, scale_names: list[str] | None = None,
                 postfix: tuple[str, ...] = ("loss", "accuracy"), desc: str | None = None):
        tc = config.train
        self.ckpt, self.start, self.num_steps = ckpt, start, int(tc.num_steps)
        self.log_every, self.checkpoint_every = int(tc.log_every), int(tc.checkpoint_every)
        self.per_step = per_step or {unit: int(tc.global_batch_size)}  # examples of each unit in one step
        self.scale_names, self.postfix = scale_names, postfix
        self.meta = run_meta(config, recipe)
        self.counts: collections.Counter = collections.Counter()  # host-side counters since the last log
        self.last: dict[str, float] = {}  # the newest logged metrics
        self._tokens: int | None = None
        self._logged_step, self._timer = start, time.time()
        process0 = jax.process_index() == 0
        self.writer = logs.MetricsWriter(workdir, enabled=process0)
        self.writer.drop_after(start)
        self.guard = PreemptionGuard()
        self.progress = logs.progress_bar(start, self.num_steps, process0, desc or recipe)
        self.stopped: Stopped | None = None  # set when a termination request stopped the loop before num_steps

    def __enter__(self) -> LoopTail:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            self.ckpt.close()
        finally:
            self.writer.close()
            self.progress.close()
            self.guard.restore()
        if exc_type is None and self.stopped is not None:
            raise self.stopped

    def end_step(self, done: int, metrics: dict[str, Any], variables: Any, train_state: Any, data_iter,
                 tokens: int | None = None) -> bool:
        """After step ``done`` (1-based) whose device ``metrics`` are given; ``tokens``: the step's tokens over
        all processes, when throughput in tokens means something. Returns True when the loop must stop."""
        if tokens is not None:
            self._tokens = (self._tokens or 0) + tokens
        if done % self.log_every == 0 or done == self.num_steps:
            self._log(done, metrics)
        self.progress.update(1)
        stop = save_if_due(self.ckpt, self.guard, done, self.num_steps, self.checkpoint_every, variables,
                           train_state, data_iter, self.meta)
        if stop and done < self.num_steps:
            self.stopped = Stopped(done, self.num_steps, self.guard.exit_code)
        return stop

    def _log(self, done: int, metrics: dict[str, Any]) -> None:
        last = flatten_metrics(jax.device_get(metrics), self.scale_names)
        last.update({name: float(value) for name, value in self.counts.items()})  # this process's
        self.counts.clear()
        check_finite(done, last)
        elapsed = max(time.time() - self._timer, 1e-9)
        for unit, count in self.per_step.items():
            last[f"{unit}_per_second"] = (done - self._logged_step) * count / elapsed
        if self._tokens is not None:
            last["tokens_per_second"], self._tokens = self._tokens / elapsed, 0
        self._logged_step, self._timer = done, time.time()
        self.writer.write(done, last)
        self.progress.set_postfix({name: f"{last[name]:.4g}" for name in self.postfix if name in last}
                                  | {f"{unit}/s": f"{last[f'{unit}_per_second']:.1f}" for unit in self.per_step})
        self.last = last


def merge_trees(base: dict, update: dict) -> dict:
    """``base`` with every leaf present in ``update`` replaced (nested dicts merged, others kept)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_trees(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program on abstract inputs, for ``tokenflow-jax compile`` (see tokenflow_jax/compile.py).

    A recipe module exposes ``aot_programs(config, mesh, rules) -> list[Program]``: its real train step (or
    sampler) with ``jax.ShapeDtypeStruct`` arguments that carry the run's shardings, built without data,
    weights or any array on the mesh's devices.
    """
    name: str  # e.g. 'train_step', 'sample'
    fn: Any  # the jax.jit-wrapped function, with the run's in/out shardings and donation
    args: tuple  # abstract arguments (ShapeDtypeStructs with shardings)
    state_index: int | None = None  # which argument is the train state (its bytes are reported), if any
    rules: tuple | None = None  # logical-axis rules to trace under (default: the config's config.mesh.rules)


def abstract_batch(mesh: Mesh, shape: tuple[int, ...], dtype,
                   field: str = "config.train.global_batch_size") -> jax.ShapeDtypeStruct:
    """A global batch-leading input as ``pipeline.to_global_batch`` shards it (batch over the data axes).

    Raises ValueError naming ``field`` when the batch does not divide over those axes, as the run would.
    """

    sharding = parallel.data_sharding(mesh, len(shape))
    axes = sharding.spec[0] or ()
    ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if shape[0] % ways:
        raise ConfigError(f"{field}={shape[0]} does not divide over the {ways} data-parallel devices of mesh "
                         f"{dict(mesh.shape)} (batch axes {axes}); change {field} or config.mesh.shape")
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def restorable_data_iterator(ckpt, step: int, data_iter):
    """``data_iter`` when the checkpoint at ``step`` holds this process's iterator position, else None (for a
    ``{stream: iterator}`` dict, per stream).

    The data item is one file per process and process count (grain's ``process_{i}-of-{n}.json``): a run
    resumed with another number of processes restores the model and optimizer exactly, but each process's
    data stream (its own shard and shuffle) starts over, with a warning.
    """

    if isinstance(data_iter, dict):
        return {stream: _restorable(ckpt, step, it, checkpoint.data_item(stream)) for stream, it in data_iter.items()}
    return _restorable(ckpt, step, data_iter, checkpoint.DATA)


def _restorable(ckpt, step: int, data_iter, item: str):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    data_dir = epath.Path(str(ckpt.directory)) / str(step) / item
    if not data_dir.exists() or (data_dir / name).exists():
        return data_iter
    written = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
    logger.warning("checkpoint step %d was written by another number of processes (data positions %s, this run "
                   "needs %s): model and optimizer state are restored, each process's data stream starts over",
                   step, written, name)
    return None


# ------------------------------------------------------------------------- decoder trainers' state
@flax.struct.dataclass
class TrainState:
    """Parameters, optimizer state and step of the t2i and VLM trainers (the tokenizer's has more)."""
    step: jax.Array
    params: Any
    opt_state: Any


def gradient_step(loss_fn, tx, schedule, labels=None):
    """The decoder trainers' update ``(state, *inputs) -> (state, metrics)``: one gradient of
    ``loss_fn(params, *inputs) -> (loss, metrics)``, the optimizer's update, and the metrics joined by the loss,
    the gradient norm (of the trained parameters when ``labels`` marks them) and the learning rate."""

    def train_step(state: TrainState, *inputs):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, *inputs)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        trained = grads if labels is None else optim.trained_only(grads, labels)
        metrics = {"loss": loss, **aux, "grad_norm": optim.l2_norm(trained), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def rest_of_state(state: TrainState) -> dict[str, Any]:
    """The checkpoint's ``train_state`` item: everything but the parameters."""
    return {"step": state.step, "opt_state": state.opt_state}


def resume_state(ckpt, start: int, step: Step, data_iter) -> TrainState:
    """The state at ``start`` from the workdir's checkpoints on ``step``'s shardings; ``data_iter`` continues
    from its saved position when this process count wrote it (:func:`restorable_data_iterator`)."""
    abstract, shardings = step.abstract_state, step.state_sh
    variables, rest = ckpt.restore(start, {"params": checkpoint.abstract_target(abstract.params, step.param_sh)},
                                   checkpoint.abstract_target(rest_of_state(abstract), rest_of_state(shardings)),
                                   restorable_data_iterator(ckpt, start, data_iter))
    return TrainState(step=rest["step"], params=variables["params"], opt_state=rest["opt_state"])


def resume_or_init(ckpt, step: Step, data_iter, seed: int, load_params=None) -> tuple[TrainState, int]:
    """(state, first step): the newest readable checkpoint's state when the workdir has one (the data iterator
    continues from its saved position, :func:`resume_state`; a damaged newer step is warned about and set aside,
    ``TrainCheckpointer.restore_newest``), else a fresh state from ``seed``. ``load_params(params) ->
    params`` may replace a fresh state's parameters (weights from HF or from another run); the optimizer state
    is then made again for them."""
    found = ckpt.restore_newest(lambda start: resume_state(ckpt, start, step, data_iter))  # skips damaged steps
    if found is not None:
        start, state = found
        logger.info("resumed from %s at step %d", ckpt.directory, start)
        return state, start
    state = jax.jit(step.init_state, out_shardings=step.state_sh)(prng.make_key(seed))
    params = load_params(state.params) if load_params is not None else state.params
    if params is not state.params:  # fresh optimizer moments for the loaded parameters
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=step.tx.init(p)),
                        out_shardings=step.state_sh)(params)
    return state, 0


@dataclasses.dataclass(frozen=True)
class Step:
    """A run's abstract state on a mesh, its shardings, the optimizer and the jitted update step."""
    abstract_state: TrainState
    state_sh: TrainState
    param_sh: Any
    labels: Any  # 'train' / 'freeze' per parameter
    tx: Any
    init_state: Any  # key -> TrainState (not jitted)
    step_fn: Any  # jitted (state, *other_args) -> (state, metrics), state donated


def build_step(config, model, init_inputs, make_train_step, mesh: Mesh, rules, *, other_in_shardings=(None, None),
               trainable=(), frozen=()) -> Step:
    """Shardings from ``jax.eval_shape`` of ``model.init`` and the jitted update step
    ``make_train_step(tx, labels)``. Creates no array on ``mesh``'s devices, so it also serves ahead-of-time
    compiles for TPU topologies.

    init_inputs: ``model.init``'s arguments after the key, as ShapeDtypeStructs (``models.t2i.init_args``);
    other_in_shardings: those of the step's arguments after the state; trainable / frozen: the optimizer's
    parameter regexes.
    """
    key = prng.make_key(0)  # outside the mesh: compile-only devices cannot hold it
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(model.init, key, *init_inputs)
        param_sh = parallel.shardings_from_abstract(boxed, mesh, rules)["params"]
        abstract_params = parallel.unbox_without_constraints(boxed)["params"]
        # The optimizer reads only the parameters' paths: built once, it serves the abstract state, the initial
        # state and the step.
        tx, labels = optim.make_optimizer(config.optim, abstract_params, trainable, frozen)

        def state_from_params(params) -> TrainState:
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

        # The state's shapes from the abstract parameters: tracing model.init a second time costs seconds per run
        # for a model of a few layers, and the result is the same.
        abstract_state = jax.eval_shape(state_from_params, abstract_params)
        state_sh = TrainState(step=NamedSharding(mesh, PartitionSpec()), params=param_sh,
                              opt_state=optimizer_state_shardings(abstract_state.opt_state, param_sh, mesh))
        parallel.check_replication(abstract_state.params, param_sh, mesh,
                                   config.mesh.get("max_replicated_fraction", 0.05))

    def init_state(key) -> TrainState:
        params = nn.unbox(model.init(key, *(jnp.zeros(s.shape, s.dtype) for s in init_inputs)))["params"]
        return state_from_params(params)

    step_fn = jax.jit(make_train_step(tx, labels), in_shardings=(state_sh, *other_in_shardings),
                      out_shardings=(state_sh, None), donate_argnums=0)
    return Step(abstract_state, state_sh, param_sh, labels, tx, init_state, step_fn)
