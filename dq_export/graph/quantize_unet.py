"""The timestep-aware quantized UNet: calibrate, fit, and write its graphs.

- one portable QDQ ONNX graph per timestep group, all referencing one external weight file
  (the int8 weights are on disk once); they differ only in their activation scales;
- one shared-scale graph for OpenVINO (``dq_export.graph.shared_scales``): every group in one
  compiled model, the step's scales applied by runtime multipliers.

A feature cache's shallow UNet (``unet_shallow``) gets the same passes on the layers it has:
the same weights, groups, scales and per-step tables as the full UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from calibration.collect import CalibrationSettings
from calibration.fit import QuantParams, fit
from calibration.layers import quantized_layers, shortcut_splits
from dq_export.graph.onnx_export import save_with_external_data
from dq_export.graph.qdq import build_qdq_unet, graph_modules, quantize_activations, set_group
from dq_export.graph.shared_scales import quantize_activations_shared

WEIGHTS_FILE = "unet_weights.data"  # the full UNet's; a shallow UNet's is <name>_weights.data
OPENVINO_FORM = "shared_scales"


def calibration_settings(recipe) -> CalibrationSettings:
    return CalibrationSettings(scheduler=recipe.calib_scheduler, steps=recipe.calib_steps,
                               num_prompts=recipe.calib_prompts, every=recipe.calib_every,
                               batch_size=recipe.calib_batch, seed=recipe.seed,
                               eta=recipe.calib_eta)


def fit_params(stats, timesteps: list[int], recipe) -> QuantParams:
    """The recipe's activation scales per group (and per-step tables) from the statistics,
    restricted to the recipe's attention form."""
    params = fit(stats, timesteps, recipe.groups, recipe.group_split, recipe.estimator,
                 recipe.time_tables, recipe.split_shortcut, recipe.asymmetric_activations)
    return params.restricted_attention(recipe.attention)


def weight_bits(unet, bits: str, weight_range: str = "full") -> dict[str, int]:
    """Bits of every quantized layer's weights. ``w4*``: int4 for Linear layers, the ones
    OpenVINO's CPU plugin runs with int4 weights; convolutions (conv_in, conv_out and the
    shortcuts among them, RAQ's sensitive layers) stay int8."""
    import torch

    four = bits.startswith("w4")
    return in_weight_range({name: 4 if four and isinstance(module, torch.nn.Linear) else 8
                            for name, module in quantized_layers(unet).items()}, weight_range)


def in_weight_range(bits: dict[str, int], weight_range: str) -> dict[str, int]:
    """``weight_range`` "half": int8 weights in 7 bits, [-63, 63], which no int8 kernel
    without VNNI can overflow (dq_export.openvino_ir.cpu_isa); int4 and float layers as they
    are."""
    return {name: 7 if b == 8 and weight_range == "half" else b for name, b in bits.items()}


def _quantized_graph(fp32_onnx: Path, unet, recipe, params: QuantParams | None,
                     activations=quantize_activations, subset: bool = False) -> onnx.ModelProto:
    """The QDQ passes on an FP32 UNet graph; ``subset``: a graph that runs only some of the
    UNet's layers (a shallow UNet), which quantizes those."""
    model = onnx.load(str(fp32_onnx), load_external_data=True)
    splits = shortcut_splits(unet) if recipe.split_shortcut else {}
    bits = weight_bits(unet, recipe.bits, recipe.weight_range)
    if subset:
        present = graph_modules(model)
        bits = {name: b for name, b in bits.items() if name in present}
        splits = {name: k for name, k in splits.items() if name in present}
        params = params.only(present) if params is not None else None
    return build_qdq_unet(model, params, splits, bits, activations)


