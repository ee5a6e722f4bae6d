"""Ragged last batches: every compiled call sees the same batch shape, the padding rows are dropped after."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def bucket_length(n: int, per_octave: int = 8) -> int:
    """``n`` rounded up to one of ``per_octave`` (a power of two) evenly spaced lengths per power of two (at most
    1/per_octave of padding; 8 per octave: 80 -> 80, 81 -> 88, 1000 -> 1024), so that inputs of many lengths share
    a few compiled programs."""
    if per_octave < 1 or per_octave & (per_octave - 1):
        raise ValueError(f"bucket_length: per_octave must be a power of two, got {per_octave}")
    if n <= per_octave:
        return max(n, 0)
    step = 1 << max((n - 1).bit_length() - 1 - (per_octave.bit_length() - 1), 0)
    return round_up(n, step)


def pad_rows(rows: Sequence[T] | np.ndarray, size: int) -> list[T] | np.ndarray:
    """``rows`` (a non-empty list or an array over its first axis) grown to ``size`` by repeating the last row:
    padding rows are real inputs (no NaNs, no special cases in the program) whose outputs the caller drops."""
    count = len(rows)
    if count == 0 or count > size:
        raise ValueError(f"pad_rows: cannot pad {count} rows to {size}")
    if isinstance(rows, np.ndarray):
        return np.concatenate([rows, np.repeat(rows[-1:], size - count, axis=0)]) if size > count else rows
    return list(rows) + [rows[-1]] * (size - count)
