"""Mixed precision by the rate-distortion paper's slope search (its Algorithm 2), per layer
and timestep group, over the precisions OpenVINO on CPU executes (``benchmarks/mixed_form.py``).

A layer's choice is its weight precision, one for all groups, and its input precision in
each group (RAQ's step-wise schedule): int8, or float. What each choice costs follows the
deployed form (``dq_export.graph.mixed_precision``), measured by ``benchmarks/mixed_form.py``:

- Conv: int8 weights and input; or float input on the FP32 weights (OpenVINO would expand
  int8 weights to FP32 for a float input anyway, in more memory).
- Linear: int8 weights with an int8 and/or a float input (OpenVINO decompresses them), int4
  weights with a float input, or FP32. Int4 weights with an int8 input are no candidate:
  OpenVINO runs them as a decompressing float kernel behind a FakeQuantize, no faster than
  a float input and less exact.
- A layer int8 in some groups and float in others runs both kernels at every step (one
  graph cannot switch a FakeQuantize off) and holds both weights (a Conv's int8 and FP32,
  a Linear's one int8 copy): the allocation charges both, so it takes such a layer only
  where that pays.

Distortion is additive (the paper's property 1): a choice costs the sum over groups, each
weighted by its share of steps, of its weights' and its inputs' curve points. Rate is the
UNet's weight bytes (as the IR stores them; the CPU plugin holds about as much), and
optionally the time of a step from per-layer profiles of each kernel on this CPU. For multipliers
(lambda, mu) every layer independently takes the choice minimising D + lambda S + mu T;
the search finds the smallest multipliers whose choices meet the budget: linear in the
number of layers.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from dq_export.errors import UserError

FLOAT = 32
SEARCH_ITERATIONS = 80  # bisection halvings of log(multiplier): far below any tie


@dataclass(frozen=True)
class Choice:
    weight_bits: int  # 8 or 32 for a Conv (its int8 path's weights), 4, 8 or 32 for a Linear
    activations: tuple[int, ...]  # per group: 8 (int8 input) or FLOAT

    def weights_in(self, kind: str, group: int) -> int:
        """Weight bits the layer computes with in ``group`` (a Conv's float path: FP32)."""
        if kind == "conv" and self.activations[group] == FLOAT:
            return FLOAT
        return self.weight_bits

    def paths(self) -> set[int]:
        return set(self.activations)


@dataclass(frozen=True)
class LayerCurves:
    """One layer's rate-distortion points (Algorithm 1's output) and its size and times."""
    name: str
    kind: str  # "conv" or "linear"
    params: int  # weight elements
    weight_distortion: dict[int, list[float]]  # bits -> per group (FLOAT: 0)
    input_distortion: list[float]  # int8 input, per group
    ms: dict[str, float] | None = None  # form -> time per step (see ``FORMS``)


FORMS = ("int8", "fp32", "w8-float", "w4-float")  # the kernels a choice can run


@dataclass(frozen=True)
class Budget:
    size_bytes: float | None = None
    latency: float | None = None  # times the all-int8 UNet's step

    def text(self) -> str:
        parts = []
        if self.size_bytes is not None:
            parts.append(f"size={self.size_bytes / 1e6:g}MB")
        if self.latency is not None:
            parts.append(f"latency={self.latency:g}x")
        return ",".join(parts)


UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str) -> Budget:
    """``size=700MB``, ``latency=0.8x``, or both joined by a comma."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "size" and sep:
            match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)\s*([kmg]i?b|b)?", value)
            if match and _number(match.group(1)):
                values["size_bytes"] = _number(match.group(1)) * UNITS[match.group(2) or "b"]
                continue
        if key == "latency" and sep and _number(value.removesuffix("x")):
            values["latency"] = _number(value.removesuffix("x"))
            continue
        raise UserError(f"--budget {item!r}: use size=SIZE (e.g. 700MB, 0.7GB) and/or "
                        "latency=RATIO (e.g. 0.8x: times the all-int8 UNet's step)")
    if not values:
        raise UserError(f"--budget {text!r} names no budget: use size=700MB, latency=0.8x or "
                        "both")
    return Budget(**values)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 else None


def candidates(kind: str, groups: int) -> list[Choice]:
    """Every choice OpenVINO runs as intended, for a layer of ``kind``."""
    patterns = list(itertools.product((8, FLOAT), repeat=groups))
    everywhere_float = (FLOAT,) * groups
    if kind == "conv":
        return [Choice(8 if 8 in p else FLOAT, p) for p in patterns]
    return ([Choice(8, p) for p in patterns]
            + [Choice(4, everywhere_float), Choice(FLOAT, everywhere_float)])


def weight_bytes(kind: str, params: int, choice: Choice) -> float:
    """Bytes of the layer's weights in the IR: a Conv's int8 and/or FP32 copy, a Linear's
    one copy."""
    if kind == "conv":
        return params * ((8 in choice.paths()) + 4 * (FLOAT in choice.paths()))
    return params * choice.weight_bits / 8


def kernels(kind: str, choice: Choice) -> list[str]:
    """The kernels (``FORMS``) the layer runs at every step: both where the groups differ."""
    float_kernel = (f"w{choice.weight_bits}-float" if kind == "linear"
                    and choice.weight_bits < FLOAT else "fp32")
    return [{8: "int8", FLOAT: float_kernel}[a] for a in sorted(choice.paths())]


def distortion(layer: LayerCurves, choice: Choice, shares: list[float]) -> float:
    """Additive distortion: each group's weight and input points, weighted by its steps."""
    total = 0.0
    for g, share in enumerate(shares):
        bits = choice.weights_in(layer.kind, g)
        d = 0.0 if bits == FLOAT else layer.weight_distortion[bits][g]
        if choice.activations[g] == 8:
            d += layer.input_distortion[g]
        total += share * d
    return total


