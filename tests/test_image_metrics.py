"""dq_export.evaluation.image_metrics against values worked out by hand and, where installed,
skimage."""

import numpy as np
import pytest

from dq_export.evaluation.image_metrics import clip_score, fid, frechet_distance, psnr, ssim

# SSIM of RAMP against RAMP + 10, from skimage 0.26.0's structural_similarity(
# gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
RAMP = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1))
RAMP_SHIFTED_SSIM = 0.9957926761407077


def test_identical_images():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert psnr(image, image) == float("inf")
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_a_constant_shift_by_hand():
    a = np.full((16, 16, 3), 100, dtype=np.uint8)
    b = a + 10
    # MSE 100: 10 log10(255^2 / 100)
    assert psnr(a, b) == pytest.approx(20 * np.log10(25.5), rel=1e-12)
    # flat images: no variance, so SSIM is the luminance term alone
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-12)


def test_ssim_matches_skimage_on_a_ramp():
    assert ssim(RAMP, RAMP + 10) == pytest.approx(RAMP_SHIFTED_SSIM, rel=1e-12)
    # floats need their range; the same pixels in [0, 1] give the same SSIM
    with pytest.raises(ValueError, match="data_range"):
        ssim(RAMP / 255, (RAMP + 10) / 255)
    assert ssim(RAMP / 255, (RAMP + 10) / 255, data_range=1.0) == pytest.approx(RAMP_SHIFTED_SSIM)


def test_ssim_and_psnr_match_skimage_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    expected = metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True,
                                             sigma=1.5, use_sample_covariance=False,
                                             data_range=255)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-12)
    assert psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=255))


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="window"):
        ssim(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))


def test_clip_score():
    image = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    text = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, np.sqrt(3.0)]])
    # parallel, orthogonal, opposite (clipped to 0), 60 degrees apart
    np.testing.assert_allclose(clip_score(image, text), [100, 0, 0, 50], atol=1e-12)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    s1 = a @ a.T + np.eye(3)
    s2 = s1 @ s1  # commutes with s1, so (s1 s2)^1/2 = s1^3/2 exactly
    w, v = np.linalg.eigh(s1)
    s1_pow_1_5 = v @ np.diag(w ** 1.5) @ v.T
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * s1_pow_1_5)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_with_fewer_samples_than_features():
    """Rank-deficient covariances, as FID on a few images: the samples' route (exact) and the
    covariances' route agree, and a set against itself is 0."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 40)) @ rng.normal(size=(40, 40))
    b = a + rng.normal(size=a.shape)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    by_covariances = frechet_distance(a.mean(0), s1, b.mean(0), s2)
    assert fid(a, b) == pytest.approx(by_covariances, abs=1e-9 * np.trace(s1))
    # torch-fidelity's formula, the eigenvalues of S1 S2, within its rounding noise
    tr = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real)
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr
    assert fid(a, b) == pytest.approx(expected, abs=1e-6 * np.trace(s1))
    assert abs(fid(a, a)) < 1e-9 * np.trace(s1)
    assert abs(frechet_distance(a.mean(0), s1, a.mean(0), s1)) < 1e-9 * np.trace(s1)
    with pytest.raises(ValueError, match="at least 2"):
        fid(a[:1], b)
