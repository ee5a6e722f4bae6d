"""Robust decoding: any record's ``image`` -> an RGB PIL image, with bad records counted, never fatal.

Convertible inputs (greyscale, palette, alpha, CMYK, 16-bit, smaller than the crop) become RGB and are
flagged in ``converted``; undecodable ones (empty, not an image, truncated, unreadable, malformed array)
are *replaced* in training by another record (``data/replacement.py``: the next one, pseudo-random ones of
the shard, then images found usable before training) and flagged in ``skipped``, or in evaluation kept as an
invalid element (``valid=False``) so the count of evaluated images stays exact. Replacement is a pure
function of the index, so the pipeline stays deterministic and resumable, and the batch size never changes.

The counts travel with the elements (per-element one-hot vectors that batches sum), because grain's
worker processes cannot share a counter with the trainer.

Decoded record (what :class:`DecodeImages` yields)::

    image      PIL.Image (RGB) or None (evaluation, bad record)
    caption    str              '' if the source has none
    label      np.int32         -1 if the source has none
    index      np.int32         index of the record in the full source, -1 if unknown
    valid      np.bool_         False only for an undecodable record in evaluation (and for padding)
    skipped    int32 [len(SKIP_REASONS)]  one-hot reason this element's own record was bad, else zeros
    bad_images np.int32         1 if this element's own record was bad (= skipped.sum()), else 0
    converted  int32 [len(CONVERSIONS)]   conversions applied to the image actually delivered
"""
from __future__ import annotations

import io
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from tokenflow_jax.data import images, replacement
from tokenflow_jax.errors import DataError

SKIP_REASONS: tuple[str, ...] = ("empty", "not_image", "corrupt", "unreadable", "bad_array", "other")
CONVERSIONS: tuple[str, ...] = ("grey", "palette", "alpha", "cmyk", "high_bit_depth", "other_mode", "upscaled")

# PIL mode of the stored image -> conversion it needs ('RGB' needs none; anything unlisted: other_mode).
_MODE_CONVERSION = {
    "1": "grey", "L": "grey", "P": "palette", "PA": "alpha", "LA": "alpha", "La": "alpha",
    "RGBA": "alpha", "RGBa": "alpha", "CMYK": "cmyk", "I": "high_bit_depth", "F": "high_bit_depth",
}  # fmt: skip
_LOG_LIMIT = 20  # bad records logged per process; the counts carry the rest
_logged = [0]

logger = logging.getLogger(__name__)


class BadRecord(DataError):
    """A record whose image cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def skip_reason(error: BaseException) -> str:
    """Maps a decoding failure to one of :data:`SKIP_REASONS`."""
    if isinstance(error, BadRecord):
        return error.reason
    if isinstance(error, images.ImageReadError):
        reason = error.reason
        if reason.startswith("empty"):
            return "empty"
        if reason.startswith("not an image"):
            return "not_image"
        if reason.startswith("corrupt"):
            return "corrupt"
        return "unreadable"  # no such file, permission denied, is a directory
    if isinstance(error, OSError):
        return "unreadable"
    return "other"


def _array_to_pil(arr: np.ndarray, name: str) -> Image.Image:
    """A decoded array -> PIL image in its natural mode (uint8 L/RGB/RGBA, uint16 I;16)."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    ok_uint8 = arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)))
    ok_uint16 = arr.dtype == np.uint16 and arr.ndim == 2
    if not (ok_uint8 or ok_uint16) or arr.size == 0:
        raise BadRecord("bad_array", f"{name}: expected uint8 [H, W(, 1|3|4)] or uint16 [H, W], got {arr.dtype} "
                        f"{arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _bytes_to_pil(data: bytes, name: str) -> tuple[Image.Image, str]:
    """Encoded bytes -> (RGB image, stored mode), or ImageReadError."""
    rgb = images.read_image(data, name=name)  # all of images.py's error handling
    # The stored mode, for the conversion counts: the header alone, no second decode.
    with Image.open(io.BytesIO(data)) as header:
        return rgb, header.mode


def decode_to_rgb(image: Any, name: str = "<record>") -> tuple[Image.Image, str]:
    """A record's ``image`` -> (RGB PIL image, the mode it was stored in).

    ``image`` may be a file path, encoded bytes (also as a 1-D uint8 array), a decoded uint8 [H, W(, C)]
    or uint16 [H, W] array, or a PIL image.

    Raises:
      images.ImageReadError or BadRecord: the image cannot be used (see :func:`skip_reason`).
    """
    if image is None:
        raise BadRecord("unreadable", f"{name}: the record has no image")
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        try:  # read once: the bytes serve both the decode and the header peek
            image = pathlib.Path(image).read_bytes()
        except OSError as e:
            raise BadRecord("unreadable", f"{name}: {e.strerror or e}") from None
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 1:
        image = image.tobytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _bytes_to_pil(bytes(image), name)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, name)
    if not isinstance(image, Image.Image):
        raise BadRecord("bad_array", f"{name}: cannot decode an image of type {type(image).__name__}")
    return images.to_rgb(image), image.mode


