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
    """Histogram of a torch tensor (computed in torch: this runs inside forward hooks)."""
    import torch

    x = x.detach().float().reshape(-1)
    logs = torch.log10(x.abs().clamp_min(1e-30)).clamp_max(LOG10_MAX - 1e-6)
    hists = []
    for mask in (x > 0, x < 0):
        values = logs[mask & (logs >= LOG10_MIN)]
        hists.append(torch.histc(values, bins=BINS, min=LOG10_MIN, max=LOG10_MAX).double().numpy())
    zeros = float(x.numel() - hists[0].sum() - hists[1].sum())
    return Histogram(hists[0], hists[1], zeros, float(x.min()), float(x.max()))


def merge(histograms: list[Histogram]) -> Histogram:
    total = histograms[0]
    for h in histograms[1:]:
        total = total + h
    return total
