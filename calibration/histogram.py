"""Activation histograms on one fixed log-magnitude grid, so merging is plain addition.

Each record holds counts of |x| per bin for positive and negative values separately, the
number of (near-)zeros, and the exact min and max. One grid for every layer, step and batch
means statistics over any set of steps (a timestep group) are a sum, with no re-binning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOG10_MIN, LOG10_MAX, BINS = -5.0, 4.0, 1024  # 9 decades, 2 % wide bins
EDGES = np.logspace(LOG10_MIN, LOG10_MAX, BINS + 1)
CENTERS = np.sqrt(EDGES[:-1] * EDGES[1:])


@dataclass
class Histogram:
    """Counts for one tensor population (a layer input over some steps and samples)."""

    pos: np.ndarray  # [BINS] counts of positive values by |x| bin
    neg: np.ndarray  # [BINS] counts of negative values by |x| bin
    zeros: float  # values with |x| < 10^LOG10_MIN
    min: float
    max: float

    @property
    def total(self) -> float:
        return float(self.pos.sum() + self.neg.sum() + self.zeros)

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(self.pos + other.pos, self.neg + other.neg, self.zeros + other.zeros,
                         min(self.min, other.min), max(self.max, other.max))


def record(x) -> Histogram:
    """Histogram of a torch tensor (computed in torch: this runs inside forward hooks).

    One ``histc`` over a code that puts log10|x| of positives in the first third of its
    range and of negatives in the last: a third left empty between them keeps rounding at
    the edges from moving a value across signs. In place where possible: at SD's sizes these
    hooks cost as much as the UNet's own forward pass.
    """
    import torch

    x = x.detach().float().reshape(-1)
    span = LOG10_MAX - LOG10_MIN
    code = x.abs().clamp_min_(1e-30).log10_().clamp_max_(LOG10_MAX - 1e-6)
    code.masked_fill_(code < LOG10_MIN, float("-inf"))  # near-zeros: outside every bin
    code.add_(torch.signbit(x), alpha=2 * span)
    counts = torch.histc(code, bins=3 * BINS, min=LOG10_MIN, max=LOG10_MIN + 3 * span)
    counts = counts.double().numpy()
    low, high = torch.aminmax(x)
    pos, neg = counts[:BINS], counts[2 * BINS:]
    return Histogram(pos, neg, float(x.numel() - pos.sum() - neg.sum()), float(low), float(high))


def merge(histograms: list[Histogram]) -> Histogram:
    total = histograms[0]
    for h in histograms[1:]:
        total = total + h
    return total
