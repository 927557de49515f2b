"""``--budget``: from fitted W8A8 parameters to a mixed-precision UNet that meets a size
and/or latency budget (the rate-distortion paper's method, with RAQ's per-group inputs).

1. curves (Algorithm 1): every layer's distortion per group, cached with the calibration;
2. with a latency budget, every candidate kernel's time on this CPU;
3. the slope search (Algorithm 2) under the budget;
4. the plan the graph writers follow, the manifest entry, ``rd_curves.json`` and the
   per-group chart ``allocation.png`` (figure 9's form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from calibration.allocation import (FLOAT, Allocation, LayerCurves, allocate, parse_budget,
                                    table)
from calibration.fit import QuantParams
from calibration.layers import quantized_layers, shortcut_splits
from calibration import rd_curves
from calibration.rd_curves import build_curves, cached_curves, curves_key, layer_kind, load_curves
from dq_export.graph.mixed_precision import Plan, plan

CURVES_FILE = "rd_curves.json"
CHART_FILE = "allocation.png"
LATENCY_FILE = "candidate_latency.json"
OPENVINO_FORM = {
    "form": "shared_scales+dual_path",
    "what": "one graph for all groups: unit-scale int8 quantizers with each step's scales as "
            "runtime multipliers; a layer whose input is int8 in some groups and float in "
            "others runs both kernels at every step, summed with per-step 0/1 weights (a "
            "Conv's float path on its FP32 weights, a Linear's on its int8 weights); the "
            "allocation charges both kernels' time and both weight copies",
}


@dataclass
class MixedUNet:
    allocation: Allocation
    plan: Plan
    curves: dict
    latency: dict | None


def fixed_bytes(unet) -> float:
    """FP32 bytes of the UNet's weights outside the quantized layers' kernels (biases,
    norms, embeddings): the same in every allocation."""
    kernels = sum(m.weight.numel() for m in quantized_layers(unet).values())
    return 4.0 * (sum(p.numel() for p in unet.parameters()) - kernels)


def choose(components, params: QuantParams, summary: dict, recipe, fp32_onnx: Path,
           latent_size: int, progress: bool = True) -> MixedUNet:
    from calibration.collect import load_inputs

    budget = parse_budget(recipe.budget)
    unet = components.unet
    splits = shortcut_splits(unet) if recipe.split_shortcut else {}
    latency = None
    if budget.latency is not None:
        from dq_export.openvino_ir.candidate_latency import form_times

        latency = form_times(components, fp32_onnx, recipe, params, latent_size)
    ms = latency["layers"] if latency else None
    rates = check_reachable(unet, recipe, latency)
    identity = {k: v for k, v in summary.items() if k != "seconds"}
    per_group = rd_curves.STEPS_PER_GROUP
    curves = cached_curves(summary["cache_dir"], curves_key(params, identity, per_group),
                           lambda: build_curves(unet, params, load_inputs(summary["cache_dir"]),
                                                splits, per_group, progress))
    result = allocate(table(load_curves(curves, ms), curves["shares"]), budget, *rates)
    return MixedUNet(result, plan(unet, params, result.choices, splits), curves, latency)


def check_reachable(unet, recipe, latency: dict | None = None) -> tuple:
    """Raise the budget's UserError now if no allocation meets it (rates need no curves:
    minutes of them are not spent on an unreachable budget); return the fixed rates."""
    ms = latency["layers"] if latency else None
    rates = (fixed_bytes(unet), latency["fixed_ms"] if latency else 0.0,
             latency["int8_ms"] if latency else None)
    budget = parse_budget(recipe.budget)
    if budget.latency is None or latency is not None:
        shares = [1 / recipe.groups] * recipe.groups
        allocate(table(unmeasured(unet, recipe.groups, ms), shares), budget, *rates)
    return rates


def unmeasured(unet, groups: int, ms: dict | None) -> list[LayerCurves]:
    """Every layer with zero distortion: enough to tell whether a budget is reachable."""
    zero = [0.0] * groups
    return [LayerCurves(name, layer_kind(m), m.weight.numel(), {8: zero, 4: zero}, zero,
                        None if ms is None else ms[name])
            for name, m in quantized_layers(unet).items()]


def writers(p: Plan) -> tuple:
    """(group graphs writer, shared graph writer, their plan) for ``export``."""
    from dq_export.graph import mixed_precision

    return mixed_precision.write_group_graphs, mixed_precision.write_shared_graph, p


def manifest_entry(mixed: MixedUNet, recipe, params: QuantParams, root: Path, unet) -> dict:
    """The manifest's record of the allocation; writes the curves, timings and chart."""
    from dq_export.allocation_chart import draw

    kinds = {name: layer_kind(m) for name, m in quantized_layers(unet).items()}
    result = mixed.allocation
    (root / CURVES_FILE).write_text(json.dumps(mixed.curves) + "\n")
    files = {"curves": CURVES_FILE, "chart": CHART_FILE}
    if mixed.latency is not None:
        (root / LATENCY_FILE).write_text(json.dumps(mixed.latency, indent=1) + "\n")
        files["latency"] = LATENCY_FILE
    draw(result.choices, kinds, params.groups, params.timesteps, root / CHART_FILE,
         f"allocation for --budget {recipe.budget}: {result.size_bytes / 1e6:.2f} MB of "
         f"weights, predicted distortion {result.distortion:.3g}")
    dual = [n for n, c in result.choices.items() if len(c.paths()) == 2]
    entry = {
        "budget": recipe.budget,
        "method": "rate-distortion slope search over per-layer weight bits and per-group "
                  "input precision (Lagrangian, additive distortion: MSE + SSIM on the UNet "
                  "output per group)",
        "weight_bytes": round(result.size_bytes),
        "predicted_distortion": result.distortion,
        "multipliers": {"size": result.size_weight, "time": result.time_weight},
        "curves_seconds": mixed.curves["seconds"],
        "dual_path_layers": dual,
        "layers": {name: {"kind": kinds[name], "weights": c.weight_bits,
                          "inputs": ["int8" if a == 8 else "float" for a in c.activations]}
                   for name, c in result.choices.items()},
        "files": files,
    }
    if result.ms is not None:
        entry["step_ms_predicted"] = round(result.ms, 3)
        entry["latency_vs_int8"] = round(result.ms / mixed.latency["int8_ms"], 4)
    return entry


def describe(entry: dict) -> dict:
    """The quantization entry's summary lines for a mixed UNet."""
    layers = entry["layers"].values()
    counts = {}
    for layer in layers:
        counts[f"w{layer['weights']}"] = counts.get(f"w{layer['weights']}", 0) + 1
    floats = sum(all(i == "float" for i in layer["inputs"]) for layer in layers)
    return {"weights": "per layer (allocation.layers): " + ", ".join(
                f"{n} layers {k if k != f'w{FLOAT}' else 'fp32'}" for k, n in
                sorted(counts.items())) + "; symmetric, per output channel",
            "activations": f"per layer and group (allocation.layers): int8 per tensor or "
                           f"float; {floats} layers float in every group, "
                           f"{len(entry['dual_path_layers'])} dual-path",
            "openvino_form": OPENVINO_FORM}
