"""Multi-host: launcher detection, and real multi-process runs on localhost (CPU collectives over gloo).

The slow tests run the real trainers as two processes x 4 devices on one (data=8) mesh and compare with one
process x 8 devices: same losses, a checkpoint written by the two processes resumed by one, and a killed
process that stops the other instead of hanging it. Workers: tests/multihost_worker.py.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from tokenflow_jax import distributed
from tokenflow_jax.utils import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ launcher detection
def test_one_process_by_default():
    assert distributed.settings(environ={}) is None
    assert distributed.settings(environ={"TOKENFLOW_NUM_PROCESSES": "1", "TOKENFLOW_PROCESS_ID": "0",
                                         "TOKENFLOW_COORDINATOR": "h:1"}) is None
    # a SLURM step with one task is one process; so is the batch script itself (no step node list)
    step = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}
    assert distributed.settings(environ={**step, "SLURM_NTASKS": "1"}) is None
    assert distributed.settings(environ={"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) is None


def test_explicit_settings_and_their_overrides():
    import argparse

    env = {"TOKENFLOW_COORDINATOR": "10.0.0.1:1234", "TOKENFLOW_NUM_PROCESSES": "4", "TOKENFLOW_PROCESS_ID": "2",
           "TOKENFLOW_HEARTBEAT_TIMEOUT": "15"}
    s = distributed.settings(environ=env)
    assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("10.0.0.1:1234", 4, 2)
    assert s["heartbeat_timeout_seconds"] == 15 and s["local_device_ids"] is None
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "h0:99", "--process-id", "3"])
    s = distributed.settings(args, environ=env)
    assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("h0:99", 4, 3)
    with pytest.raises(ValueError, match="missing --coordinator"):
        distributed.settings(environ={"TOKENFLOW_NUM_PROCESSES": "2", "TOKENFLOW_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        distributed.settings(environ={**env, "TOKENFLOW_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="TOKENFLOW_PROCESS_ID='x' must be an integer"):
        distributed.settings(environ={**env, "TOKENFLOW_PROCESS_ID": "x"})
    assert distributed.settings(environ={**env, "TOKENFLOW_DISTRIBUTED": "0"}) is None


def test_slurm_one_task_per_node_sees_all_gpus_one_per_gpu_its_own():
    base = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[1-2]"}
    per_node = distributed.settings(environ={**base, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2",
                                             "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert per_node["local_device_ids"] == list(range(8)) and per_node["coordinator_address"] is None
    per_gpu_bound = distributed.settings(environ={**base, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2",
                                                  "CUDA_VISIBLE_DEVICES": "5"})
    assert per_gpu_bound["local_device_ids"] == [0]
    per_gpu_shared = distributed.settings(environ={**base, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2",
                                                   "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert per_gpu_shared["local_device_ids"] is None  # JAX takes GPU SLURM_LOCALID
    overridden = distributed.settings(environ={**base, "SLURM_NTASKS": "2", "TOKENFLOW_COORDINATOR": "n1:5000"})
    assert overridden["coordinator_address"] == "n1:5000"


def test_tpu_pods_are_detected_from_the_gke_variables():
    s = distributed.settings(environ={"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "1"})
    assert s is not None and s["coordinator_address"] is None  # JAX's TPU detection fills in the rest


def test_a_remote_workdir_keeps_logs_on_process_0s_disk(tmp_path, monkeypatch):

    monkeypatch.setenv("TOKENFLOW_LOGDIR", str(tmp_path / "logs"))
    assert logs.local_logdir("/data/run") == "/data/run"
    assert logs.local_logdir("gs://bucket/runs/a") == str(tmp_path / "logs" / "bucket" / "runs" / "a")
    writer = logs.MetricsWriter("gs://bucket/runs/a")
    writer.write(1, {"loss": 0.5})
    writer.image(1, "x", np.zeros((4, 4, 3), np.uint8), "gs://bucket/runs/a/images/x.png")
    writer.close()
    local = tmp_path / "logs" / "bucket" / "runs" / "a"
    assert (local / "metrics.jsonl").read_text().count('"loss": 0.5') == 1
    assert (local / "images" / "x.png").is_file() and (local / "tensorboard").is_dir()


# ------------------------------------------------------------------------------------------ processes
def _base_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    # Workers share the tests' persistent compilation cache: a repeated program (the resumed run's) is a file read.
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenflow_jax", "jax_tests")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    return env


def _env(port, process_id, num_processes=2, **extra):
    return _base_env(TOKENFLOW_COORDINATOR=f"127.0.0.1:{port}", TOKENFLOW_NUM_PROCESSES=str(num_processes),
                     TOKENFLOW_PROCESS_ID=str(process_id), TOKENFLOW_INIT_TIMEOUT="60", **extra)


def _start(args, env, log):
    return subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_for(path, text, proc, log, timeout):
    """Waits until ``path`` contains ``text`` while ``proc`` (logging to ``log``) runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path).read():
            return
        assert proc.poll() is None, open(log).read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n" + open(log).read()[-3000:])


