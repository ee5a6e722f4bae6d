"""Image-quality metrics on numpy arrays (per image)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (skimage ``peak_signal_noise_ratio`` semantics)."""
    mse = np.mean((np.asarray(reference, np.float64) - np.asarray(test, np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def psnr_per_image(reference, test):
    """PSNR (dB, data range 1) of each image of [B, H, W, C] batches in [0, 1] (jax.numpy, traceable)."""

    mse = jnp.mean((reference - test) ** 2, axis=tuple(range(1, reference.ndim)))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def ssim(reference, test, data_range: float = 1.0):
    """Mean SSIM per image, skimage ``structural_similarity`` defaults: 7x7 uniform window, K1 0.01,
    K2 0.03, sample covariance, channels averaged (``channel_axis=-1``), borders excluded.

    Args:
      reference, test: [B, H, W, C] float images (e.g. in [0, 1]).
      data_range: 1.0 is the standard for [0, 1] images; the reference evaluation passes 2.0, which
        shrinks C1 and C2 and inflates SSIM (report both, labelled).
    Returns:
      [B] float32 (a jax array; jit-compatible).
    """

    win = 7
    x = jnp.asarray(reference, jnp.float32)
    y = jnp.asarray(test, jnp.float32)

    def box(a):  # mean over each valid 7x7 window, per channel: [B, H-6, W-6, C]
        return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, win, win, 1), (1, 1, 1, 1), "VALID") / win**2

    ux, uy = box(x), box(y)
    uxx, uyy, uxy = box(x * x), box(y * y), box(x * y)
    cov_norm = win**2 / (win**2 - 1.0)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))
