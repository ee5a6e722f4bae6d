"""Which stored file an I/O failure is about, in one line: the checkpoint code turns a TensorStore, JSON or OS
error raised deep inside orbax into a user error that names the damaged (or unwritable) file and what went wrong.

TensorStore reports a failure as one long message with an absl status prefix, the chain of operations, each file
quoted, and bracketed debugging fields::

    OUT_OF_RANGE: Error opening "zarr" driver: Error reading "params.w/.zarray" in OCDBT database at local file
    "/run/checkpoints/5/variables/": Error reading Byte range [0, 266) of local file
    "/run/checkpoints/5/variables/d/cecb...": Requested byte range [0, 266) is not valid for value of size 133
    [source locations='...']

of which the last quoted file and the text after it are what a person needs.
"""
from __future__ import annotations

import errno
import json
import re
import sys
import traceback

from etils import epath

_STATUS = re.compile(r"^[A-Z_]+: ")  # the absl status prefix, e.g. 'DATA_LOSS: '
_NOISE = re.compile(r"\s*\[(?:source locations|tensorstore_spec|os_error_code)=.*$", re.S)
_QUOTED = re.compile(r'"([^"]+)"')
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
_NOT_JSON = ("manifest.ocdbt", "commit_success.txt")  # a checkpoint's binary and plain-text files besides d/


def _chain(error: BaseException | None):
    """``error`` and the exceptions it was raised from or during, newest first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def one_line(text: str, limit: int = 300) -> str:
    """``text`` without the status prefix and the bracketed debugging fields, on one line of at most ``limit``."""
    text = " ".join(_NOISE.sub("", _STATUS.sub("", text.strip())).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _files(folder: epath.Path):
    """The files under ``folder``, sorted, except those under a ``d/`` folder (array chunks). (epath has no
    recursive glob for local paths.)"""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            if path.name != "d":
                yield from _files(path)
        else:
            yield path


def broken_json_file(folder: epath.Path, document: str | None = None) -> str | None:
    """The JSON file under ``folder`` that holds ``document`` (the text a decoder rejected), else the first one that
    does not decode; None when every one does. Array chunks (files under a ``d/`` folder) and the binary
    manifests are not JSON and are skipped."""
    broken = None
    for path in _files(folder):
        if path.name in _NOT_JSON:
            continue
        try:
            text = path.read_bytes().decode()
            if document is not None and text == document:
                return str(path)
            json.loads(text)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            broken = broken or str(path)
    return broken


def file_problem(folder: epath.Path, error: BaseException) -> tuple[str, str] | None:
    """``(file, reason)`` when ``error`` (or one it was raised from) is a failure to read or write a file under
    ``folder``: an OSError on such a file, a JSON document that does not decode (the file is found by its
    content), a TensorStore error that quotes such a file, or a storage OSError (full disk, quota, read-only,
    I/O error, permission) that names no file (then ``folder`` is named). None for anything else: a bug keeps its
    exception."""
    root = str(folder)
    for e in _chain(error):
        if isinstance(e, OSError) and e.filename and str(e.filename).startswith(root):
            return str(e.filename), one_line(e.strerror or str(e))
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            document = e.doc if isinstance(e, json.JSONDecodeError) else None
            return broken_json_file(folder, document) or root, one_line(str(e))
        if isinstance(e, (ValueError, RuntimeError, OSError)):
            text = _NOISE.sub("", str(e))  # a tensorstore_spec quotes every path of the store
            quoted = [m for m in _QUOTED.finditer(text) if m.group(1).startswith(root)]
            if quoted:
                rest = text[quoted[-1].end():]
                reason = one_line(rest[1:]) if rest.startswith(":") else ""
                return quoted[-1].group(1), reason or one_line(text)
    for e in _chain(error):  # a failed write() on an open file names no file: the folder's storage is at fault
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return root, one_line(e.strerror or str(e))
    return None


def drop_orbax_leftovers() -> None:
    """After a TensorStore read or write fails, the operations still in flight fail too, into orbax's coroutines
    or its already closed event loop, and Python prints each as 'Exception ignored in ...' with a traceback and a
    TensorStore spec (dozens of lines each); they say nothing the error does not. Installs (once) an
    unraisable-exception hook that drops exactly those and passes on the rest."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_leftovers", False):
        return

    def hook(unraisable):
        value, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
        closed_loop = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        if not (closed_loop or (frames and "orbax" in frames[-1].filename)):
            previous(unraisable)

    hook.drops_orbax_leftovers = True
    sys.unraisablehook = hook
