"""The slope search (calibration.allocation): budgets, candidates, and a brute-force check."""

import itertools

import numpy as np
import pytest

from calibration.allocation import (FLOAT, Budget, Choice, LayerCurves, allocate, candidates,
                                    kernels, lagrangian, parse_budget, table, totals,
                                    weight_bytes)
from dq_export.errors import UserError


def random_layers(rng, count, groups, timed=False):
    layers = []
    for i in range(count):
        kind = ("conv", "linear")[i % 2]
        bits = {8: rng.uniform(0, 1e-3, groups).tolist()}
        if kind == "linear":
            bits[4] = (np.array(bits[8]) * rng.uniform(4, 30, groups)).tolist()
        ms = ({"int8": rng.uniform(0.5, 1), "fp32": rng.uniform(1, 3),
               "w8-float": rng.uniform(0.8, 2), "w4-float": rng.uniform(1, 3)} if timed else None)
        layers.append(LayerCurves(f"layer{i}", kind, int(rng.integers(100, 5000)), bits,
                                  rng.uniform(0, 1e-3, groups).tolist(), ms))
    return layers


def brute_force(t, cap_size, cap_ms=np.inf):
    """Least total distortion over every combination meeting both caps."""
    best = np.inf
    sizes = [np.isfinite(t.size[i]).sum() for i in range(len(t.names))]
    for picks in itertools.product(*(range(n) for n in sizes)):
        d, s, ms = totals(t, np.array(picks))
        if s <= cap_size and (ms is None or ms <= cap_ms):
            best = min(best, d)
    return best


def test_budget_parsing_and_its_one_line_errors():
    assert parse_budget("size=700MB") == Budget(size_bytes=700e6)
    assert parse_budget("size=0.5GiB, latency=0.8x") == Budget(2**29, 0.8)
    assert parse_budget("latency=0.75").latency == 0.75
    assert parse_budget("size=700MB,latency=0.8x").text() == "size=700MB,latency=0.8x"
    for bad in ("size=big", "speed=2x", "size=-3MB", "latency=0x", ""):
        with pytest.raises(UserError, match="--budget"):
            parse_budget(bad)


def test_candidates_are_the_executable_forms_with_their_bytes_and_kernels():
    conv, linear = candidates("conv", 2), candidates("linear", 2)
    assert len(conv) == 4 and len(linear) == 6
    assert Choice(4, (8, 8)) not in linear  # int4 weights only with a float input
    dual = Choice(8, (8, FLOAT))
    assert weight_bytes("conv", 100, dual) == 100 + 400  # int8 and FP32 copies
    assert kernels("conv", dual) == ["int8", "fp32"]  # both run at every step
    assert dual.weights_in("conv", 1) == FLOAT and dual.weights_in("linear", 1) == 8
    assert weight_bytes("linear", 100, dual) == 100  # both paths read one int8 copy
    assert kernels("linear", dual) == ["int8", "w8-float"]
    assert weight_bytes("linear", 100, Choice(4, (FLOAT, FLOAT))) == 50
    assert kernels("linear", Choice(4, (FLOAT, FLOAT))) == ["w4-float"]
    assert kernels("linear", Choice(FLOAT, (FLOAT, FLOAT))) == ["fp32"]


def test_slope_search_is_optimal_for_the_size_it_reaches_brute_force():
    """Everett's theorem for the Lagrangian: at the size it reaches, no allocation of at most
    that size has less distortion; and the budget is met."""
    rng = np.random.default_rng(0)
    layers = random_layers(rng, 3, 2)
    t = table(layers, [0.5, 0.5])
    smallest, largest = t.size.min(axis=1).sum(), np.where(np.isfinite(t.size), t.size,
                                                           0).max(axis=1).sum()
    for cap in np.linspace(smallest, largest, 12):
        result = allocate(t, Budget(size_bytes=float(cap)))
        assert result.size_bytes <= cap
        assert result.distortion == pytest.approx(brute_force(t, result.size_bytes), abs=1e-15)


def test_both_budgets_are_met_and_the_hull_points_are_optimal():
    rng = np.random.default_rng(1)
    t = table(random_layers(rng, 3, 2, timed=True), [0.3, 0.7])
    int8 = sum(t.ms[i][[c == Choice(8, (8, 8)) for c in t.choices[i]].index(True)]
               for i in range(3))
    checked = 0
    largest = np.where(np.isfinite(t.size), t.size, 0).max(axis=1).sum()
    for size_cap, ratio in itertools.product(np.linspace(t.size.min(axis=1).sum() * 1.2,
                                                         largest, 4),
                                             (1.0, 1.5, 2.5)):
        try:
            result = allocate(t, Budget(float(size_cap), ratio), int8_ms=int8)
        except UserError:
            continue
        checked += 1
        assert result.size_bytes <= size_cap and result.ms <= ratio * int8 + 1e-9
        # optimal among allocations no larger and no slower than the one found
        assert result.distortion == pytest.approx(
            brute_force(t, result.size_bytes, result.ms), abs=1e-15)
    assert checked >= 6


def test_unreachable_budgets_name_the_smallest_reachable_size_and_latency():
    rng = np.random.default_rng(2)
    t = table(random_layers(rng, 4, 2, timed=True), [0.5, 0.5])
    smallest = t.size.min(axis=1).sum() + 1000
    with pytest.raises(UserError, match=f"smallest reachable UNet is {smallest / 1e6:.4g} MB"):
        allocate(t, Budget(size_bytes=smallest - 1), fixed_bytes=1000)
    assert allocate(t, Budget(size_bytes=smallest), fixed_bytes=1000).size_bytes <= smallest
    with pytest.raises(UserError, match="fastest reachable step is"):
        allocate(t, Budget(latency=0.01), int8_ms=10.0)
    with pytest.raises(UserError, match="needs per-layer timings"):
        allocate(table(random_layers(rng, 2, 2), [0.5, 0.5]), Budget(latency=0.9))


def test_lagrangian_picks_full_precision_when_size_is_free_and_smallest_when_it_is_not():
    rng = np.random.default_rng(3)
    t = table(random_layers(rng, 4, 2), [0.5, 0.5])
    free = lagrangian(t, 0.0)
    assert totals(t, free)[0] == 0.0  # every layer float: no distortion
    tight = lagrangian(t, 1e12)
    assert totals(t, tight)[1] == t.size.min(axis=1).sum()
