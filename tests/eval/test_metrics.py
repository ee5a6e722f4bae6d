"""PSNR and SSIM against scikit-image (the reference evaluation's implementation)."""
import numpy as np
import pytest

from tokenflow_jax.eval import metrics

skimage_metrics = pytest.importorskip("skimage.metrics")


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage(rng, data_range):
    a = rng.uniform(0, 1, (3, 40, 36, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    ours = np.asarray(metrics.ssim(a, b, data_range))
    for i in range(3):
        ref = skimage_metrics.structural_similarity(a[i], b[i], data_range=data_range, channel_axis=-1)
        assert abs(ours[i] - ref) < 1e-5, (i, ours[i], ref)


def test_psnr_matches_skimage(rng):
    a = rng.uniform(0, 1, (32, 32, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert abs(metrics.psnr(a, b, 1.0) - skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0)) < 1e-9
    assert metrics.psnr(a, a) == float("inf")
