"""Which calibrated steps run the full UNet when deep features are cached (pure maths).

A schedule is the set F of calibrated steps that run the full UNet; every other step s reuses
the feature of the last full step f(s) < s. Step 0 is always full: there is nothing to reuse.

- ``uniform_full_steps``: DeepCache's schedule, every N-th step.
- ``dp_full_steps``: the K steps that minimise the summed error of the cached, quantized UNet
  against the FP32 UNet along the calibration trajectories (CacheQuant's dynamic-programming
  schedule, with the deployed model's own errors in the loop). The trajectory splits into K
  contiguous segments, each a full step followed by the steps that reuse its feature, so it is
  the same O(K·S·L) segment DP as the timestep groups (calibration.groups).
"""

from __future__ import annotations

import math

import numpy as np


def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
    """Every ``interval``-th step, from step 0."""
    return list(range(0, num_steps, interval))


def max_gap(num_steps: int, full_steps: int) -> int:
    """The longest run of reused steps the DP considers: twice the uniform schedule's, so the
    DP can stretch a segment where features change slowly, while the measurement stays at
    S·L shallow calls instead of S²/2."""
    return min(num_steps - 1, 2 * math.ceil(num_steps / full_steps))


def segment_costs(full_error: np.ndarray, cached_error: np.ndarray) -> np.ndarray:
    """cost[a, b]: steps a..b-1 as one segment, a full and a+1..b-1 reusing a's feature
    (inf where a step of it was not measured). ``cached_error[f, s]``: step s reusing f's
    feature (nan where not measured)."""
    steps = len(full_error)
    cost = np.full((steps + 1, steps + 1), np.inf)
    for a in range(steps):
        total = full_error[a]
        cost[a, a + 1] = total
        for b in range(a + 2, steps + 1):
            error = cached_error[a, b - 1]
            if not np.isfinite(error):
                break
            total += error
            cost[a, b] = total
    return cost


def dp_full_steps(full_error: np.ndarray, cached_error: np.ndarray, k: int) -> list[int]:
    """The ``k`` full steps (step 0 among them) of least summed error."""
    steps = len(full_error)
    if not 1 <= k <= steps:
        raise ValueError(f"full steps must be in [1, {steps}], got {k}")
    cost = segment_costs(np.asarray(full_error, float), np.asarray(cached_error, float))
    best = np.full((k + 1, steps + 1), np.inf)
    cut = np.zeros((k + 1, steps + 1), dtype=int)
    best[0, 0] = 0.0
    for g in range(1, k + 1):
        for b in range(g, steps + 1):
            options = best[g - 1, g - 1:b] + cost[g - 1:b, b]
            cut[g, b] = g - 1 + int(np.argmin(options))
            best[g, b] = options.min()
    if not np.isfinite(best[k, steps]):
        raise ValueError(f"no schedule of {k} full steps covers {steps} steps with the "
                         "measured gaps: measure longer gaps or use more full steps")
    starts, b = [], steps
    for g in range(k, 0, -1):
        starts.append(int(cut[g, b]))
        b = cut[g, b]
    return sorted(starts)


def schedule_error(full_error: np.ndarray, cached_error: np.ndarray,
                   full_steps: list[int]) -> np.ndarray:
    """The error of every step under a schedule: its full error, or its error reusing the
    last full step's feature."""
    per_step, last = [], None
    for s in range(len(full_error)):
        last = s if s in full_steps else last
        per_step.append(full_error[s] if last == s else cached_error[last, s])
    return np.asarray(per_step, float)
