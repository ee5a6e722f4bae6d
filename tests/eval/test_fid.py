"""FID statistics and distance against direct numpy computations."""
import numpy as np
import pytest
import scipy.linalg

from tokenflow_jax.eval import fid


def _direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID via the eigen-decomposition route: tr sqrtm(S1 S2) = tr sqrtm(S1^1/2 S2 S1^1/2) (symmetric PSD)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_statistics_match_numpy(rng):
    x = rng.normal(size=(50, 8)).astype(np.float32)
    mu, sigma = fid.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_streaming_equals_one_shot(rng):
    # Large offset relative to the spread: the naive one-pass covariance would lose ~8 digits here.
    x = (1e4 + rng.normal(size=(301, 16))).astype(np.float64)
    acc = fid.FeatureStatistics(dim=16)
    for chunk in np.array_split(x, [7, 8, 100, 100, 250]):  # includes a 1-row and an empty batch
        acc.update(chunk)
    assert acc.count == 301
    mu, sigma = acc.finalize()
    mu_ref, sigma_ref = fid.feature_statistics(x)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-14)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


def test_streaming_needs_two_features():
    acc = fid.FeatureStatistics(dim=3)
    acc.update(np.zeros((1, 3)))
    with pytest.raises(ValueError):
        acc.finalize()


def test_frechet_distance_matches_direct_computation(rng):
    a = rng.normal(size=(200, 12))
    b = 0.5 + rng.normal(size=(200, 12)) @ (np.eye(12) + 0.3 * rng.normal(size=(12, 12)))
    ours = fid.frechet_distance(*fid.feature_statistics(a), *fid.feature_statistics(b))
    assert ours == pytest.approx(_direct_fid(a, b), rel=1e-8)


def test_frechet_distance_of_a_distribution_with_itself_is_zero(rng):
    mu, sigma = fid.feature_statistics(rng.normal(size=(100, 10)))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_closed_form_for_diagonal_gaussians():
    # Diagonal covariances: FID = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 5.0 + 1.0 + 1.0 + 0.0
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_singular_covariances_give_a_finite_distance(rng):
    # N < D: both covariances are rank deficient; scipy's sqrtm returns a (complex) finite root here.
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    value = fid.frechet_distance(*fid.feature_statistics(a), *fid.feature_statistics(b))
    assert np.isfinite(value)
    assert value == pytest.approx(_direct_fid(a, b), rel=1e-3)


def test_non_finite_root_retries_with_the_eps_offset(rng, monkeypatch):
    m1, s1 = fid.feature_statistics(rng.normal(size=(30, 4)))
    m2, s2 = fid.feature_statistics(rng.normal(size=(30, 4)))
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):  # the first root "fails", as sqrtm of a badly singular product can
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky_sqrtm)
    eps = 1e-2
    value = fid.frechet_distance(m1, s1, m2, s2, eps=eps)
    offset = eps * np.eye(4)
    np.testing.assert_array_equal(calls[1], (s1 + offset) @ (s2 + offset))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(calls[1]).real)
    assert value == pytest.approx(expected, rel=1e-12)


def test_uses_scipy_sqrtm_like_pytorch_fid(rng):
    a, b = rng.normal(size=(60, 6)), rng.normal(size=(60, 6)) * 2
    (m1, s1), (m2, s2) = fid.feature_statistics(a), fid.feature_statistics(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-12)
