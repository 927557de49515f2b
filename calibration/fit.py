"""Fitted quantization parameters: statistics + recipe -> one scale per quantizer and group.

The result is plain data (JSON-serialisable), written into the export beside the graphs.
Weights need no fitting: their per-channel scales follow from the weights themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from calibration.estimators import asymmetric_scale, estimate, zero_point
from calibration.groups import auto_groups, uniform_groups
from calibration.histogram import merge
from calibration.layers import ATTENTION_OPERANDS, PROJECTIONS, is_time_embedding_layer, owner
from calibration.quant_math import activation_dtype, activation_scale
from calibration.statistics import StepStatistics


ASYMMETRIC_GAIN = 1.2  # measured: zero points cost OpenVINO's int8 kernels a few % of speed


@dataclass
class ActivationQuantizer:
    dtype: str  # "uint8" (asymmetric, or from 0 for inputs never negative) or "int8" (symmetric)
    group_scales: list[float]  # y_scale per timestep group
    step_scales: list[float] | None = None  # y_scale per calibrated step (time-embedding path)
    zero_point: int = 0  # y_zero_point, one for every group and step (OpenVINO: constant range)


@dataclass
class QuantParams:
    timesteps: list[int]  # calibrated timesteps, in sampling order
    groups: list[list[int]]  # indices into ``timesteps``, one list per group
    activations: dict[str, ActivationQuantizer]

    def group_of(self) -> list[int]:
        """Group index of every calibrated step."""
        table = [0] * len(self.timesteps)
        for g, steps in enumerate(self.groups):
            for s in steps:
                table[s] = g
        return table

    def without(self, layers: list[str]) -> QuantParams:
        """These parameters with the inputs of ``layers`` left in float (both halves of a
        split shortcut go with their layer; an attention's name drops its q, k and v)."""
        drop = set(layers)
        return QuantParams(self.timesteps, self.groups,
                           {k: q for k, q in self.activations.items() if owner(k) not in drop})

    def only(self, modules: set[str]) -> QuantParams:
        """These parameters for a graph that runs only ``modules`` (a shallow UNet): the
        inputs of those layers, and the operands of attentions whose projections it runs."""
        def kept(key: str) -> bool:
            return owner(key) in modules if "@" not in key else f"{owner(key)}.to_q" in modules

        return QuantParams(self.timesteps, self.groups,
                           {k: q for k, q in self.activations.items() if kept(k)})

    def restricted_attention(self, attention: str) -> QuantParams:
        """Keep the attention quantizers the recipe's ``attention`` asks for: none (float),
        q, k and v (qkv), or also the softmax output p (int8)."""
        kept = {"float": (), "qkv": PROJECTIONS, "int8": ATTENTION_OPERANDS}[attention]
        return QuantParams(self.timesteps, self.groups,
                           {k: q for k, q in self.activations.items()
                            if "@" not in k or k.split("@")[1] in kept})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantParams:
        acts = {k: ActivationQuantizer(**v) for k, v in data["activations"].items()}
        return cls(data["timesteps"], data["groups"], acts)


def step_thresholds(stats: StepStatistics, estimator: str) -> np.ndarray:
    """[quantizers, steps] clipping thresholds, each step fitted alone."""
    return np.array([[estimate(stats.histogram(key, [s]), estimator)
                      for s in range(stats.num_steps)] for key in stats.keys])


def choose_groups(stats: StepStatistics, groups: int, split: str, estimator: str) -> list[list[int]]:
    if split == "auto":
        return auto_groups(step_thresholds(stats, estimator), groups)
    return uniform_groups(stats.num_steps, groups)


def fit(stats: StepStatistics, timesteps: list[int], groups: int, split: str, estimator: str,
        time_tables: bool = True, split_shortcut: bool = True,
        asymmetric: bool = True) -> QuantParams:
    """Fit every input quantizer per group, and per step on the time-embedding path.
    ``asymmetric``: a lopsided signed layer input (SiLU's, say) gets uint8 with a zero point
    (one per quantizer, from all steps) where that makes its steps ASYMMETRIC_GAIN finer;
    attention's q, k and v stay symmetric int8, as OpenVINO's fused attention takes them."""
    if not stats.steps_seen().all():
        missing = np.flatnonzero(~stats.steps_seen()).tolist()
        raise ValueError(f"statistics have no data for calibrated steps {missing}")
    chosen = choose_groups(stats, groups, split, estimator)
    everything = list(range(stats.num_steps))
    activations = {}
    for key, sources in quantizer_sources(stats.keys, split_shortcut).items():
        def hist(steps):
            return merge([stats.histogram(source, steps) for source in sources])

        pooled = hist(everything)
        dtype = activation_dtype(pooled.min)
        zero = 0
        if asymmetric and dtype == "int8" and "@" not in key:
            zero = zero_point(pooled, estimator)
            if asymmetric_gain(zero) >= ASYMMETRIC_GAIN:
                dtype = "uint8"
            else:  # nearly symmetric: int8 without a zero point is as fine, and faster
                zero = 0
        per_step = None
        if time_tables and is_time_embedding_layer(key):
            per_step = [quantizer_scale(hist([s]), dtype, zero, estimator) for s in everything]
        activations[key] = ActivationQuantizer(
            dtype, [quantizer_scale(hist(g), dtype, zero, estimator) for g in chosen], per_step,
            zero)
    return QuantParams(list(timesteps), chosen, constant_score_scales(activations))


def constant_score_scales(activations: dict[str, ActivationQuantizer]
                          ) -> dict[str, ActivationQuantizer]:
    """Widen each attention's q and k scales so that their product is the same in every group.

    The scores ``q·k^T`` are rescaled by ``s_q·s_k`` before the softmax; a product that
    changes with the step is a runtime multiply over the whole [heads, tokens, tokens] tensor
    in the one-graph OpenVINO form (on sd14 at 512: 0.3 s of a call, and a second 1 GB
    buffer), a constant one is folded into the int8 MatMul. Both scales grow by
    sqrt(max product / own product), so no group clips more than before; its q and k steps
    get at most that much coarser.
    """
    out = dict(activations)
    for q_key in activations:
        k_key = f"{owner(q_key)}@k"
        if not q_key.endswith("@q") or k_key not in activations:
            continue
        q, k = activations[q_key], activations[k_key]
        product = np.multiply(q.group_scales, k.group_scales, dtype=np.float64)
        q_scales = np.multiply(q.group_scales, np.sqrt(product.max() / product))
        out[q_key] = ActivationQuantizer(q.dtype, q_scales.tolist(), None, q.zero_point)
        out[k_key] = ActivationQuantizer(k.dtype, (product.max() / q_scales).tolist(), None,
                                         k.zero_point)
    return out


def asymmetric_gain(zero: int) -> float:
    """How much finer uint8 steps with zero point ``zero`` are than symmetric int8's on the
    same input: 2·max(z, 255 - z) / 255 (1 for a balanced input, ~2 after a SiLU)."""
    return 2 * max(zero, 255 - zero) / 255


def quantizer_scale(hist, dtype: str, zero: int, estimator: str) -> float:
    """y_scale of one quantizer on one population (a group's steps, or one step)."""
    if zero:
        return asymmetric_scale(hist, zero, estimator)
    return float(activation_scale(estimate(hist, estimator), dtype))


def quantizer_sources(keys: list[str], split_shortcut: bool) -> dict[str, list[str]]:
    """Quantizer name -> statistics keys it is fitted on. Statistics always keep the two
    halves of a skip concatenation apart; without split quantization one quantizer covers
    both, and its histogram is their sum (same grid, so the merge is exact)."""
    sources: dict[str, list[str]] = {}
    for key in keys:
        name = key.split("#")[0] if not split_shortcut else key
        sources.setdefault(name, []).append(key)
    return sources
