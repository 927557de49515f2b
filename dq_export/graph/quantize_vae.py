"""The VAE decoder in W8A8 (``--vae int8``), calibrated on what it decodes in deployment.

The decoder runs once per image, on the latents the sampler ends with, so its activation
scales are fitted on exactly those: the final latents of the FP32 calibration trajectories,
which the calibration cache keeps. There are no timesteps, so there is one set of scales,
fitted by the UNet's estimators and written by the UNet's QDQ passes: per-channel int8
weights and a per-tensor input quantizer on every Conv and Linear (uint8 with a zero point
on SiLU's lopsided inputs). Attention's products, norms and activation functions stay in
float. The scales are constants, so OpenVINO makes each quantizer a FakeQuantize with a
constant range and runs the convolutions as int8 kernels: the portable QDQ ONNX graph and
the IR are the same computation, and deploy loads the IR like the FP32 decoder's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calibration.fit import QuantParams, fit
from calibration.layers import quantized_layers
from calibration.statistics import StepStatistics, recording, statistic_keys

PARAMS_FILE = "vae_decoder_quant_params.json"
QDQ_ONNX = "vae_decoder_qdq.onnx"
GRAPH_SCOPE = "/vae"  # VaeDecoderGraph calls vae.decode, so the exporter names no vae scope


def decoder_modules(vae):
    """The autoencoder's modules that decoding runs, named as in the autoencoder
    (``post_quant_conv``, ``decoder.conv_in``, ...): the encoder is never calibrated."""
    import torch

    return torch.nn.ModuleDict({name: getattr(vae, name) for name in ("post_quant_conv",
                                                                      "decoder")})


def fit_decoder(vae, latents: np.ndarray, estimator: str, asymmetric: bool) -> QuantParams:
    """Input scales of every decoder layer from ``latents`` (the decoder's input: the
    sampler's latents over the latent scaling), decoded one at a time (a 512x512 image's
    activations are GBs)."""
    import torch

    from dq_export.graph.onnx_export import VaeDecoderGraph

    modules, graph = decoder_modules(vae), VaeDecoderGraph(vae)
    stats = StepStatistics(statistic_keys(modules, splits={}), 1)
    with recording(modules, stats, lambda: 0, splits={}), torch.no_grad():
        for latent in latents:
            graph(torch.from_numpy(latent[None]))
    params = fit(stats, [0], 1, "uniform", estimator, time_tables=False, split_shortcut=False,
                 asymmetric=asymmetric)
    return params.restricted_attention("float")


def scope_node_names(model) -> None:
    """Prefix the exporter's node names with the autoencoder's scope, so that ``qdq``'s
    module names (``/vae/decoder/conv_in/Conv`` -> ``decoder.conv_in``) are the torch ones."""
    for node in model.graph.node:
        if node.name.startswith("/"):
            node.name = GRAPH_SCOPE + node.name


def write_decoder_graph(fp32_onnx: Path, path: Path, vae, params: QuantParams,
                        weight_range: str) -> Path:
    """The QDQ decoder graph: int8 weights (7 bits with ``weight_range`` "half") and the
    fitted input quantizers on every Conv and Linear."""
    import onnx

    from dq_export.graph.qdq import build_qdq_unet
    from dq_export.graph.quantize_unet import in_weight_range

    model = onnx.load(str(fp32_onnx), load_external_data=True)
    scope_node_names(model)
    bits = in_weight_range({name: 8 for name in quantized_layers(decoder_modules(vae))},
                           weight_range)
    build_qdq_unet(model, params, {}, bits)
    onnx.save_model(model, str(path))  # int8 weights: SD's decoder is about 50 MB
    return path


def quantize_decoder(components, fp32_onnx: Path, root: Path, recipe,
                     final_latents: np.ndarray) -> tuple[Path, dict]:
    """Fit, write the QDQ graph beside ``fp32_onnx`` and the scales into ``root``; return
    the graph and the manifest's account of the decoder."""
    latents = (final_latents / np.float32(components.latent_scaling)).astype(np.float32)
    params = fit_decoder(components.vae, latents, recipe.estimator,
                         recipe.asymmetric_activations)
    path = write_decoder_graph(fp32_onnx, fp32_onnx.with_name(QDQ_ONNX), components.vae, params,
                               recipe.weight_range)
    (root / PARAMS_FILE).write_text(json.dumps(params.to_dict()) + "\n")
    half = recipe.weight_range == "half"
    return path, {"form": "int8", "quantization": {  # ("weights" names an IR's weight file)
        "weights": "int8, symmetric, per output channel, at every Conv and Linear"
                   + (", in 7 bits [-63, 63]" if half else ""),
        "activations": "int8 per tensor at every Conv and Linear input (uint8 with a zero "
                       "point where lopsided, uint8 from 0 where never negative); attention's "
                       "products, norms and activation functions in float",
        "params": PARAMS_FILE,
        "calibration": {"latents": len(latents), "estimator": recipe.estimator,
                        "from": "the final latents of the calibration trajectories"},
    }}


def decoder_form(recipe) -> str:
    """What the export's decoder IR holds: int8 (``--vae int8``), fp16 or fp32 weights."""
    return "int8" if recipe.vae == "int8" else ("fp16" if recipe.bits == "fp16" else "fp32")
