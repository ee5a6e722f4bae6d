"""Multi-host start-up: ``jax.distributed.initialize`` when the launcher runs this as one of several processes.

Called at the start of every ``tokenflow-jax`` command that runs JAX (not ``compile``). The first match wins:

1. explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the environment variables
   ``TOKENFLOW_COORDINATOR``, ``TOKENFLOW_NUM_PROCESSES``, ``TOKENFLOW_PROCESS_ID``), as
   ``launch/local_multiprocess.sh`` sets them. ``TOKENFLOW_LOCAL_DEVICE_IDS=0,1`` picks this process's GPUs;
2. SLURM, inside ``srun`` with ``SLURM_NTASKS`` > 1: JAX's SLURM detection (coordinator: the step's first node,
   a port derived from the job id; ``TOKENFLOW_COORDINATOR`` overrides it). One task per node sees all of the
   node's GPUs; one task per GPU sees its own;
3. a TPU VM (TPU chips on the PCI bus) or a GKE TPU pod (``TPU_WORKER_HOSTNAMES``): JAX's TPU detection (the
   metadata server or the GKE variables), as MaxText does on every TPU run, single host included;
4. otherwise one process: nothing to do.

``TOKENFLOW_DISTRIBUTED=0`` turns it off; ``=1`` forces JAX's own auto-detection (Open MPI, other clusters).

When a process dies, the others stop within about ``TOKENFLOW_HEARTBEAT_TIMEOUT`` seconds (default 100, JAX's)
with "Terminating process because the JAX distributed service detected fatal errors ... another task died",
instead of hanging in a collective.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

from tokenflow_jax.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TIMEOUT = 100  # seconds, JAX's default
DEFAULT_INIT_TIMEOUT = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (each overrides its environment variable)."""
    group = parser.add_argument_group("multi-host (default: detected from SLURM / TPU, or one process)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (env TOKENFLOW_COORDINATOR)")
    group.add_argument("--num-processes", type=int, help="number of processes (env TOKENFLOW_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process's index (env TOKENFLOW_PROCESS_ID)")


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def _device_ids(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"TOKENFLOW_LOCAL_DEVICE_IDS={value!r} must be comma-separated integers") from None


def tpu_host(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this machine is a TPU VM / TPU pod worker (looked up without loading any JAX backend)."""
    if environ.get("TPU_WORKER_HOSTNAMES", "").count(",") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    try:
        from jax._src import hardware_utils  # deferred: a private module that may move; fallback below

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a private module; fall back to the device files
        return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _slurm_local_devices(environ: Mapping[str, str]) -> list[int] | None:
    """One task per node: all the node's visible GPUs; one task per GPU: its own (JAX's default)."""
    tasks = _int(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS") or 1
    nodes = _int(environ, "SLURM_STEP_NUM_NODES") or _int(environ, "SLURM_JOB_NUM_NODES") or 1
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if tasks <= nodes:  # one task per node: every GPU the node gave us
        count = len(visible) or _int(environ, "SLURM_GPUS_ON_NODE")
        return list(range(count)) if count else None
    if len(visible) == 1:  # --gpus-per-task=1: the task sees exactly its GPU, as device 0
        return [0]
    return None  # JAX picks device SLURM_LOCALID among the node's GPUs


def settings(args: argparse.Namespace | None = None, environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The keyword arguments for ``jax.distributed.initialize``, or None for a single-process run."""
    mode = environ.get("TOKENFLOW_DISTRIBUTED", "").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return None
    timeouts = {"initialization_timeout": _int(environ, "TOKENFLOW_INIT_TIMEOUT") or DEFAULT_INIT_TIMEOUT,
                "heartbeat_timeout_seconds": _int(environ, "TOKENFLOW_HEARTBEAT_TIMEOUT") or DEFAULT_HEARTBEAT_TIMEOUT}
    coordinator = getattr(args, "coordinator", None) or environ.get("TOKENFLOW_COORDINATOR") or None
    num_processes = getattr(args, "num_processes", None)
    num_processes = num_processes if num_processes is not None else _int(environ, "TOKENFLOW_NUM_PROCESSES")
    process_id = getattr(args, "process_id", None)
    process_id = process_id if process_id is not None else _int(environ, "TOKENFLOW_PROCESS_ID")
    local = _device_ids(environ["TOKENFLOW_LOCAL_DEVICE_IDS"]) if environ.get("TOKENFLOW_LOCAL_DEVICE_IDS") else None

    if num_processes is not None or process_id is not None:
        missing = [name for name, value in (("--coordinator / TOKENFLOW_COORDINATOR", coordinator),
                                            ("--num-processes / TOKENFLOW_NUM_PROCESSES", num_processes),
                                            ("--process-id / TOKENFLOW_PROCESS_ID", process_id)) if value is None]
        if missing:
            raise ConfigError(f"an explicit multi-process launch needs all three of coordinator, process count and "
                              f"process id; missing {', '.join(missing)}")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
        if num_processes == 1:
            return None
        return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id,
                "local_device_ids": local, **timeouts}
    # Inside an srun step (the batch script itself also has SLURM_PROCID, but runs once: no step node list).
    slurm_tasks = _int(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS") or 1
    if all(v in environ for v in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NODELIST")) and slurm_tasks > 1:
        return {"coordinator_address": coordinator, "local_device_ids": local or _slurm_local_devices(environ),
                **timeouts}
    if mode in ("1", "true", "on", "yes", "auto") or tpu_host(environ):
        return {"coordinator_address": coordinator, "local_device_ids": local, **timeouts}
    if coordinator:
        raise ConfigError(f"coordinator {coordinator!r} given but no process count or id (set --num-processes and "
                          "--process-id, or TOKENFLOW_NUM_PROCESSES and TOKENFLOW_PROCESS_ID)")
    return None


def initialize(args: argparse.Namespace | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Starts JAX's distributed runtime when this is a multi-process launch; returns True when it did.

    Must run before anything touches a JAX backend (device lists, arrays, jit). Idempotent.
    """

    kwargs = settings(args, environ)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    logger.info("starting the JAX distributed runtime (%s)", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)
    logger.info("process %d of %d: %d local / %d global devices (%s); a dead process stops the others within ~%d s",
                jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                jax.devices()[0].platform, kwargs["heartbeat_timeout_seconds"])
    if jax.process_index() != 0:  # process 0 logs the run; the others only warnings and errors
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    return True

