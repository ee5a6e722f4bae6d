"""Fréchet Inception Distance from pool3 features (pytorch-fid's formula), with a streaming accumulator.

FID between Gaussians N(mu1, S1) and N(mu2, S2):

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))

Statistics are float64 and the covariance is the unbiased one (``np.cov(rowvar=False)``), as in
pytorch-fid and fid-helper. Features come from :class:`tokenflow_jax.models.inception.InceptionV3`.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected [N >= 2, D] features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """pytorch-fid's ``calculate_frechet_distance``.

    Args:
      mu1, mu2: [D] means; sigma1, sigma2: [D, D] covariances.
      eps: added to both diagonals when sqrtm(S1 S2) is not finite (a singular product, e.g. N < D).
    Raises:
      ValueError: when the matrix square root has a non-negligible imaginary diagonal (atol 1e-3).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    # scipy >= 1.16 deprecates sqrtm's ``disp``; without it the root comes back alone (no error estimate).
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("fid: sqrtm(S1 S2) is singular; adding %g to the diagonals of the covariances", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Numerical error can give a slightly complex root; a real product of PSD matrices has a real one.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStatistics:
    """Streaming mean and covariance of [N, D] features: O(D^2) memory however many batches are added.

    Keeps the count, the sum and the sum of outer products in float64, about a fixed shift (the first
    batch's mean): the one-pass formula S / (n - 1) - ... cancels catastrophically when the mean is large
    relative to the spread, and shifting by any value near the mean removes that without a second pass.
    """

    def __init__(self, dim: int = 2048):
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros((dim,), np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of features [n, D] (any float dtype; n may be 0)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] features, got shape {features.shape}")
        if features.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = features.mean(axis=0)
        centred = features - self._shift
        self.count += features.shape[0]
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) float64, equal to :func:`feature_statistics` of all features added."""
        if self.count < 2:
            raise ValueError(f"need at least 2 features for a covariance, have {self.count}")
        n = self.count
        mean_centred = self._sum / n
        sigma = (self._outer - n * np.outer(mean_centred, mean_centred)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # BLAS need not return a bit-symmetric X^T X
        return mean_centred + self._shift, sigma
