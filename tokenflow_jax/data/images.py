"""Reading images of any kind into RGB, the reference's centre crop, and the [-1, 1] <-> uint8 maps.

Every decoding problem becomes an :class:`ImageReadError` naming the file and the reason, so callers
can skip and count bad inputs instead of dying on them.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from tokenflow_jax.errors import DataError

# Truncated files must raise, never decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# scikit-image photos that ship inside its wheel (no download): the quick start's sample images.
BUILTIN_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera")


class ImageReadError(DataError):
    """An image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path, self.reason = path, reason


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale -> 8-bit 'L', scaled by the mode's range."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 65535.0
    elif img.mode == "I":
        hi = float(arr.max()) if arr.size else 1.0
        arr = arr.astype(np.float64) / (65535.0 if hi > 255 else 255.0)
    else:  # 'F': assume [0, 1] when it looks like it, else min-max
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            arr = (arr - lo) / max(hi - lo, 1e-12)
    return Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB'. Transparency is composited on white; CMYK/YCbCr/palette converted;
    16-bit and float greyscale rescaled to 8 bits."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def read_image(source: str | bytes, name: str | None = None) -> Image.Image:
    """Decodes a file path or encoded bytes into an RGB PIL image (fully loaded).

    Raises:
      ImageReadError: missing/unreadable path, empty file, not an image, truncated or corrupt data.
    """
    label = name or (source if isinstance(source, str) else "<bytes>")
    try:
        if isinstance(source, str):
            if os.path.isdir(source):
                raise ImageReadError(label, "is a directory")
            if os.path.getsize(source) == 0:
                raise ImageReadError(label, "empty file (0 bytes)")
            handle = open(source, "rb")
        else:
            if not source:
                raise ImageReadError(label, "empty data (0 bytes)")
            handle = io.BytesIO(source)
        with handle, Image.open(handle) as img:
            img.load()
            return to_rgb(img)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(label, "no such file") from None
    except PermissionError:
        raise ImageReadError(label, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(label, "not an image (PIL cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(label, f"corrupt or truncated image data ({e})") from None


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The reference's ADM centre crop -> uint8 [size, size, 3].

    Halve with a box filter while the short side is at least 2 * size, resize the short side to
    ``size`` with bicubic, then crop the centre.
    """
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def uint8_to_model(arr: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5), as the reference)."""
    return ((arr.astype(np.float32) / 255.0) - 0.5) / 0.5


def uint8_levels(x, xp=np):
    """[-1, 1] floats -> the reference's uint8 levels floor(clamp(127.5 * x + 128, 0, 255)), still as
    floats; ``xp`` = numpy or jax.numpy (traceable, for metrics inside jit)."""
    return xp.floor(xp.clip(127.5 * x + 128.0, 0.0, 255.0))


def model_to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 via clamp(127.5 * x + 128, 0, 255) and truncation (the reference's
    round-half-up)."""
    return uint8_levels(np.asarray(x, np.float32)).astype(np.uint8)


def builtin_images() -> Iterator[tuple[str, Image.Image]]:
    """(name, RGB image) for the sample photos shipped inside scikit-image."""
    try:
        import skimage.data  # deferred: only the built-in sample photos read it
    except ImportError as e:
        raise ImageReadError("builtin", "scikit-image is not installed (pip install scikit-image)") from e
    for name in BUILTIN_IMAGES:
        yield name, to_rgb(Image.fromarray(getattr(skimage.data, name)()))
