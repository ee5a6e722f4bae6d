"""Our ArrayRecord format: one msgpack-encoded dict per record, read back by :class:`ArrayRecordSource`.

msgpack rather than pickle: reading a file can never run code. Values may be bytes, str, int, float,
bool, None, lists/dicts of those, or numpy arrays (stored as dtype + shape + raw bytes; object arrays
are refused). Typical record: ``{"image": <JPEG/PNG bytes>, "caption": "...", "label": 3}``.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter

from tokenflow_jax.errors import DataError, InputNotFoundError

_NDARRAY_EXT = 1  # msgpack extension type code for numpy arrays


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays cannot be stored (they would need pickle)")
        header = msgpack.packb([obj.dtype.str, list(obj.shape)])
        return msgpack.ExtType(_NDARRAY_EXT, header + np.ascontiguousarray(obj).tobytes())
    raise TypeError(f"cannot store a value of type {type(obj).__name__} in an ArrayRecord record")


def _decode_ext(code: int, data: bytes) -> Any:
    if code != _NDARRAY_EXT:
        raise DataError(f"unknown msgpack extension type {code}")
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    offset = unpacker.tell()
    return np.frombuffer(data, dtype=np.dtype(dtype), offset=offset).reshape(shape).copy()


def serialize_record(record: Mapping[str, Any]) -> bytes:
    """dict -> bytes (msgpack, numpy arrays as an extension type)."""
    return msgpack.packb(dict(record), default=_encode_default, use_bin_type=True)


def deserialize_record(data: bytes) -> dict[str, Any]:
    """bytes -> dict; the inverse of :func:`serialize_record`."""
    return msgpack.unpackb(data, ext_hook=_decode_ext, raw=False, strict_map_key=False)


def write_array_record(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Writes ``records`` to one ArrayRecord file and returns how many were written.

    ``group_size:1`` makes every record its own chunk: random access (what grain does) reads one record.
    """

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(serialize_record(record))
            count += 1
    finally:
        writer.close()
    return count


def resolve_paths(paths_or_glob: str | Sequence[str]) -> list[str]:
    """A path, a glob pattern, a comma-separated list of them, or a sequence of them -> sorted file list."""
    items = paths_or_glob.split(",") if isinstance(paths_or_glob, str) else list(paths_or_glob)
    out: list[str] = []
    for item in (os.path.expanduser(os.fspath(i).strip()) for i in items):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else ([item] if os.path.isfile(item) else [])
        if not matches:
            raise InputNotFoundError(f"ArrayRecord path {item!r} matches no file")
        out.extend(matches)
    return out


class ArrayRecordSource:
    """Records written by :func:`write_array_record`, over one or more files in the given order.

    Picklable: the underlying readers open lazily, in each grain worker.
    """

    def __init__(self, paths_or_glob: str | Sequence[str]):
        self.paths = resolve_paths(paths_or_glob)
        self._source = ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return deserialize_record(self._source[index])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"
