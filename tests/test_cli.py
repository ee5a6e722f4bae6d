"""The command line's exit contract: a user error is one line and exit 2, before anything is created; a bug keeps
its traceback; a run stopped by SIGTERM before its last step exits 143, a finished one 0."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from tokenflow_jax import cli, recipes
from tokenflow_jax.errors import CheckpointNotFoundError, ConfigError, UserError
from tokenflow_jax.train import loop


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_an_unknown_config_field_is_one_line_naming_it(tmp_path, capsys):
    rc = cli.main(["train", "--config", "configs/tokenizer.py:tiny", "--workdir", str(tmp_path),
                   "--config.train.num_stepz=3"])
    assert rc == 2
    assert "num_stepz" in _one_error_line(capsys)


def test_a_missing_checkpoint_is_one_line_naming_the_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = cli.main(["eval", "--config", "configs/tokenizer.py:tiny", "--checkpoint", str(missing), "--no-fid"])
    assert rc == 2
    assert str(missing) in _one_error_line(capsys)


def test_a_missing_config_is_a_user_error(capsys):
    """`eval` takes its config from --config or the checkpoint; with neither it cannot start."""
    assert cli.main(["eval", "--no-fid"]) == 2
    assert "--config FILE:ARG is required" in _one_error_line(capsys)


class _Trainer:
    def __init__(self, error):
        self.error = error

    def train(self, config, workdir):
        raise self.error


def test_a_bug_keeps_its_traceback_even_when_it_is_a_value_error(tmp_path, monkeypatch):
    """Builtin ValueError / KeyError / TypeError raised by the code are bugs: not swallowed into 'error: ...'."""
    for bug in (ValueError("shapes [2, 3] and [3, 2] differ"), KeyError("params"), TypeError("unhashable")):
        monkeypatch.setattr(recipes, "trainer", lambda config, bug=bug: _Trainer(bug))
        with pytest.raises(type(bug)) as raised:
            cli.main(["train", "--config", "configs/tokenizer.py:tiny", "--workdir", str(tmp_path)])
        assert raised.value is bug


def test_user_errors_show_their_traceback_with_tokenflow_debug(tmp_path, monkeypatch, capsys):
    error = ConfigError("config.train.global_batch_size=3 does not divide over 2 devices")
    monkeypatch.setattr(recipes, "trainer", lambda config: _Trainer(error))
    argv = ["train", "--config", "configs/tokenizer.py:tiny", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert _one_error_line(capsys) == f"error: {error}"
    monkeypatch.setenv("TOKENFLOW_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.main(argv)


def test_user_errors_are_the_builtins_they_refine():
    """Code that catches ValueError / FileNotFoundError around a call keeps catching these."""
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError) and issubclass(CheckpointNotFoundError, UserError)
    assert not issubclass(UserError, ValueError)  # the base class alone is not a ValueError: bugs stay bugs


class _SignalledTrainer:
    """A trainer whose loop (the real LoopTail, a checkpointer that saves nothing) is sent ``signum`` at step ``at``."""

    def __init__(self, signum, at):
        self.signum, self.at = signum, at

    def train(self, config, workdir):
        class Checkpointer:
            def save(self, *args, **kwargs):
                return True

            def reached_preemption(self, step):
                return False

            def close(self):
                pass

        with loop.LoopTail(config, workdir, Checkpointer(), 0, recipe="tokenizer") as tail:
            for step in range(int(config.train.num_steps)):
                if step + 1 == self.at:
                    os.kill(os.getpid(), self.signum)
                if tail.end_step(step + 1, {"loss": np.float32(1.0)}, {}, {}, None):
                    break
        return tail.last


@pytest.mark.parametrize("at, expected", [(2, 143), (4, 0)])
def test_a_run_stopped_by_sigterm_before_its_last_step_exits_143_a_finished_one_0(tmp_path, monkeypatch, capsys, at,
                                                                                  expected):
    monkeypatch.setattr(recipes, "trainer", lambda config: _SignalledTrainer(signal.SIGTERM, at))
    rc = cli.main(["train", "--config", "configs/tokenizer.py:tiny", "--workdir", str(tmp_path / "run"),
                   "--config.train.num_steps=4", "--config.train.log_every=1"])
    assert rc == expected
    err = capsys.readouterr().err
    assert ("stopped at step 2 of 4" in err) == (expected == 143) and "Traceback" not in err


def test_a_workdir_that_is_a_file_is_one_line_before_anything_is_created(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipes, "trainer", lambda config: pytest.fail("the trainer must not start"))
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for workdir in (afile, afile / "run"):
        assert cli.main(["train", "--config", "configs/tokenizer.py:tiny", "--workdir", str(workdir)]) == 2
        assert f"--workdir {workdir}" in _one_error_line(capsys)
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert cli.main(["demo", "--workdir", str(afile)]) == 2
    assert "is a file" in _one_error_line(capsys)


@pytest.mark.parametrize("override, expected", [
    ("--config.train.global_batch_size=-8", "config.train.global_batch_size=-8: must be >= 1"),
    ("--config.train.global_batch_size=3", "config.train.global_batch_size=3 does not divide over the 8 data-parallel"),
    ("--config.train.keep_checkpoints=0", "config.train.keep_checkpoints=0: must be >= 1"),
])
def test_batch_and_range_errors_come_before_the_workdir_exists(tmp_path, monkeypatch, capsys, override, expected):
    monkeypatch.setattr(recipes, "trainer", lambda config: pytest.fail("the trainer must not start"))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "configs/tokenizer.py:tiny", "--workdir", str(workdir), override]) == 2
    assert expected in _one_error_line(capsys)
    assert not workdir.exists()
