"""Image-quality maths shared by the quality scripts: PSNR, SSIM, CLIP score, FID.

Plain numpy/scipy on arrays and features, no models, so every script computes a metric the
same way and the tests can check it against hand-worked values.
"""

from __future__ import annotations

import numpy as np

SSIM_SIGMA = 1.5    # Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5
SSIM_TRUNCATE = 3.5  # skimage's: radius int(3.5 * 1.5 + 0.5) = 5, so 11 pixels wide
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(a, b, data_range: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Two images as float64 arrays of one shape, and their data range (255 for uint8)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if data_range is None:
        if a.dtype != np.uint8 or b.dtype != np.uint8:
            raise ValueError("give data_range for images that are not uint8")
        data_range = 255.0
    return a.astype(np.float64), b.astype(np.float64), float(data_range)


def psnr(a, b, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of two H x W (x C) images; inf when identical."""
    a, b, data_range = _pair(a, b, data_range)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(a, b, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004) of two H x W (x C) images.

    As skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``: Gaussian-weighted local statistics per channel, the SSIM
    map averaged away from the borders the window overhangs, then over channels.
    """
    from scipy.ndimage import gaussian_filter

    a, b, data_range = _pair(a, b, data_range)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(a.shape[:2]) < 2 * pad + 1:
        raise ValueError(f"images of {a.shape[:2]} are smaller than the {2 * pad + 1}-pixel window")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    scores = []
    for x, y in zip(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0)):
        mu_x, mu_y, xx, yy, xy = (
            gaussian_filter(z, SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")
            for z in (x, y, x * x, y * y, x * y))
        var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
        s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
        scores.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


def clip_score(image_embeds, text_embeds) -> np.ndarray:
    """100 * max(cos(image, text), 0) for each row pair (Hessel et al. 2021, as torchmetrics)."""
    i, t = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    cos = np.sum(i * t, axis=1) / (np.linalg.norm(i, axis=1) * np.linalg.norm(t, axis=1))
    return 100 * np.maximum(cos, 0)


def _root(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (rounding's negative eigenvalues as 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, tr_covmean: float | None = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the distance between two Gaussians.

    Tr (S1 S2)^1/2 is the sum of the singular values of S2^1/2 S1^1/2: no product of the two
    covariances is formed, whose square roots of rounding noise on zero eigenvalues
    (``scipy.linalg.sqrtm``, or the eigenvalues of S1 S2 as torch-fidelity takes them) add
    up over 2048 features when there are fewer samples than features. ``tr_covmean``: that
    trace, when the caller has it already.
    """
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if tr_covmean is None:
        tr_covmean = np.linalg.svd(_root(sigma2) @ _root(sigma1), compute_uv=False).sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature rows (FID on Inception
    pool features, the digits FID on the judge's).

    With no more samples than features, Tr (S1 S2)^1/2 comes straight from the samples: the
    sum of the singular values of A B^T / sqrt((n - 1)(m - 1)) (rows centred), exact and an
    n x m problem instead of a features x features one.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 samples a set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_covmean = None
    if max(len(a), len(b)) <= a.shape[1]:
        tr_covmean = (np.linalg.svd((a - mu_a) @ (b - mu_b).T, compute_uv=False).sum()
                      / np.sqrt((len(a) - 1) * (len(b) - 1)))
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b, tr_covmean)
