"""Rate-distortion curves per layer and timestep group (the rate-distortion paper's
Algorithm 1), measured on the network output.

For every quantized layer and group, the torch UNet runs on that group's calibration inputs
with only that layer quantized, all else float: its weights at 8 bits (and 4 for a Linear),
then its input at int8 with the group's fitted scale (the step's own on the time-embedding
path). Each point's distortion is the paper's MSE + SSIM term
(``dq_export.evaluation.fidelity``), per sample, averaged over the group's inputs. Weights
and inputs get separate curves, as in the paper, and the allocation adds them (property 1;
``benchmarks/additivity.py`` checks it).
Rates follow from the layer's size (``calibration.allocation``), so only distortions are
measured here, and cached as JSON beside the calibration data.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from calibration.allocation import FLOAT, LayerCurves
from calibration.collect import read_cached
from calibration.fit import QuantParams
from calibration.layers import activation_keys, quantized_layers
from dq_export.filesystem import replacing

STEPS_PER_GROUP = 2  # calibrated steps per group whose inputs are measured
CURVES_VERSION = 1


def group_inputs(calls: list[dict], params: QuantParams, per_group: int = STEPS_PER_GROUP,
                 conditional_only: bool = False) -> list[list[tuple[int, dict]]]:
    """(step, UNet input) pairs of each group: ``per_group`` steps spread evenly over the
    group (its first and last among them), from the first calibration batch; with
    ``conditional_only`` only the prompts' rows of each guided call (half the cost)."""
    step_of = {t: k for k, t in enumerate(params.timesteps)}
    first = {}
    for call in calls:  # calls are batch-major: the first call of each step is batch 0's
        first.setdefault(step_of[int(round(float(call["timestep"][0])))], call)
    chosen = []
    for steps in params.groups:
        picks = sorted({steps[round(i)] for i in np.linspace(0, len(steps) - 1, per_group)})
        chosen.append([(k, _conditional(first[k]) if conditional_only else first[k])
                       for k in picks])
    return chosen


def _conditional(call: dict) -> dict:
    """The second half of a guided call's rows: [uncond; cond] -> cond."""
    half = len(call["sample"]) // 2
    return {name: value[half:] for name, value in call.items()}


def layer_kind(module) -> str:
    import torch

    return "conv" if isinstance(module, torch.nn.Conv2d) else "linear"


def output_distortion(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean over samples of relative MSE + (1 - SSIM) of one sample's output."""
    from dq_export.evaluation.fidelity import distortion

    return float(np.mean([distortion(r, o) for r, o in zip(reference, output)]))


def _run(unet, call: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        return unet(*(torch.from_numpy(call[k]) for k in ("sample", "timestep",
                                                          "encoder_hidden_states"))).sample.numpy()


def measure(unet, params: QuantParams, inputs: list[list[tuple[int, dict]]],
            splits: dict[str, int], configs: list[dict], progress: bool = True
            ) -> list[list[float]]:
    """Distortion of each config (``{"bits": {layer: bits}, "inputs": [layers]}``: weight
    bits where not float, layers whose input is int8) in each group: [configs, groups]."""
    from tqdm.auto import tqdm

    from calibration.fakequant import fake_quantized

    everything = dict.fromkeys(quantized_layers(unet), FLOAT)
    references = [[_run(unet, call) for _, call in group] for group in inputs]
    result = []
    for config in tqdm(configs, desc="rate-distortion points", disable=not progress):
        keys = {k for name in config["inputs"] for k in activation_keys(name, splits)}
        subset = QuantParams(params.timesteps, params.groups,
                             {k: q for k, q in params.activations.items() if k in keys})
        bits = {**everything, **config["bits"]}
        row = []
        for g, group in enumerate(inputs):
            values = []
            for (step, call), reference in zip(group, references[g]):
                with fake_quantized(unet, subset, g, step, splits, bits):
                    values.append(output_distortion(reference, _run(unet, call)))
            row.append(float(np.mean(values)))
        result.append(row)
    return result


def single_layer_configs(unet) -> list[tuple[str, str, dict]]:
    """(layer, point, config) for every curve point: weights at 8 (and 4 for a Linear) bits,
    and the int8 input."""
    configs = []
    for name, module in quantized_layers(unet).items():
        for bits in (8, 4) if layer_kind(module) == "linear" else (8,):
            configs.append((name, f"w{bits}", {"bits": {name: bits}, "inputs": []}))
        configs.append((name, "a8", {"bits": {}, "inputs": [name]}))
    return configs


def build_curves(unet, params: QuantParams, calls: list[dict], splits: dict[str, int],
                 per_group: int = STEPS_PER_GROUP, progress: bool = True,
                 conditional_only: bool = False) -> dict:
    """Every layer's curves, as JSON-ready data (``load_curves`` reads it back)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small calls: one thread wastes less on 2 shared cores
    start = time.perf_counter()
    try:
        inputs = group_inputs(calls, params, per_group, conditional_only)
        configs = single_layer_configs(unet)
        points = measure(unet, params, inputs, splits, [c for _, _, c in configs], progress)
    finally:
        torch.set_num_threads(threads)
    layers = {}
    modules = quantized_layers(unet)
    for (name, point, _), row in zip(configs, points):
        entry = layers.setdefault(name, {"name": name, "kind": layer_kind(modules[name]),
                                         "params": int(modules[name].weight.numel()),
                                         "weight_distortion": {}})
        if point == "a8":
            entry["input_distortion"] = row
        else:
            entry["weight_distortion"][point[1:]] = row
    return {"version": CURVES_VERSION, "shares": group_shares(params),
            "conditional_only": conditional_only,
            "steps_measured": [[k for k, _ in group] for group in inputs],
            "seconds": round(time.perf_counter() - start, 1), "layers": list(layers.values())}


def group_shares(params: QuantParams) -> list[float]:
    """Each group's share of the calibrated steps: its weight in the total distortion."""
    return [len(steps) / len(params.timesteps) for steps in params.groups]


def load_curves(data: dict, ms: dict[str, dict[str, float]] | None = None) -> list[LayerCurves]:
    return [LayerCurves(layer["name"], layer["kind"], layer["params"],
                        {int(b): v for b, v in layer["weight_distortion"].items()},
                        layer["input_distortion"], None if ms is None else ms[layer["name"]])
            for layer in data["layers"]]


def curves_key(params: QuantParams, identity: dict, per_group: int) -> str:
    """What cached curves depend on: the fitted parameters, the calibration they came from."""
    text = json.dumps({"params": params.to_dict(), "identity": identity,
                       "per_group": per_group, "version": CURVES_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_curves(cache_dir: Path, key: str, build) -> dict:
    """Curves from ``cache_dir/curves-KEY.json``, built (and written) when missing."""
    path = Path(cache_dir) / f"curves-{key}.json"
    if path.is_file():
        return read_cached(path, lambda p: json.loads(p.read_text()))
    data = build()
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data) + "\n")
    return data
