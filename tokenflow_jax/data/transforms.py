"""Pixel transforms of the reference's training and evaluation (ByteFlow-AI/TokenFlow
``tokenflow/dataset/augmentation.py``: ``random_crop_arr`` as ``tokenflow/tokenizer/vq_train.py`` uses it,
``center_crop_arr`` as ``tokenflow/tokenizer/reconstruction_vq_ddp.py`` does).

Training: ADM random-resized crop -> random horizontal flip -> [-1, 1]. Evaluation: ADM centre crop ->
[-1, 1]. All randomness comes from the ``np.random.Generator`` passed in, which grain's ``random_map``
derives from (seed, element index): never the global numpy or Python RNG, so any element can be
recomputed on resume.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from tokenflow_jax.data import images


def adm_random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """ADM's ``random_crop_arr`` (guided-diffusion, used by LlamaGen/TokenFlow) -> uint8 [size, size, 3].

    The short side is resized to a length drawn uniformly from [ceil(size / max_crop_frac),
    ceil(size / min_crop_frac)] (inclusive; [size, ceil(size / 0.8)] by default): halve with a BOX filter
    while the short side is at least twice that length, then bicubic; then crop ``size`` x ``size`` at a
    uniformly random offset. A picture smaller than ``size`` is therefore upscaled, never rejected.

    Args:
      img: an RGB PIL image of any size.
      rng: the per-element generator; draws: target length, crop row, crop column (in this order).
    """
    # Same float expressions as the reference so the range is identical (e.g. ceil(256 / 0.8) = 320).
    low, high = math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac)
    short_target = int(rng.integers(low, high + 1))
    while min(img.size) >= 2 * short_target:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = short_target / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = int(rng.integers(arr.shape[0] - size + 1))
    left = int(rng.integers(arr.shape[1] - size + 1))
    return arr[top : top + size, left : left + size]


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop (BOX halving, bicubic short side -> ``size``, centre) -> uint8 [size, size, 3]."""
    return images.center_crop(img, size)


def random_flip(arr: np.ndarray, rng: np.random.Generator, prob: float = 0.5) -> np.ndarray:
    """Mirrors [H, W, C] left-right with probability ``prob`` (one draw from ``rng``)."""
    return arr[:, ::-1] if rng.random() < prob else arr


def normalize(arr: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5), as the reference)."""
    return images.uint8_to_model(np.ascontiguousarray(arr))
