"""Range estimators: a histogram -> the range of a per-tensor quantizer.

A symmetric quantizer is int8 on [-T, T], or uint8 on [0, T] for non-negative inputs, so one
number T describes it (``estimate``). An asymmetric one is uint8 with a zero point z on
[-z·s, (255-z)·s] (``zero_point`` and ``asymmetric_scale``): all 256 levels on a lopsided
input such as SiLU's. ``mse`` picks the range that minimises the expected squared error:
clipping error beyond the range plus rounding noise (step^2 / 12) inside it.
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


def side(hist: Histogram, negative: bool) -> Histogram:
    """One sign of ``hist`` as a non-negative population (magnitudes)."""
    counts = hist.neg if negative else hist.pos
    top = -hist.min if negative else hist.max
    return Histogram(counts, np.zeros_like(counts), hist.zeros, 0.0, max(top, 0.0))


def zero_point(hist: Histogram, estimator: str) -> int:
    """z of an asymmetric uint8 quantizer: where 0 falls between the two sides' ranges, each
    side estimated on its own (0 for an input that is never negative)."""
    if hist.min >= 0:
        return 0
    t_neg, t_pos = (estimate(side(hist, negative), estimator) for negative in (True, False))
    return int(np.clip(round(255 * t_neg / max(t_neg + t_pos, 1e-12)), 1, 254))


def asymmetric_scale(hist: Histogram, zero: int, estimator: str) -> float:
    """y_scale of a uint8 quantizer with zero point ``zero``: ``mse`` minimises the expected
    error of both sides at once; the others cover each side's own estimate."""
    t_neg = estimate(side(hist, True), estimator) if zero else 0.0
    t_pos = estimate(side(hist, False), estimator)
    cover = max(t_pos / (255 - zero), t_neg / zero if zero else 0.0, 1e-10)
    if estimator != "mse" or hist.total == 0:
        return cover
    widest = max(hist.max / (255 - zero), -hist.min / zero if zero else 0.0, cover)
    candidates = widest * 2.0 ** (-np.arange(0, 128) / 16)  # 8 octaves below the widest
    error = expected_error(hist.pos, candidates * (255 - zero), 255 - zero)
    if zero:
        error = error + expected_error(hist.neg, candidates * zero, zero)
    return float(candidates[int(np.argmin(error))])
