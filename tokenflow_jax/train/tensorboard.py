"""A dependency-free TensorBoard event-file writer (scalars and PNG images).

TensorFlow stays out of the environment (ENV_NOTES), so the few protobuf messages TensorBoard reads
are encoded by hand: ``Event{wall_time, step, file_version | summary}``,
``Summary{value: [Value{tag, simple_value | image}]}``, ``Image{height, width, colorspace,
encoded_image_string}``, framed as TFRecords (length, masked CRC-32C of the length, payload,
masked CRC-32C of the payload). ``read_events`` parses the same format back for tests and tools.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

# ------------------------------------------------------------------------------------------ CRC-32C
_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecords use."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------------- protobuf wire format
def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _value_scalar(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value))


def _value_image(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
    image = _key(1, 0) + _varint(height) + _key(2, 0) + _varint(width) + _key(3, 0) + _varint(channels)
    image += _bytes_field(4, png)
    return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


def _event(step: int, *, summary_values: list[bytes] | None = None, file_version: str | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", time.time()) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary_values:
        out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in summary_values))
    return out


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


class EventWriter:
    """Appends scalar and image summaries to ``logdir/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(_record(_event(0, file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._file.write(_record(_event(step, summary_values=[_value_scalar(k, v) for k, v in values.items()])))

    def image(self, step: int, tag: str, png: bytes, height: int, width: int, channels: int = 3) -> None:
        self._file.write(_record(_event(step, summary_values=[_value_image(tag, png, height, width, channels)])))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------- reading
def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, value


def read_events(path: str) -> list[dict[str, Any]]:
    """[{'step', 'wall_time', 'scalars': {tag: value}, 'images': {tag: png}}], checking every CRC."""
    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc32c(header):
            raise ValueError(f"{path}: corrupt record length at byte {pos}")
        payload = data[pos + 12 : pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] != masked_crc32c(payload):
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += 16 + length
        event: dict[str, Any] = {"step": 0, "scalars": {}, "images": {}}
        for field, value in _fields(payload):
            if field == 1:
                event["wall_time"] = struct.unpack("<d", value)[0]
            elif field == 2:
                event["step"] = value
            elif field == 3:
                event["file_version"] = value.decode()
            elif field == 5:
                for _, raw_value in _fields(value):
                    parts = dict(_fields(raw_value))
                    tag = parts[1].decode()
                    if 2 in parts:
                        event["scalars"][tag] = struct.unpack("<f", parts[2])[0]
                    if 4 in parts:
                        event["images"][tag] = dict(_fields(parts[4]))[4]
        events.append(event)
    return events
