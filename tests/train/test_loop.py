"""The trainers' shared loop tail: what it logs, when it saves, when it stops (no model, a fake checkpointer)."""
from __future__ import annotations

import json
import math
import os
import signal

import ml_collections
import numpy as np
import pytest

from tokenflow_jax.train import loop


class FakeCheckpointer:
    """Records saves; announces a preemption at ``preempt_at``."""

    def __init__(self, preempt_at: int | None = None):
        self.saved, self.closed, self.preempt_at = [], False, preempt_at

    def save(self, step, variables, train_state, data_iter, meta, force=False):
        self.saved.append((step, variables, train_state, meta["recipe"]))
        return True

    def reached_preemption(self, step):
        return step == self.preempt_at

    def close(self):
        self.closed = True


def _config(num_steps=7, log_every=3, checkpoint_every=4, batch=8):
    config = ml_collections.ConfigDict({
        "config_spec": "configs/x.py:tiny", "config_overrides": ["--config.seed=1"],
        "train": {"num_steps": num_steps, "log_every": log_every, "checkpoint_every": checkpoint_every,
                  "global_batch_size": batch}})
    return config


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_logs_every_log_every_and_the_last_step_with_counters_since_the_last_log(tmp_path):
    ckpt = FakeCheckpointer()
    with loop.LoopTail(_config(), str(tmp_path), ckpt, 0, recipe="t2i", scale_names=["s1", "s2"]) as tail:
        for step in range(7):
            tail.counts["dropped"] += step  # host-side counter
            metrics = {"loss": np.float32(step), "accuracy": np.float32(0.5), "scale_loss": np.array([1.0, 2.0])}
            assert not tail.end_step(step + 1, metrics, {"params": step}, {"step": step}, None, tokens=10)
    rows = _rows(str(tmp_path))
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert [r["loss"] for r in rows] == [2.0, 5.0, 6.0]  # the logged step's own metrics
    assert [r["dropped"] for r in rows] == [0 + 1 + 2, 3 + 4 + 5, 6]  # reset at each log
    assert rows[0]["scale_loss/s1"] == 1.0 and rows[0]["scale_loss/s2"] == 2.0
    assert all(r["images_per_second"] > 0 and r["tokens_per_second"] > 0 for r in rows)
    # images/s counts the steps since the last log: 3 steps x 8, then 3 x 8, then 1 x 8
    ratios = [r["tokens_per_second"] / r["images_per_second"] for r in rows]
    assert ratios == pytest.approx([30 / 24, 30 / 24, 10 / 8])
    assert tail.last["loss"] == 6.0
    # saved every 4 steps and at the last; closed on exit
    assert [s[0] for s in ckpt.saved] == [4, 7] and ckpt.saved[1][1:] == ({"params": 6}, {"step": 6}, "t2i")
    assert ckpt.closed


def test_non_finite_metrics_stop_with_their_names_and_still_close(tmp_path):
    ckpt = FakeCheckpointer()
    with pytest.raises(FloatingPointError, match=r"step 3: \['loss'\]"):
        with loop.LoopTail(_config(), str(tmp_path), ckpt, 0, recipe="vlm", unit="examples") as tail:
            for step in range(7):
                tail.end_step(step + 1, {"loss": np.float32(math.nan if step == 2 else 1.0)}, {}, {}, None)
    assert ckpt.closed and ckpt.saved == []


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_at_the_step_boundary_then_stops_unfinished_and_handlers_are_restored(tmp_path, signum,
                                                                                            exit_code):
    before = signal.getsignal(signum)
    ckpt = FakeCheckpointer()
    stopped_at = None
    with pytest.raises(loop.Stopped) as stopped:  # raised on leaving the loop, after the checkpointer closed
        with loop.LoopTail(_config(num_steps=100, checkpoint_every=50), str(tmp_path), ckpt, 0, recipe="t2i") as tail:
            for step in range(100):
                if step == 4:
                    os.kill(os.getpid(), signum)
                if tail.end_step(step + 1, {"loss": np.float32(1.0)}, {}, {}, None):
                    stopped_at = step + 1
                    break
    assert stopped_at == 5 and [s[0] for s in ckpt.saved] == [5] and ckpt.closed
    assert (stopped.value.step, stopped.value.num_steps, stopped.value.exit_code) == (5, 100, exit_code)
    assert "stopped at step 5 of 100" in str(stopped.value)
    assert signal.getsignal(signum) is before


def test_a_cluster_preemption_notice_saves_and_stops_with_143(tmp_path):
    ckpt = FakeCheckpointer(preempt_at=2)
    with pytest.raises(loop.Stopped) as stopped:
        with loop.LoopTail(_config(), str(tmp_path), ckpt, 0, recipe="tokenizer") as tail:
            stops = [tail.end_step(s, {"loss": np.float32(1.0)}, {}, {}, None) for s in (1, 2)]
    assert stops == [False, True] and [s[0] for s in ckpt.saved] == [2]
    assert stopped.value.exit_code == loop.EXIT_STOPPED == 143


def test_a_signal_at_the_last_step_is_a_finished_run(tmp_path):
    """The last step's checkpoint is the finished model: leaving the loop raises nothing (exit 0)."""
    ckpt = FakeCheckpointer()
    with loop.LoopTail(_config(num_steps=3), str(tmp_path), ckpt, 0, recipe="t2i") as tail:
        for step in range(3):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            stop = tail.end_step(step + 1, {"loss": np.float32(1.0)}, {}, {}, None)
    assert stop and [s[0] for s in ckpt.saved] == [3]


def test_an_error_in_the_loop_is_not_hidden_by_a_stop(tmp_path):
    with pytest.raises(FloatingPointError):
        with loop.LoopTail(_config(num_steps=10, log_every=1), str(tmp_path), FakeCheckpointer(preempt_at=1), 0,
                           recipe="t2i") as tail:
            tail.end_step(1, {"loss": np.float32(1.0)}, {}, {}, None)  # stop requested, then a NaN
            tail.end_step(2, {"loss": np.float32(math.nan)}, {}, {}, None)


def test_resume_drops_rows_after_the_checkpoint_and_counts_throughput_from_there(tmp_path):
    with loop.LoopTail(_config(), str(tmp_path), FakeCheckpointer(), 0, recipe="t2i") as tail:
        for step in range(6):
            tail.end_step(step + 1, {"loss": np.float32(step)}, {}, {}, None)
    assert [r["step"] for r in _rows(str(tmp_path))] == [3, 6]
    # resumed from a checkpoint at step 4: the row of step 6 is repeated by the resumed run, not kept twice
    with loop.LoopTail(_config(), str(tmp_path), FakeCheckpointer(), 4, recipe="t2i") as tail:
        for step in range(4, 7):
            tail.end_step(step + 1, {"loss": np.float32(10 + step)}, {}, {}, None)
    rows = _rows(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 2.0), (6, 15.0), (7, 16.0)]
