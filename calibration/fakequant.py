"""Fake quantization of the torch UNet with fitted parameters: the reference simulation.

The exported QDQ graphs must compute what this computes (tested against ONNX Runtime and
OpenVINO), and quality work can run it without exporting. It uses the same quant_math
functions as the export, so the rounding is ONNX's.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from calibration.fit import QuantParams
from calibration.layers import activation_keys, quantized_layers
from calibration.quant_math import dequantize_linear, quantize_linear, weight_scales


def fake_quant_activation(x: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    return dequantize_linear(quantize_linear(x, np.float32(scale), 0, dtype), np.float32(scale), 0)


def fake_quant_weight(weight: np.ndarray, bits: int = 8, split: int | None = None) -> np.ndarray:
    """Per-output-channel weights; a split shortcut's two input halves are two weights."""
    if split is not None:
        return np.concatenate([fake_quant_weight(w, bits) for w in
                               (weight[:, :split], weight[:, split:])], axis=1)
    scale = weight_scales(weight, 0, bits)
    return dequantize_linear(quantize_linear(weight, scale, 0, "int8", 0, bits), scale, 0, 0)


@contextmanager
def fake_quantized(unet, params: QuantParams | None, group: int, step: int,
                   splits: dict[str, int], bits: dict[str, int] | None = None):
    """Within the block, ``unet`` runs with quantize-dequantized weights (``bits`` per layer,
    default 8; 32 leaves a layer's weights float) and (if ``params``) inputs quantized with
    ``group``'s scales, or ``step``'s on per-step-table layers; a layer without quantizers
    in ``params`` keeps a float input."""
    import torch

    bits = bits or {}
    layers = {n: m for n, m in quantized_layers(unet).items() if bits.get(n, 8) < 32}
    originals = {name: m.weight.data.clone() for name, m in layers.items()}
    hooked = {n: m for n, m in quantized_layers(unet).items() if params is not None and all(
        k in params.activations for k in activation_keys(n, splits))}

    def hook_for(name):
        def hook(module, inputs):
            x = inputs[0].detach().numpy()
            keys = activation_keys(name, splits)
            parts = np.split(x, [splits[name]], axis=1) if name in splits else [x]
            out = []
            for key, part in zip(keys, parts):
                q = params.activations[key]
                scale = q.step_scales[step] if q.step_scales is not None else \
                    q.group_scales[group]
                out.append(fake_quant_activation(part, scale, q.dtype))
            return (torch.from_numpy(np.concatenate(out, axis=1)),) + tuple(inputs[1:])
        return hook

    handles = []
    try:
        for name, module in layers.items():
            module.weight.data = torch.from_numpy(
                fake_quant_weight(originals[name].numpy(), bits.get(name, 8), splits.get(name)))
        for name, module in hooked.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        yield unet
    finally:
        for handle in handles:
            handle.remove()
        for name, module in layers.items():
            module.weight.data = originals[name]
