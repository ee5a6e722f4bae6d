"""Image-quality metrics on numpy arrays (per image)."""
from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (skimage ``peak_signal_noise_ratio`` semantics)."""
    mse = np.mean((np.asarray(reference, np.float64) - np.asarray(test, np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))
