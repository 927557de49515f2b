"""Timestep groups: contiguous runs of calibrated steps that share activation scales.

``uniform`` splits the trajectory evenly. ``auto`` chooses boundaries by dynamic programming
so that, summed over layers and steps, each step loses as little range resolution as
possible by sharing its group's range: cost = sum (log2(group max) - log2(step max))^2.
"""

from __future__ import annotations

import numpy as np

GROUP_SPLITS = ("uniform", "auto")


def uniform_groups(num_steps: int, num_groups: int) -> list[list[int]]:
    num_groups = max(1, min(num_groups, num_steps))
    return [chunk.tolist() for chunk in np.array_split(np.arange(num_steps), num_groups)]


def interval_cost(log_ranges: np.ndarray, start: int, stop: int) -> float:
    """Range mismatch of steps [start, stop) sharing one range; log_ranges is [layers, steps]."""
    block = log_ranges[:, start:stop]
    return float(((block.max(axis=1, keepdims=True) - block) ** 2).sum())


def auto_groups(step_ranges: np.ndarray, num_groups: int) -> list[list[int]]:
    """Optimal contiguous split of steps into ``num_groups`` groups (O(G * S^2) DP).

    ``step_ranges`` is [layers, steps] of per-step clipping thresholds (all positive).
    """
    log_ranges = np.log2(np.maximum(step_ranges, 1e-12))
    steps = log_ranges.shape[1]
    num_groups = max(1, min(num_groups, steps))
    cost = np.full((steps + 1, steps + 1), np.inf)
    for a in range(steps):
        for b in range(a + 1, steps + 1):
            cost[a, b] = interval_cost(log_ranges, a, b)
    best = np.full((num_groups + 1, steps + 1), np.inf)
    cut = np.zeros((num_groups + 1, steps + 1), dtype=int)
    best[0, 0] = 0.0
    for g in range(1, num_groups + 1):
        for b in range(g, steps + 1):
            options = best[g - 1, g - 1:b] + cost[g - 1:b, b]
            cut[g, b] = g - 1 + int(np.argmin(options))
            best[g, b] = options.min()
    bounds, b = [], steps
    for g in range(num_groups, 0, -1):
        bounds.append((cut[g, b], b))
        b = cut[g, b]
    return [list(range(a, b)) for a, b in reversed(bounds)]
