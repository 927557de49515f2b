"""Range estimators: a histogram -> the clipping threshold T of a per-tensor quantizer.

The quantizer is symmetric int8 on [-T, T], or uint8 on [0, T] for non-negative inputs, so
one number describes it. ``mse`` picks the T that minimises the expected squared error:
clipping error above T plus rounding noise (step^2 / 12) below it.
"""

from __future__ import annotations

import numpy as np

from calibration.histogram import CENTERS, EDGES, Histogram

ESTIMATORS = ("minmax", "percentile", "mse")
DEFAULT_PERCENTILE = 99.99


def magnitudes(hist: Histogram) -> np.ndarray:
    """Counts by |x| bin that the quantizer sees: both signs unless the input is non-negative."""
    return hist.pos if hist.min >= 0 else hist.pos + hist.neg


def amax(hist: Histogram) -> float:
    return max(abs(hist.min), abs(hist.max))


def minmax(hist: Histogram) -> float:
    return amax(hist) if hist.min < 0 else max(hist.max, 0.0)


def percentile(hist: Histogram, p: float = DEFAULT_PERCENTILE) -> float:
    counts = magnitudes(hist)
    cumulative = hist.zeros + np.cumsum(counts)
    index = int(np.searchsorted(cumulative, p / 100 * cumulative[-1]))
    return float(min(EDGES[min(index + 1, len(EDGES) - 1)], minmax(hist)))


def expected_error(counts: np.ndarray, thresholds: np.ndarray, qmax: int) -> np.ndarray:
    """Expected squared error of each candidate threshold, from bin centres (pure maths)."""
    t = thresholds[:, None]
    step = t / qmax
    rounding = np.minimum(CENTERS[None, :] ** 2, step**2 / 12)
    clipping = (CENTERS[None, :] - t) ** 2
    return np.where(CENTERS[None, :] > t, clipping, rounding) @ counts


def mse(hist: Histogram) -> float:
    counts = magnitudes(hist)
    top = minmax(hist)
    if top <= 0 or counts.sum() == 0:
        return max(top, 1e-8)
    # candidates: every bin edge from the median magnitude up to max|x|
    cumulative = hist.zeros + np.cumsum(counts)
    first = int(np.searchsorted(cumulative, cumulative[-1] / 2)) + 1
    last = int(np.searchsorted(EDGES, top))
    candidates = np.append(EDGES[min(first, last):last], top)
    qmax = 255 if hist.min >= 0 else 127
    return float(candidates[int(np.argmin(expected_error(counts, candidates, qmax)))])


def estimate(hist: Histogram, estimator: str) -> float:
    if estimator == "minmax":
        return minmax(hist)
    if estimator == "percentile":
        return percentile(hist)
    if estimator == "mse":
        return mse(hist)
    raise ValueError(f"unknown range estimator {estimator!r}: use one of {ESTIMATORS}")
