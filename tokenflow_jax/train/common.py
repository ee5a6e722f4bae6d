"""What every trainer's loop shares: preemption handling, metric logging, image grids, state shardings."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from tokenflow_jax import checkpoint
from tokenflow_jax.train.tensorboard import EventWriter

logger = logging.getLogger(__name__)


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag the loop checks at step boundaries, so the trainer can save
    a checkpoint and exit cleanly instead of dying mid-step. A second signal exits at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
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
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsWriter:
    """JSON lines + TensorBoard scalars/images, written by process 0 only."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = EventWriter(os.path.join(workdir, "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Removes JSON lines of steps after ``step``: a run resumed from the checkpoint at ``step`` (or
        restarted from scratch, step 0) repeats them, and an abandoned attempt's rows must not remain.
        (TensorBoard resolves repeated steps itself by showing the newest event file's values.)"""
        if not self.enabled:
            return
        self._jsonl.close()
        path = self._jsonl.name
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(kept)
        self._jsonl = open(path, "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._tb.scalars(step, {k: v for k, v in record.items() if k not in ("step", "time")})
        self._tb.flush()

    def image(self, step: int, tag: str, array: np.ndarray, path: str | None = None) -> None:
        """uint8 [H, W, 3] image to TensorBoard and optionally a PNG file."""
        if not self.enabled:
            return
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        self._tb.image(step, tag, buffer.getvalue(), array.shape[0], array.shape[1])
        self._tb.flush()
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(buffer.getvalue())

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of uint8 image batches [N, H, W, 3] -> one uint8 grid image (white padding)."""
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for r, batch in enumerate(rows):
        for i, img in enumerate(batch):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[top : top + h, left : left + w] = img
    return grid


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
        tuple(checkpoint.path_key_name(k) for k in path): sharding
        for path, sharding in jax.tree_util.tree_flatten_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    }

    def pick(path, leaf):
        keys = tuple(checkpoint.path_key_name(k) for k in path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= len(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying ``shardings`` (restore targets, AOT compile inputs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def mesh_and_rules(config):
    """The run's mesh (``config.mesh``) and logical-axis rules (``config.mesh.rules``, default the project's)."""
    from tokenflow_jax import parallel

    mesh = parallel.mesh_from_config(config.mesh)
    rules = tuple(tuple(r) for r in config.mesh.get("rules", parallel.DEFAULT_RULES))
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


def progress_bar(start: int, total: int, enabled: bool, desc: str | None = None):
    """A tqdm bar over training steps, shown by process 0 only."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True, desc=desc)


def merge_trees(base: dict, update: dict) -> dict:
    """``base`` with every leaf present in ``update`` replaced (nested dicts merged, others kept)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_trees(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
