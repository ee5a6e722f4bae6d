"""The command line's error contract: a user error is one line and exit 2; a bug keeps its traceback."""
from __future__ import annotations

import pytest

from tokenflow_jax import cli, recipes
from tokenflow_jax.errors import CheckpointNotFoundError, ConfigError, UserError


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
