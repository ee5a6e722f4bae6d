"""Resizes of NHWC images / feature maps that match ``torch.nn.functional.interpolate`` numerically.

Every resize here is separable, so it is written as two small constant matrices, one per spatial axis,
applied with ``einsum`` along H and then W:

    y[..., o, p, c] = sum_{h, w} Mh[o, h] * Mw[p, w] * x[..., h, w, c]

The matrices are built once per (in, out[, scale]) in numpy (float64, except where torch's float32
index arithmetic is reproduced on purpose), cached, and stored as float32.
Matmuls instead of gathers keep this TPU friendly, and ``Precision.HIGHEST`` keeps float32 accuracy on
TPU, whose default float32 matmul precision is a single bf16 pass.

Spatial axes are -3 and -2 ([..., H, W, C]); any number of leading batch axes (including none) is fine.

``jax.image.resize(method="cubic")`` is *not* a substitute: it uses the Keys kernel with a = -0.5 and
antialiases when downsampling, whereas PyTorch uses a = -0.75 and never antialiases (``antialias=False``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's cubic convolution coefficient (``get_cubic_upsample_coefficients`` in UpSample.h).
_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights (a = -0.75) of the 4 taps floor(src)-1 .. floor(src)+2.

    Args:
      t: [n] fractional offsets src - floor(src), in [0, 1].
    Returns:
      [n, 4] weights; each row sums to 1.
    """
    a = _CUBIC_A

    def near(d: np.ndarray) -> np.ndarray:  # |d| <= 1
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

    def far(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """[out, in] float32 matrix of torch's 1-D bicubic resize (``align_corners=False``, no antialias).

    Args:
      in_size: input length along the axis.
      out_size: output length along the axis.
      scale: torch's ``scale_factor`` for this axis, or None. When given, source coordinates are mapped
        with 1 / scale instead of in / out (what ``F.interpolate(..., scale_factor=...)`` does with the
        default ``recompute_scale_factor=None``); ``out_size`` still fixes the number of rows.
    Returns:
      read-only [out_size, in_size] float32 matrix; rows sum to 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    # area_pixel_compute_scale: a positive scale factor wins over the size ratio. torch computes the
    # step and the source coordinate in float32 (opmath of float), and at ~400 pixels one float32 ulp
    # of the coordinate (3e-5) moves the weights by ~1.5e-5, so both are rounded the same way here.
    if scale is not None and scale > 0:
        step = np.float32(1.0 / scale)
    else:
        step = np.float32(in_size) / np.float32(out_size)
    # area_pixel_compute_source_index with cubic=True: half-pixel centres and, unlike linear modes, no
    # clamping of negative coordinates to 0. step * (dst + 0.5) - 0.5 is exact in float64 and rounded
    # once to float32, i.e. an FMA, which is what the AVX2/AVX512 CPU kernels (and nvcc) compile it to;
    # torch's non-FMA kernel (ATEN_CPU_CAPABILITY=default) rounds twice: weights differ by up to 1.4e-5,
    # outputs by ~7e-5 at 384 -> 432, so torch does not even agree with itself across CPUs there.
    dst = np.arange(out_size, dtype=np.float64)
    src = (np.float64(step) * (dst + 0.5) - 0.5).astype(np.float32).astype(np.float64)
    # guard_index_and_lambda: base index capped at in-1 and the offset kept in [0, 1]. This only
    # matters when a scale factor maps past the last input pixel; for consistent sizes it is a no-op.
    base = np.minimum(np.floor(src), in_size - 1)
    t = np.clip(src - base, 0.0, 1.0)
    # Weights in float64: torch's float32 polynomial differs from the exact value by <= ~1e-6.
    weights = _cubic_weights(t)  # [out, 4]
    # Taps outside the input replicate the edge pixel (upsample_get_value_bounded); clamped taps
    # may coincide, hence the accumulating scatter.
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)  # [out, 4]
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size)[:, None], taps), weights)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False  # shared by the cache; must never be mutated in place
    return matrix


@functools.lru_cache(maxsize=256)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 matrix of torch's 1-D ``adaptive_avg_pool`` (``F.interpolate(mode='area')``).

    Output i averages input [floor(i * in / out), ceil((i + 1) * in / out)); for sizes that do not
    divide, neighbouring windows overlap (e.g. 27 -> 22) and windows can have different lengths.
    Since the 2-D window is a product of 1-D windows with uniform weights, the 2-D mean factorises.

    Returns:
      read-only [out_size, in_size] float32 matrix; rows sum to 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        # Integer arithmetic, exactly as torch's start_index / end_index.
        start = (i * in_size) // out_size
        end = ((i + 1) * in_size + out_size - 1) // out_size
        matrix[i, start:end] = 1.0 / (end - start)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def _apply_separable(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    """Applies [out_h, H] then [out_w, W] matrices to x [..., H, W, C]; returns [..., out_h, out_w, C].

    Computes in at least float32 (bf16 inputs would otherwise lose the weights' precision) and casts
    back to x's dtype.
    """
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    y = x.astype(compute_dtype)
    y = jnp.einsum("oh,...hwc->...owc", jnp.asarray(mh, compute_dtype), y, precision=hi)
    y = jnp.einsum("pw,...owc->...opc", jnp.asarray(mw, compute_dtype), y, precision=hi)
    return y.astype(x.dtype)


def _check_nhwc(x: jax.Array, size: tuple[int, int]) -> tuple[int, int]:
    if x.ndim < 3:
        raise ValueError(f"expected [..., H, W, C], got shape {x.shape}")
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size}")
    return x.shape[-3], x.shape[-2]


def bicubic_resize(
    x: jax.Array, size: tuple[int, int], *, scale_factor: tuple[float, float] | None = None
) -> jax.Array:
    """``F.interpolate(x, size, mode='bicubic', align_corners=False)`` for NHWC ``x``.

    Args:
      x: [..., H, W, C] floating array.
      size: output (height, width).
      scale_factor: optional per-axis (sh, sw). The output still has ``size``, but source coordinates are
        mapped with 1 / scale_factor, as ``F.interpolate(x, scale_factor=sf, mode='bicubic')`` does
        (its output size is floor(in * sf), which the caller passes as ``size``).
    Returns:
      [..., size[0], size[1], C] array with x's dtype.
    """
    h, w = _check_nhwc(x, size)
    out_h, out_w = int(size[0]), int(size[1])
    if scale_factor is None:
        if (out_h, out_w) == (h, w):
            return x  # src == dst exactly, weights (0, 1, 0, 0): torch returns a copy of x too
        sh = sw = None
    else:
        sh, sw = float(scale_factor[0]), float(scale_factor[1])
    return _apply_separable(x, bicubic_matrix(h, out_h, sh), bicubic_matrix(w, out_w, sw))


def area_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='area')`` (= ``adaptive_avg_pool2d``) for NHWC ``x``.

    Args:
      x: [..., H, W, C] floating array.
      size: output (height, width); may be larger than the input as well.
    Returns:
      [..., size[0], size[1], C] array with x's dtype.
    """
    h, w = _check_nhwc(x, size)
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == (h, w):
        return x
    return _apply_separable(x, area_matrix(h, out_h), area_matrix(w, out_w))


def interpolate_pos_embed(table: jax.Array, out_grid: int) -> jax.Array:
    """Resizes a square grid of patch position embeddings with the DINO / BEiT "+0.1" trick.

    Equals ``F.interpolate(grid, scale_factor=((out_grid + 0.1) / N,) * 2, mode='bicubic')`` on the
    [1, D, N, N] grid: the +0.1 only makes floor(N * scale) land on ``out_grid`` despite float rounding,
    but since torch maps coordinates with 1 / scale rather than N / out_grid, it also shifts the samples
    slightly, and reproducing the reference requires doing the same.

    Args:
      table: [N * N, D] embeddings of the patch positions only (no class token), row-major (h, w).
      out_grid: output grid side.
    Returns:
      [out_grid * out_grid, D] table; ``table`` itself when out_grid == N.
    """
    if table.ndim != 2:
        raise ValueError(f"expected [N*N, D], got shape {table.shape}")
    n = math.isqrt(table.shape[0])
    if n * n != table.shape[0]:
        raise ValueError(f"{table.shape[0]} positions do not form a square grid")
    if out_grid == n:
        return table
    scale = (out_grid + 0.1) / n
    # torch's output size for a scale factor: floor(in * scale) in double precision.
    if math.floor(n * scale) != out_grid:
        raise ValueError(f"scale {scale} maps {n} to {math.floor(n * scale)}, not {out_grid}")
    grid = table.reshape(n, n, table.shape[1])
    grid = bicubic_resize(grid, (out_grid, out_grid), scale_factor=(scale, scale))
    return grid.reshape(out_grid * out_grid, table.shape[1])