def _assert_survivor_stops(survivor, log_path, killed_at, bound):
    try:
        survivor.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        survivor.kill()
        raise AssertionError(f"the surviving process still runs {bound} s after its peer was killed") from None
    elapsed = time.time() - killed_at
    log = open(log_path).read()
    assert survivor.returncode != 0
    assert "another task died" in log or "stopped sending heartbeats" in log, log[-3000:]
    return elapsed


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_with_a_clear_error(tmp_path, victim):
    """Kill a worker (the coordinator, process 0, or the other one): the survivor exits with the distributed
    runtime's error within the heartbeat timeout instead of hanging in its next collective."""
    port = portpicker.pick_unused_port()
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    procs = [_start(["heartbeat", "--devices", "1"], _env(port, i, TOKENFLOW_HEARTBEAT_TIMEOUT="5"),
                    open(logs[i], "w")) for i in range(2)]
    try:
        for i in range(2):
            _wait_for(logs[i], f"ready {i} 8.0", procs[i], logs[i], timeout=60)
        procs[victim].kill()
        killed_at = time.time()
        elapsed = _assert_survivor_stops(procs[1 - victim], logs[1 - victim], killed_at, bound=45)
        print(f"process {1 - victim} stopped {elapsed:.1f} s after process {victim} was killed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _train(recipe, workdir, steps, tmp_path, processes, skip=0):
    """Runs the trainer as ``processes`` processes x (8 / processes) devices; returns metrics.jsonl rows."""
    port = portpicker.pick_unused_port()
    logs = [str(tmp_path / f"{recipe}-{processes}-{i}.log") for i in range(processes)]
    args = ["train", recipe, str(workdir), str(steps), "--devices", str(8 // processes), "--skip", str(skip)]
    envs = [_env(port, i, processes) if processes > 1 else _base_env() for i in range(processes)]
    start = time.time()
    procs = [_start(args, envs[i], open(logs[i], "w")) for i in range(processes)]
    try:
        for i, p in enumerate(procs):
            assert p.wait(timeout=900) == 0, open(logs[i]).read()[-5000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"{recipe}: {processes} process(es) x {steps} steps in {time.time() - start:.1f} s")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _compare(reference, other, names, rtol_first, rtol_later):
    """Largest relative difference of ``names`` between matching steps; asserts the tolerances (the first step
    ``rtol_first``, later ones ``rtol_later``)."""
    assert [r["step"] for r in other] == [r["step"] for r in reference[: len(other)]]
    worst = 0.0
    for ref, row in zip(reference, other):
        rtol = rtol_first if ref["step"] == 1 else rtol_later
        for name in names:
            np.testing.assert_allclose(row[name], ref[name], rtol=rtol, atol=1e-6, err_msg=f"{name} step {ref['step']}")
            worst = max(worst, abs(row[name] - ref[name]) / max(abs(ref[name]), 1e-6))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("recipe,names,rtol_later", [
    ("tokenizer", ("loss", "recon_loss", "lpips_loss", "psnr", "disc_loss", "l2_grads"), 1e-2),
    ("t2i", ("loss", "accuracy", "grad_norm"), 1e-5),
])
def test_two_processes_train_like_one_and_one_resumes_their_checkpoint(tmp_path, recipe, names, rtol_later):
    """2 processes x 4 devices == 1 process x 8 devices (one data=8 mesh, the same global batches): the same
    metrics, process 0 alone writes metrics and images, and one process resumes the two processes' checkpoint
    to the same next step. The first step agrees to float rounding (measured: 3e-6 relative at worst); the
    tokenizer's later steps drift apart a little (3e-3 on the gradient norm by step 3: Adam's first updates are
    about sign(g), so the gloo all-reduce's other summation order shows up there), the t2i's do not."""
    reference = _train(recipe, tmp_path / "one", 3, tmp_path, processes=1)
    two = _train(recipe, tmp_path / "two", 2, tmp_path, processes=2)
    assert len(two) == 2  # written once (process 0), not once per process
    worst = _compare(reference, two, names, 1e-5, rtol_later)
    data = sorted(os.listdir(tmp_path / "two" / "checkpoints" / "2" / "data"))
    assert [d for d in data if d.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]
    if recipe == "tokenizer":
        assert sorted(os.listdir(tmp_path / "two" / "images")) == ["recon_00000001.png", "recon_00000002.png"]
    # One process resumes the two processes' step-2 checkpoint; its data position (one file per process) cannot
    # carry over, so the worker starts the same global stream at batch 2.
    resumed = _train(recipe, tmp_path / "two", 3, tmp_path, processes=1, skip=2)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    worst = max(worst, _compare(reference, resumed, names, 1e-5, rtol_later))
    print(f"{recipe}: largest relative difference from the one-process run {worst:.3g}")


@pytest.mark.slow
def test_a_process_killed_during_training_stops_the_other(tmp_path):
    port = portpicker.pick_unused_port()
    workdir = tmp_path / "run"
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    args = ["train", "t2i", str(workdir), "1000", "--devices", "4"]
    procs = [_start(args, _env(port, i, TOKENFLOW_HEARTBEAT_TIMEOUT="10"), open(logs[i], "w")) for i in range(2)]
    try:
        _wait_for(str(workdir / "metrics.jsonl"), '"step": 3', procs[0], logs[0], timeout=600)
        procs[1].kill()
        elapsed = _assert_survivor_stops(procs[0], logs[0], time.time(), bound=60)
        print(f"process 0 stopped {elapsed:.1f} s after process 1 was killed mid-training")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
