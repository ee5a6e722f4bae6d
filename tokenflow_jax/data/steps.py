"""The pipeline's own grain steps, kept apart from ``pipeline.py``: grain's spawned worker processes
unpickle them and so import this module, which needs only grain, numpy and PIL (no flax, no models).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from tokenflow_jax.data import decode, transforms


class AttachIndex:
    """``map_with_index`` step: records the element's index in the full source (before sharding)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        # Indices past the end come from later epochs; the record is the same one.
        return {**record, "index": index % self.length}


class TrainImage:
    """``random_map`` step: decoded record -> ``image`` float32 [S, S, 3] (ADM or centre crop, flip)."""

    def __init__(self, image_size: int, crop: str = "adm", random_flip: bool = True):
        self.image_size, self.crop, self.random_flip = image_size, crop, random_flip

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self.crop == "adm":
            pixels = transforms.adm_random_resized_crop(record["image"], self.image_size, rng)
        else:
            pixels = transforms.center_crop(record["image"], self.image_size)
        if self.random_flip:
            pixels = transforms.random_flip(pixels, rng)
        return {**record, "image": transforms.normalize(pixels)}


class EvalImage:
    """``map`` step: decoded record -> ``image`` float32 [S, S, 3] (centre crop; zeros when invalid)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["image"] is None:
            pixels = np.zeros((self.image_size, self.image_size, 3), np.float32)
        else:
            pixels = transforms.normalize(transforms.center_crop(record["image"], self.image_size))
        return {**record, "image": pixels}


class PadToLength(grain.MapDataset):
    """Appends ``decode.invalid_record()`` (padding) elements up to ``length`` (evaluation's last partial batch)."""

    def __init__(self, parent: grain.MapDataset, length: int):
        super().__init__(parent)
        if length < len(parent):
            raise ValueError(f"cannot pad {len(parent)} elements to {length}")
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index %= self._length  # MapDataset convention: indices wrap around
        return self._parent[index] if index < len(self._parent) else decode.invalid_record()
