"""Naming the file an I/O failure is about: TensorStore's long messages, undecodable JSON found by its content,
a full disk that names no file, and a bug that is left alone."""
import errno
import json
import sys
import types

import pytest
from etils import epath

from tokenflow_jax.utils import file_errors

TENSORSTORE = (
    'OUT_OF_RANGE: Error opening "zarr" driver: Error reading "params.w/.zarray" in OCDBT database at local file '
    '"{root}/5/variables/": Error reading Byte range [0, 266) of local file "{root}/5/variables/d/cecb": Requested '
    'byte range [0, 266) is not valid for value of size 133 [source locations=\'tensorstore/kvstore/byte_range.cc:'
    '40\'] [tensorstore_spec=\'{{"kvstore":{{"path":"{root}/5/variables/"}}}}\']'
)


def test_the_last_file_a_tensorstore_error_quotes_and_what_it_says_after_it():
    error = ValueError(TENSORSTORE.format(root="/run/ckpt"))
    assert file_errors.file_problem(epath.Path("/run/ckpt/5"), error) == (
        "/run/ckpt/5/variables/d/cecb", "Requested byte range [0, 266) is not valid for value of size 133")
    # raised from another error: the chain is searched
    try:
        try:
            raise error
        except ValueError as inner:
            raise RuntimeError("restore failed") from inner
    except RuntimeError as outer:
        assert file_errors.file_problem(epath.Path("/run/ckpt"), outer)[0] == "/run/ckpt/5/variables/d/cecb"
    # a file elsewhere is not this folder's problem
    assert file_errors.file_problem(epath.Path("/other"), error) is None


def test_undecodable_json_is_found_by_its_content(tmp_path):
    (tmp_path / "variables" / "d").mkdir(parents=True)
    (tmp_path / "variables" / "d" / "chunk").write_bytes(b"\x00\xff binary, skipped")
    (tmp_path / "variables" / "_METADATA").write_text('{"tree": {"params": {"w"')
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "metadata").write_text('{"step": 3}')
    try:
        json.loads((tmp_path / "variables" / "_METADATA").read_text())
    except json.JSONDecodeError as error:
        file, reason = file_errors.file_problem(epath.Path(tmp_path), error)
    assert file == str(tmp_path / "variables" / "_METADATA")
    assert reason.startswith("Expecting") or reason.startswith("Unterminated")


def test_a_full_disk_that_names_no_file_names_the_folder_and_a_bug_is_left_alone(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert file_errors.file_problem(epath.Path(tmp_path), full) == (str(tmp_path), "No space left on device")
    assert file_errors.file_problem(epath.Path(tmp_path), ValueError("shapes (4,) and (3,) differ")) is None
    assert file_errors.file_problem(epath.Path(tmp_path), KeyError("params")) is None


@pytest.mark.parametrize("text,expected", [
    ("DATA_LOSS: Error decoding manifest  [source locations='x']", "Error decoding manifest"),
    ("x" * 400, "x" * 297 + "..."),
])
def test_one_line(text, expected):
    assert file_errors.one_line(text) == expected


def test_the_leftovers_of_a_failed_orbax_read_are_dropped_and_other_unraisables_kept(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    file_errors.drop_orbax_leftovers()
    file_errors.drop_orbax_leftovers()  # installed once
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), exc_traceback=None)
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"), exc_traceback=None)
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other]
