"""What a run writes for people to read: metrics as JSON lines and TensorBoard events, previews, progress bars.

Process 0 writes; a remote workdir (``gs://...``) keeps checkpoints remote and sends these local files to
``$TOKENFLOW_LOGDIR`` (see :func:`local_logdir`).
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import tensorboardX
from etils import epath
from PIL import Image
from tqdm import tqdm

from tokenflow_jax.errors import ConfigError

logger = logging.getLogger(__name__)


def local_logdir(workdir: str) -> str:
    """Where metrics, TensorBoard events and images go: ``workdir`` itself, or for a remote one (``gs://b/run``,
    whose checkpoints orbax writes there) ``$TOKENFLOW_LOGDIR/b/run`` (default ``~/tokenflow_logs``) on
    process 0's disk: JSON lines and event files are appended to, which object stores do not support."""
    if "://" not in workdir:
        return workdir
    root = os.environ.get("TOKENFLOW_LOGDIR") or os.path.expanduser("~/tokenflow_logs")
    return os.path.join(root, workdir.split("://", 1)[1])


def check_workdir(workdir: str) -> None:
    """A ConfigError naming ``workdir`` when it, or the nearest folder above it that exists, is a file: a run must
    be able to create it (or use it) as a folder. Creates nothing."""
    path = epath.Path(workdir)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == path else f"is inside {existing}, which is a file"
                raise ConfigError(f"--workdir {workdir} {where}; give a folder (new or an earlier run's)")
            return


def make_workdir(workdir: str) -> None:
    """Creates the workdir, local or remote (``gs://...`` through ``etils.epath``, the path library orbax uses);
    a ConfigError naming it when it cannot be (:func:`check_workdir`, no permission)."""
    check_workdir(workdir)
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise ConfigError(f"--workdir {workdir} cannot be created: {e.strerror or e}") from e


class MetricsWriter:
    """JSON lines + TensorBoard scalars/images, written by process 0 only (see :func:`local_logdir`)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.workdir, self.logdir = workdir, local_logdir(workdir)
        if enabled:
            if self.logdir != workdir:
                logger.warning("workdir %s is remote: checkpoints go there, metrics, TensorBoard events and images "
                               "to %s on this host (set TOKENFLOW_LOGDIR to change)", workdir, self.logdir)
            os.makedirs(self.logdir, exist_ok=True)
            self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a")
            self._tb = tensorboardX.SummaryWriter(os.path.join(self.logdir, "tensorboard"), flush_secs=30)

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
        for tag, value in record.items():
            if tag not in ("step", "time"):
                self._tb.add_scalar(tag, value, step)
        self._tb.flush()

    def image(self, step: int, tag: str, array: np.ndarray, path: str | None = None) -> None:
        """uint8 [H, W, 3] image to TensorBoard and optionally a PNG file."""
        if not self.enabled:
            return
        self._tb.add_image(tag, array, step, dataformats="HWC")
        self._tb.flush()
        if path:
            if self.logdir != self.workdir and path.startswith(self.workdir):
                path = self.logdir + path[len(self.workdir):]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(array).save(path, format="PNG")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def progress_bar(start: int, total: int, enabled: bool, desc: str | None = None, unit: str = "step"):
    """A tqdm bar over training steps (or ``unit``s), shown by process 0 only."""
    return tqdm(total=total, initial=start, disable=not enabled, unit=unit, dynamic_ncols=True, desc=desc)