def write_group_graphs(fp32_onnx: Path, out_dir: Path, unet, recipe,
                       params: QuantParams | None, name: str = "unet") -> list[Path]:
    """QDQ graphs, one per group (one graph when activations stay in float), sharing one
    weight file. ``name``: "unet", or "unet_shallow" for a feature cache's shallow UNet."""
    model = _quantized_graph(fp32_onnx, unet, recipe, params, subset=name != "unet")
    groups = len(params.groups) if params is not None else 1
    paths = []
    for g in range(groups):
        path = out_dir / (f"{name}_group{g}.onnx" if params is not None else f"{name}_qdq.onnx")
        if params is not None:
            set_group(model, params, g)
        if g == 0:  # writes the shared weight file; later groups keep its references
            save_with_external_data(model, path,
                                    WEIGHTS_FILE if name == "unet" else f"{name}_weights.data")
        else:
            onnx.save_model(model, str(path))
        paths.append(path)
    return paths


def write_shared_graph(fp32_onnx: Path, path: Path, unet, recipe, params: QuantParams,
                       subset: bool = False) -> Path:
    """The one graph OpenVINO compiles for all groups (an intermediate: the IR keeps it)."""
    model = _quantized_graph(fp32_onnx, unet, recipe, params, quantize_activations_shared,
                             subset)
    save_with_external_data(model, path, path.name + ".data")
    return path


def quantization_manifest(recipe, params: QuantParams | None, summary: dict | None,
                          nncf_settings: dict | None = None) -> dict:
    """What the manifest says about the quantized UNet, for people and for deploy."""
    if nncf_settings is not None:
        return {"method": "nncf", "bits": recipe.bits, "nncf": nncf_settings,
                "weights_and_activations": "chosen by nncf.quantize on the OpenVINO IR; "
                                           "one set of scales for all steps",
                "onnx": "the FP32 source graph (NNCF quantizes the OpenVINO model)",
                "calibration": summary}
    entry = {
        "method": "dq", "bits": recipe.bits,
        "weights": ("int4 for every Linear, int8 for every Conv of the UNet"
                    if recipe.bits.startswith("w4") else "int8 for every Conv and Linear of the UNet")
                   + ": symmetric, per output channel"
                   + (", int8 in 7 bits [-63, 63] (no int16 saturation on CPUs without VNNI)"
                      if recipe.weight_range == "half" else ""),
        "activations": (activation_summary(recipe) if params is not None
                        else "float (weight-only)"),
    }
    if params is None:
        return entry
    timesteps = params.timesteps
    entry.update({
        "params": "quant_params.json",
        # no step_index input: every graph computes it from its timestep (exports before
        # dq-export 0.2 had this input, named here, and deploy fed it)
        "step_index_input": None,
        "step_selection": "in the graph: step_index = argmin |calibrated timesteps - timestep| "
                          "(the first of two equally near)",
        "openvino_form": {
            "form": OPENVINO_FORM,
            "what": "one graph for all groups: unit-scale int8 quantizers, each step's scales "
                    "applied by runtime multipliers read from per-step tables at step_index",
        },
        "timesteps": timesteps,
        "step_to_group": params.group_of(),
        "groups": [{"steps": steps, "timesteps": [timesteps[steps[0]], timesteps[steps[-1]]]}
                   for steps in params.groups],
        "calibration": summary,
    })
    return entry


def activation_summary(recipe) -> str:
    """The manifest's one-line account of what runs on int8 activations."""
    layers = ("per tensor at every Conv and Linear input: uint8 with a zero point where the "
              "input is lopsided (SiLU's), uint8 from 0 where never negative, else int8"
              if recipe.asymmetric_activations else
              "per tensor at every Conv and Linear input: uint8 where never negative, else int8")
    attention = {"float": "attention's Q.K^T and A.V in float",
                 "qkv": "attention's q, k, v int8, its softmax output float",
                 "int8": "attention's q, k, v int8 and its softmax output uint8"}[recipe.attention]
    return f"{layers}; {attention}; norms and activation functions in float"


def write_params(root: Path, params: QuantParams) -> None:
    (root / "quant_params.json").write_text(json.dumps(params.to_dict()) + "\n")
