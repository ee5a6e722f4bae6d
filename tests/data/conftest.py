"""Fixtures for the data tests."""
import os

import pytest

from tests.data.helpers import broken_folder_files


@pytest.fixture
def broken_folder(tmp_path):
    """(root, files) for a flat folder of :func:`broken_folder_files`, plus a caption for a_good.png."""
    root = tmp_path / "images"
    root.mkdir()
    files = broken_folder_files()
    for name, (data, *_) in files.items():
        (root / name).write_bytes(data)
    (root / "a_good.txt").write_text("a red rectangle\n")
    return os.fspath(root), files
