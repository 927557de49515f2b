"""Deep-feature caching at sampling time: which sampler calls run the full UNet, and the UNet
callable that reuses the cached feature in between (DeepCache).

An export made with ``dq-export --cache`` has two UNet graphs: the full one, which also
returns the feature at the cache point, and the shallow one, which reads it. Which calls run
the full graph is a plan, one flag per sampler call, made before sampling from either

- the export's schedule (``cache="auto"``): full steps chosen among the calibrated steps;
  any sampler and step count maps onto them by nearest calibrated timestep, as timestep
  groups do, and a call runs in full when the trajectory has passed a scheduled full step
  since the previous call; or
- a uniform interval N (``cache=N``): DeepCacheSDHelper's rule, every N-th timestep of the
  sampler, a repeated timestep (PNDM's second step) counting as its first occurrence.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dq_export.errors import UserError

CACHE_MODES = ("auto", "off")
FEATURE = "deep_feature"  # the graphs' name of the cached feature (full: output, shallow: input)


def parse_cache(value) -> str | int | None:
    """``None`` (the export's default), "auto", "off", or an interval N >= 1 (an int, or its
    digits as given on a command line)."""
    if value is None or value in CACHE_MODES:
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"cache must be auto, off or an interval N >= 1 (a full UNet call "
                        f"every N steps), got {value!r}")
    return value


def interval_plan(timesteps, interval: int) -> list[bool]:
    """DeepCache's uniform schedule: full where the timestep's first index is a multiple of
    ``interval``."""
    order = [float(t) for t in timesteps]
    return [order.index(t) % interval == 0 for t in order]


def schedule_plan(timesteps, calibrated: list[int], full_steps: list[int]) -> list[bool]:
    """The export's schedule on this sampler's timesteps: a call is full when a scheduled full
    step lies between the previous call's nearest calibrated step (excluded) and its own."""
    calibrated_t = np.asarray(calibrated, dtype=np.float64)
    full = set(full_steps)
    plan, previous = [], -1
    for i, t in enumerate(timesteps):
        step = int(np.argmin(np.abs(calibrated_t - float(t))))
        plan.append(i == 0 or any(previous < f <= step for f in full))
        previous = max(previous, step)
    return plan


class CachedUNet:
    """A ``denoise`` UNet callable for one sampling run: ``full(sample, t, emb)`` returns
    (output, feature), ``shallow(sample, t, emb, feature)`` the output. Counts its calls."""

    def __init__(self, full: Callable, shallow: Callable, plan: list[bool]):
        self.full, self.shallow, self.plan = full, shallow, plan
        self.feature = None
        self.calls = {"full": 0, "cached": 0}

    def __call__(self, sample: np.ndarray, timestep: float, embeddings) -> np.ndarray:
        index = self.calls["full"] + self.calls["cached"]
        if self.feature is None or index >= len(self.plan) or self.plan[index]:
            self.calls["full"] += 1
            output, self.feature = self.full(sample, timestep, embeddings)
            return output
        self.calls["cached"] += 1
        return self.shallow(sample, timestep, embeddings, self.feature)


class UncachedUNet:
    """The same interface for the plain UNet: every call full."""

    def __init__(self, unet: Callable):
        self.unet = unet
        self.calls = {"full": 0, "cached": 0}

    def __call__(self, sample: np.ndarray, timestep: float, embeddings) -> np.ndarray:
        self.calls["full"] += 1
        return self.unet(sample, timestep, embeddings)
