"""The feature cache's schedule, chosen at export time with the exported graphs in the loop.

Along the calibration trajectories (the recorded FP32 inputs x_s and outputs eps_s), the
exported full UNet gives every step's error when it runs in full, and the exported shallow
UNet, fed the feature the full UNet returned at an earlier step f, gives the error of step s
reusing f's feature. Both are the real OpenVINO graphs, quantized as deployed, so quantization
and caching errors are measured together (CacheQuant's point: they compound). The errors are
relative MSEs against FP32 pooled over the calibration samples,
sum ||eps^_s - eps_s||^2 / sum ||eps_s||^2, and calibration.cache_schedule picks the steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from calibration.cache_schedule import (dp_full_steps, max_gap, schedule_error,
                                        uniform_full_steps)
from calibration.collect import PER_ROW
from deploy.feature_cache import FEATURE
from dq_export.errors import UserError

ERRORS_FILE = "cache_errors.json"
DEFAULT_CACHE_FRACTION = 1 / 3  # full steps of the default DP schedule, as a share of steps
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def full_steps_wanted(recipe, num_steps: int) -> int:
    """K: the recipe's, or the default share of the calibrated steps."""
    k = recipe.cache_steps or max(1, math.ceil(num_steps * DEFAULT_CACHE_FRACTION))
    if not 1 <= k <= num_steps:
        raise UserError(f"--cache-steps {k} is outside [1, {num_steps}]: the calibration has "
                        f"{num_steps} steps")
    return k


def check_schedule(recipe, num_steps: int) -> None:
    """Fail before any heavy work on a schedule the calibration cannot hold."""
    if recipe.cache_interval is not None:
        if recipe.cache_interval > num_steps:
            raise UserError(f"--cache-interval {recipe.cache_interval} is longer than the "
                            f"{num_steps} calibrated steps: use 1 to {num_steps}")
        return
    full_steps_wanted(recipe, num_steps)


def calibrated_calls(batch: dict, timesteps: list[int]) -> dict:
    """A cached batch with one call per calibrated step, in step order: PNDM calls the UNet
    twice at its second timestep, and the first of the two is the step's."""
    recorded = [int(round(float(t))) for t in batch["timestep"]]
    keep = [recorded.index(t) for t in timesteps]
    return {name: values if name in PER_ROW else values[keep]
            for name, values in batch.items()}


def reference_outputs(unet, batch: dict) -> np.ndarray:
    """The FP32 torch UNet's outputs on a cached batch (for caches recorded without them)."""
    import torch

    text = [torch.from_numpy(batch["encoder_hidden_states"])] \
        if "encoder_hidden_states" in batch else []
    with torch.no_grad():
        return np.stack([unet(torch.from_numpy(x), torch.full((len(x),), float(t)), *text)
                         .sample.numpy() for x, t in zip(batch["sample"], batch["timestep"])])


def measure_errors(full_xml: Path, shallow_xml: Path, trajectories: list[dict], gap: int,
                   progress: bool = True) -> tuple:
    """(full_error [S], cached_error [S, S]): relative MSE of every step in full, and of
    step s reusing step f's feature for 0 < s - f <= ``gap`` (nan elsewhere)."""
    import openvino as ov
    from tqdm.auto import tqdm

    core = ov.Core()
    full = core.compile_model(core.read_model(full_xml), "CPU", OV_CONFIG).create_infer_request()
    shallow = core.compile_model(core.read_model(shallow_xml), "CPU",
                                 OV_CONFIG).create_infer_request()
    steps = len(trajectories[0]["timestep"])
    full_sq, cached_sq = np.zeros(steps), np.zeros((steps, steps))
    norm = np.zeros(steps)
    calls = len(trajectories) * sum(1 + min(gap, steps - 1 - f) for f in range(steps))
    bar = tqdm(total=calls, desc="cache schedule: UNet calls", disable=not progress)

    def inputs(batch, s):
        x = batch["sample"][s]
        feed = {"sample": x, "timestep": np.full(len(x), batch["timestep"][s], np.float32)}
        if "encoder_hidden_states" in batch:
            feed["encoder_hidden_states"] = batch["encoder_hidden_states"]
        return feed  # the graphs find the calibrated step from the timestep themselves

    for batch in trajectories:
        reference = batch["noise_pred"]
        norm += np.square(reference.astype(np.float64)).sum(axis=tuple(range(1, reference.ndim)))
        for f in range(steps):
            outputs = full.infer(inputs(batch, f))
            full_sq[f] += _squared_error(outputs["noise_pred"], reference[f])
            feature = outputs[FEATURE]
            bar.update()
            for s in range(f + 1, min(steps, f + gap + 1)):
                out = shallow.infer({**inputs(batch, s), FEATURE: feature})["noise_pred"]
                cached_sq[f, s] += _squared_error(out, reference[s])
                bar.update()
    bar.close()
    cached = np.full((steps, steps), np.nan)
    for f in range(steps):
        stop = min(steps, f + gap + 1)
        cached[f, f + 1:stop] = cached_sq[f, f + 1:stop] / norm[f + 1:stop]
    return full_sq / norm, cached


def _squared_error(output: np.ndarray, reference: np.ndarray) -> float:
    return float(np.square(output.astype(np.float64) - reference).sum())


def choose_schedule(root: Path, recipe, timesteps: list[int], unet, cache_dir: Path | None,
                    ir_paths: dict) -> dict:
    """The manifest's ``cache`` entry; the DP also writes the measured errors to
    ``ERRORS_FILE`` (with the uniform schedule of the same K beside it, for comparison)."""
    from calibration.collect import load_trajectories
    from dq_export.graph.deep_cache import feature_module

    steps = len(timesteps)
    entry = {"branch": recipe.cache_branch, "feature": feature_module(unet, recipe.cache_branch),
             "timesteps": list(timesteps), "errors_file": None}
    if recipe.cache_interval is not None:
        entry["schedule"] = {"kind": "uniform", "interval": recipe.cache_interval,
                             "full_steps": uniform_full_steps(steps, recipe.cache_interval)}
        return entry
    k = full_steps_wanted(recipe, steps)
    trajectories = [calibrated_calls(batch, timesteps) for batch in load_trajectories(cache_dir)]
    for batch in trajectories:
        if "noise_pred" not in batch:  # a cache recorded before the outputs were kept
            batch["noise_pred"] = reference_outputs(unet, batch)
    gap = max_gap(steps, k)
    full_error, cached_error = measure_errors(ir_paths["unet"], ir_paths["unet_shallow"],
                                              trajectories, gap)
    chosen = dp_full_steps(full_error, cached_error, k)
    uniform = uniform_full_steps(steps, math.ceil(steps / k))
    predicted = {name: schedule_error(full_error, cached_error, f)
                 for name, f in (("dp", chosen), ("uniform", uniform))}
    entry["schedule"] = {
        "kind": "dp", "full_steps": chosen, "metric": "relative_mse", "max_gap": gap,
        "mean_error": round(float(predicted["dp"].mean()), 6),
        "uniform_mean_error": round(float(predicted["uniform"].mean()), 6),
        "uniform_full_steps": uniform}
    entry["errors_file"] = ERRORS_FILE
    (root / ERRORS_FILE).write_text(json.dumps({
        "metric": "relative MSE against the FP32 UNet on the calibration trajectories",
        "full_error": _rounded(full_error), "cached_error": [_rounded(r) for r in cached_error],
        "per_step": {name: _rounded(e) for name, e in predicted.items()}}) + "\n")
    return entry


def _rounded(values) -> list:
    return [None if not np.isfinite(v) else float(f"{v:.6g}") for v in values]