def conversion_flags(stored_mode: str, size_wh: tuple[int, int], image_size: int) -> np.ndarray:
    """int32 [len(CONVERSIONS)]: which conversions an image of ``stored_mode`` and size needed."""
    flags = np.zeros(len(CONVERSIONS), np.int32)
    if stored_mode != "RGB":
        kind = "high_bit_depth" if stored_mode.startswith("I;16") else _MODE_CONVERSION.get(stored_mode, "other_mode")
        flags[CONVERSIONS.index(kind)] = 1
    if min(size_wh) < image_size:
        flags[CONVERSIONS.index("upscaled")] = 1
    return flags


def skip_flags(reason: str | None) -> np.ndarray:
    """int32 [len(SKIP_REASONS)]: one-hot ``reason``, zeros for None."""
    flags = np.zeros(len(SKIP_REASONS), np.int32)
    if reason is not None:
        flags[SKIP_REASONS.index(reason)] = 1
    return flags


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def decode_record(record: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """A source record -> the decoded record of the module docstring (``skipped`` all zeros).

    Raises:
      images.ImageReadError or BadRecord: the record's image cannot be used.
    """
    index = record.get("index", -1)
    name = record.get("path") or f"record {index}"
    img, stored_mode = decode_to_rgb(record.get("image"), str(name))
    return {
        "image": img,
        "caption": _text(record.get("caption")),
        "label": np.int32(record.get("label", -1)),
        "index": np.int32(index),
        "valid": np.bool_(True),
        "skipped": skip_flags(None),
        "bad_images": np.int32(0),
        "converted": conversion_flags(stored_mode, img.size, image_size),
    }


def invalid_record(record: Mapping[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
    """A placeholder element: no image, ``valid=False``; caption, label and index kept from ``record``
    (the source record of a bad image in evaluation) or empty (padding)."""
    record = record or {}
    return {
        "image": None,
        "caption": _text(record.get("caption")),
        "label": np.int32(record.get("label", -1)),
        "index": np.int32(record.get("index", -1)),
        "valid": np.bool_(False),
        "skipped": skip_flags(reason),
        "bad_images": np.int32(reason is not None),
        "converted": np.zeros(len(CONVERSIONS), np.int32),
    }


def _log_bad(index: int, error: BaseException) -> None:
    if _logged[0] < _LOG_LIMIT:
        _logged[0] += 1
        suffix = " (further bad records are only counted)" if _logged[0] == _LOG_LIMIT else ""
        logger.warning("skipping bad record at shard index %d: %s%s", index, error, suffix)


def _decode_at(dataset, index: int, image_size: int
               ) -> tuple[dict[str, Any] | None, BaseException | None, Mapping[str, Any] | None]:
    """(decoded record, None, source record) or (None, error, source record if it could be read)."""
    record = None
    try:
        record = dataset[index]
        if record is None:
            raise BadRecord("other", "the source returned None")
        return decode_record(record, image_size), None, record
    except Exception as e:  # any failure of one record must not end the run: count it instead
        return None, e, record


def survey(source_dataset, image_size: int, *, what: str) -> replacement.Survey:
    """:func:`replacement.survey` of a MapDataset of source records (the whole source, indexed): which sampled
    images decode. Raises DataError naming ``what`` when none does."""

    def check(index: int) -> str | None:
        _, error, _ = _decode_at(source_dataset, index, image_size)
        return None if error is None else skip_reason(error)

    return replacement.survey(check, len(source_dataset), what=what, noun="image",
                              hint="check config.data.path / config.data.source")


class DecodeImages(grain.MapDataset):
    """Decodes every element of ``parent`` (source records); see the module docstring.

    Args:
      parent: a MapDataset of source records (with an ``index`` field, see ``pipeline.AttachIndex``).
      image_size: the crop size, only to flag images that will be upscaled.
      replace_bad: True (training): a bad element is replaced as ``data/replacement.py`` says; False
        (evaluation): it becomes :func:`invalid_record`.
      budget: shard records probed for a replacement (``replacement.probe_budget``).
      source, pool: the whole indexed source (a MapDataset) and the indices of records in it that
        :func:`survey` found usable: the replacements of last resort.
    """

    def __init__(self, parent: grain.MapDataset, *, image_size: int, replace_bad: bool, budget: int = 32,
                 source: grain.MapDataset | None = None, pool: tuple[int, ...] = ()):
        super().__init__(parent)
        self._image_size, self._replace_bad, self._budget = image_size, replace_bad, budget
        self._source, self._pool = source, tuple(pool) if source is not None else ()

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"DecodeImages(image_size={self._image_size}, replace_bad={self._replace_bad})"

    def _try_shard(self, index: int) -> tuple[dict[str, Any] | None, BaseException | None]:
        return _decode_at(self._parent, index, self._image_size)[:2]

    def _try_source(self, index: int) -> tuple[dict[str, Any] | None, BaseException | None]:
        return _decode_at(self._source, index, self._image_size)[:2]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index %= len(self._parent)  # parents take indices modulo their length; the probes need it in range
        decoded, error, record = _decode_at(self._parent, index, self._image_size)
        if error is None:
            return decoded
        _log_bad(index, error)
        reason = skip_reason(error)
        if not self._replace_bad:
            return invalid_record(record, reason)
        decoded, errors = replacement.find_replacement(index, len(self._parent), self._budget, self._pool,
                                                       self._try_shard, self._try_source)
        if decoded is None:
            raise replacement.out_of_candidates(index, self._budget, self._pool, [error] + errors, "images")
        decoded["skipped"], decoded["bad_images"] = skip_flags(reason), np.int32(1)
        return decoded
