"""The errors a person running a command can fix: a config field, a checkpoint, a weights file, the data.

Each names the field, file or key and what was expected, in one message. ``tokenflow-jax`` prints a
:class:`UserError` as one line (``error: ...``) and exits with status 2; every other exception is a bug and
keeps its traceback. ``TOKENFLOW_DEBUG=1`` shows the traceback of a user error too.

Each class also derives from the builtin it refines (``ValueError``, ``FileNotFoundError``), so code that
catches those keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: fix the named config field, file or key and run the same command again."""


class ConfigError(UserError, ValueError):
    """A config field (``config.x.y``, a ``--config`` file or a command-line flag) has a value that cannot work."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, or does not match the model the config builds."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for."""


class DataError(UserError, ValueError):
    """Input data that cannot be used: a dataset, a file of prompts or questions, a record, an image."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the command was given does not exist."""