@dataclass
class Table:
    """Every layer's candidates as [layers, candidates] arrays (padded with inf)."""
    names: list[str]
    choices: list[list[Choice]]
    distortion: np.ndarray
    size: np.ndarray
    ms: np.ndarray | None


def table(layers: list[LayerCurves], shares: list[float]) -> Table:
    groups = len(shares)
    options = [candidates(layer.kind, groups) for layer in layers]
    width = max(len(o) for o in options)
    shape = (len(layers), width)
    dist, size, ms = np.full(shape, np.inf), np.full(shape, np.inf), np.full(shape, np.inf)
    timed = all(layer.ms is not None for layer in layers)
    for i, (layer, opts) in enumerate(zip(layers, options)):
        for j, choice in enumerate(opts):
            dist[i, j] = distortion(layer, choice, shares)
            size[i, j] = weight_bytes(layer.kind, layer.params, choice)
            if timed:
                ms[i, j] = sum(layer.ms[k] for k in kernels(layer.kind, choice))
    return Table([layer.name for layer in layers], options, dist, size, ms if timed else None)


def lagrangian(t: Table, size_weight: float, time_weight: float = 0.0) -> np.ndarray:
    """Each layer's candidate minimising D + lambda S + mu T (Algorithm 2's minimal
    intercept at slope lambda); ties go to the smaller size."""
    valid = np.isfinite(t.distortion)
    cost = t.distortion + size_weight * np.where(valid, t.size, 0)
    if time_weight:
        cost = cost + time_weight * np.where(valid, t.ms, 0)
    cost = np.where(valid, cost, np.inf)
    best = cost.min(axis=1, keepdims=True)
    tied = np.where(cost <= best, t.size, np.inf)
    return np.argmin(tied, axis=1)


def totals(t: Table, picks: np.ndarray) -> tuple[float, float, float | None]:
    rows = np.arange(len(picks))
    ms = float(t.ms[rows, picks].sum()) if t.ms is not None else None
    return float(t.distortion[rows, picks].sum()), float(t.size[rows, picks].sum()), ms


def smallest_multiplier(meets, start: float = 1e-20, stop: float = 1e15) -> float | None:
    """The smallest multiplier in [0, stop] whose choices ``meets`` the budget (bisection
    in log space), or None if even ``stop`` does not."""
    if meets(0.0):
        return 0.0
    if not meets(stop):
        return None
    low, high = np.log(start), np.log(stop)
    if meets(start):
        return start
    for _ in range(SEARCH_ITERATIONS):
        middle = (low + high) / 2
        low, high = (low, middle) if meets(np.exp(middle)) else (middle, high)
    return float(np.exp(high))


@dataclass
class Allocation:
    choices: dict[str, Choice]
    distortion: float
    size_bytes: float  # the chosen layers' weights
    ms: float | None  # their kernels' time per step
    size_weight: float
    time_weight: float


def allocate(t: Table, budget: Budget, fixed_bytes: float = 0.0, fixed_ms: float = 0.0,
             int8_ms: float | None = None) -> Allocation:
    """The slope search: the smallest multipliers whose choices meet ``budget``. Sizes count
    ``fixed_bytes`` (weights no candidate changes: norms, biases); latency is relative to
    ``int8_ms``, the all-int8 step, and counts ``fixed_ms`` (attention, norms). A budget no
    choice meets is a UserError naming the smallest reachable size or latency."""
    size_cap = budget.size_bytes - fixed_bytes if budget.size_bytes is not None else np.inf
    time_cap = np.inf
    if budget.latency is not None:
        if t.ms is None or int8_ms is None:
            raise UserError("--budget latency=... needs per-layer timings of this CPU")
        time_cap = budget.latency * int8_ms - fixed_ms
    smallest = fixed_bytes + t.size.min(axis=1).sum()
    fastest = (fixed_ms + t.ms.min(axis=1).sum()) if t.ms is not None else None
    if size_cap < t.size.min(axis=1).sum():
        raise UserError(f"--budget size={budget.size_bytes / 1e6:g}MB cannot be met: the "
                        f"smallest reachable UNet is {smallest / 1e6:.4g} MB")
    if fastest is not None and budget.latency is not None and fixed_ms + time_cap < fastest:
        raise UserError(f"--budget latency={budget.latency:g}x cannot be met: the fastest "
                        f"reachable step is {fastest / int8_ms:.3f}x the all-int8 step")

    def size_weight_for(time_weight: float) -> float | None:
        return smallest_multiplier(
            lambda lam: totals(t, lagrangian(t, lam, time_weight))[1] <= size_cap)

    def meets_time(time_weight: float) -> bool:
        lam = size_weight_for(time_weight)
        return lam is not None and (budget.latency is None or totals(
            t, lagrangian(t, lam, time_weight))[2] <= time_cap)

    time_weight = smallest_multiplier(meets_time) if budget.latency is not None else 0.0
    size_weight = size_weight_for(time_weight or 0.0) if time_weight is not None else None
    if size_weight is None:
        raise UserError(f"--budget {budget.text()} cannot be met together: alone, the "
                        f"smallest reachable UNet is {smallest / 1e6:.4g} MB and the fastest "
                        f"step {fastest / int8_ms:.3f}x the all-int8 step")
    picks = lagrangian(t, size_weight, time_weight)
    d, size, ms = totals(t, picks)
    return Allocation({name: t.choices[i][j] for i, (name, j) in enumerate(zip(t.names, picks))},
                      d, fixed_bytes + size, None if ms is None else fixed_ms + ms,
                      size_weight, time_weight)
