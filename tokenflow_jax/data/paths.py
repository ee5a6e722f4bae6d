"""Paths written inside data files (a LLaVA record's ``image``, a manifest's shard ``file``) resolve under their
root, never outside it.

A data file may come from anywhere, so what it names is checked before anything is opened: an absolute path
(``/etc/passwd``), a ``..`` that climbs out of the root (``../outside/x.png``, ``a/../../x``) or a home path
(``~/x``) is refused with :class:`OutsideRootError`. The check is on the path as written (normalised), not on
where symlinks lead: a symlink inside the root was put there by whoever owns the root (image folders are often
links to other disks), while the data file only chooses the string.
"""
from __future__ import annotations

import os
import posixpath

from tokenflow_jax.errors import DataError


class OutsideRootError(DataError):
    """A data file names a path outside its root; ``path`` is the value as written."""

    def __init__(self, path: str, root: str):
        super().__init__(f"path {path!r} is outside {root!r} (absolute paths and '..' escapes are refused)")
        self.path, self.root = path, root


def resolve_under(root: str, path: str) -> str:
    """``root/path`` normalised, when ``path`` (relative, '/' or os.sep separated) stays under ``root``.

    Raises:
      OutsideRootError: ``path`` is absolute, starts with '~', has a drive, or its '..' parts leave ``root``.
    """
    text = str(path)
    unified = text.replace(os.sep, "/") if os.sep != "/" else text
    if not unified or unified.startswith(("/", "~")) or os.path.isabs(text) or os.path.splitdrive(text)[0]:
        raise OutsideRootError(text, root)
    normal = posixpath.normpath(unified)
    if normal == ".." or normal.startswith("../"):
        raise OutsideRootError(text, root)
    return os.path.join(root, *normal.split("/"))
