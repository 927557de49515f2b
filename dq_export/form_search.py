"""``--form auto``: the quantized UNet form that runs fastest on the exporting CPU, among the
forms whose fidelity holds.

Which form is fastest depends on the CPU and the image size: on one 2-core EPYC (AVX2) float
attention, which OpenVINO fuses into one kernel, beat both int8 forms at 256 and 512, while an
AVX-512 VNNI CPU's int8 kernels may turn that round; and the zero points of asymmetric inputs
and the split shortcut's extra 1x1 convolutions cost time that another CPU may hide. So the
export measures. Each candidate is the recipe with one choice flipped (each other attention
form, zero points off, split shortcut off), fitted from the same statistics and written as the
shared-scale graph OpenVINO compiles, at the export's shapes (one image with guidance). The
candidates' whole calls are timed in turns, so drift on a shared machine falls on all alike,
and each candidate runs the calibration inputs of a few calibrated steps, whose FP32 outputs
the cache holds. The fastest candidate whose relative MSE is within ``FIDELITY_SLACK`` of the
recipe's own wins; every candidate's time and error go into the manifest.

Each choice is flipped alone; combinations are not searched (each candidate is one more
compiled graph: about a minute and a half at 512 on 2 cores).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dq_export.recipe import ATTENTIONS

FIDELITY_SLACK = 0.10  # up to 10 % more relative MSE than the recipe's form (0.4 dB)
FIDELITY_STEPS = 4  # calibrated steps, evenly spread, where each candidate meets FP32
TIMED_CALLS = 3  # whole calls per candidate after the fidelity calls, in turns


def candidates(recipe) -> dict[str, dict]:
    """Each candidate form as recipe overrides, the recipe's own ("as given") first."""
    forms = {"as given": {}}
    for other in ATTENTIONS:
        if other != recipe.attention:
            forms[f"attention {other}"] = {"attention": other}
    zero_points = not recipe.asymmetric_activations
    forms[f"zero points {'on' if zero_points else 'off'}"] = {
        "asymmetric_activations": zero_points}
    split = not recipe.split_shortcut
    forms[f"split shortcut {'on' if split else 'off'}"] = {"split_shortcut": split}
    return forms


def choose(measured: dict[str, dict]) -> str:
    """The fastest candidate whose relative MSE is at most (1 + FIDELITY_SLACK) times the
    first candidate's (the recipe as given, which is always eligible)."""
    limit = next(iter(measured.values()))["relative_mse"] * (1 + FIDELITY_SLACK)
    eligible = [name for name, m in measured.items() if m["relative_mse"] <= limit]
    return min(eligible, key=lambda name: measured[name]["whole_call_ms"])


def fidelity_calls(cache_dir: Path, timesteps: list[int], shapes: dict[str, list[int]]
                   ) -> list[tuple[dict, np.ndarray]]:
    """(feeds, FP32 output) at ``FIDELITY_STEPS`` calibrated steps of the first cached batch,
    its rows cut to the profiling batch: the first unconditional and the first conditional
    row with guidance, the first image without."""
    from calibration.collect import load_trajectories
    from dq_export.cache_export import calibrated_calls

    batch = calibrated_calls(load_trajectories(cache_dir)[0], timesteps)
    rows = len(batch["sample"][0])
    pick = [0, rows // 2] if shapes["sample"][0] == 2 else [0]
    steps = np.linspace(0, len(timesteps) - 1, min(FIDELITY_STEPS, len(timesteps)))
    calls = []
    for k in sorted({int(round(s)) for s in steps}):
        feeds = {"sample": batch["sample"][k][pick],
                 "timestep": np.full(len(pick), batch["timestep"][k], np.float32)}
        if "encoder_hidden_states" in batch:
            feeds["encoder_hidden_states"] = batch["encoder_hidden_states"][pick]
        calls.append((feeds, batch["noise_pred"][k][pick]))
    return calls


def search(components, fp32_onnx: Path, recipe, stats, summary: dict,
           latent_size: int) -> tuple:
    """Measure every candidate; returns (the chosen recipe, its params, the manifest's
    account of the search)."""
    from dq_export.evaluation.fidelity import relative_mse
    from dq_export.graph.quantize_unet import fit_params, write_shared_graph
    from dq_export.openvino_ir.target_cpu import (compiled_request, cpu_description,
                                                  profile_shapes, timed_turns)

    start = time.perf_counter()
    shapes = profile_shapes(components, latent_size)
    calls = fidelity_calls(Path(summary["cache_dir"]), summary["calibrated_timesteps"], shapes)
    fitted, runs = {}, {}
    with tempfile.TemporaryDirectory(dir=fp32_onnx.parent, prefix=".forms-") as scratch:
        for i, (name, overrides) in enumerate(candidates(recipe).items()):
            form = replace(recipe, **overrides)
            params = fit_params(stats, summary["calibrated_timesteps"], form)
            graph = write_shared_graph(fp32_onnx, Path(scratch) / f"form{i}.onnx",
                                       components.unet, form, params)
            fitted[name] = (form, params)
            runs[name] = compiled_request(graph, shapes)
        errors = {name: statistics.mean(relative_mse(reference, request.infer(feeds)[0])
                                        for feeds, reference in calls)
                  for name, (request, _) in runs.items()}
        seconds = dict(zip(runs, timed_turns(list(runs.values()), TIMED_CALLS)))
    measured = {name: {"overrides": candidates(recipe)[name],
                       "whole_call_ms": round(1e3 * seconds[name], 1),
                       "relative_mse": round(errors[name], 6)} for name in runs}
    chosen = choose(measured)
    account = {"cpu": cpu_description()["device"], "shapes": shapes,
               "fidelity_steps": len(calls), "timed_calls": TIMED_CALLS,
               "fidelity_slack": FIDELITY_SLACK, "candidates": measured, "chosen": chosen,
               "seconds": round(time.perf_counter() - start, 1)}
    return (*fitted[chosen], account)
