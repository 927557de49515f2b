"""Fake quantization of the torch UNet with fitted parameters: the reference simulation.

The exported QDQ graphs must compute what this computes (tested against ONNX Runtime and
OpenVINO), and quality work can run it without exporting. It uses the same quant_math
functions as the export, so the rounding is ONNX's.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from calibration.fit import QuantParams
from calibration.layers import (PROJECTIONS, activation_keys, attention_keys, attention_modules,
                                quantized_layers)
from calibration.quant_math import dequantize_linear, quantize_linear, weight_scales


def fake_quant_activation(x: np.ndarray, scale: float, dtype: str, zero_point: int = 0) -> np.ndarray:
    scale = np.float32(scale)
    return dequantize_linear(quantize_linear(x, scale, zero_point, dtype), scale, zero_point)


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
    default 8; 32 leaves a layer's weights float) and (if ``params``) quantized inputs and
    attention operands (the outputs of to_q, to_k, to_v, where ``params`` has them), with
    ``group``'s scales, or ``step``'s on per-step-table layers; what ``params`` leaves out
    stays float."""
    import torch

    bits = bits or {}
    layers = {n: m for n, m in quantized_layers(unet).items() if bits.get(n, 8) < 32}
    modules = dict(unet.named_modules())
    originals = {name: m.weight.data.clone() for name, m in layers.items()}
    hooked = {n: m for n, m in quantized_layers(unet).items() if params is not None and all(
        k in params.activations for k in activation_keys(n, splits))}

    def quantized(key, x):
        q = params.activations.get(key)
        if q is None:
            return x
        scale = q.step_scales[step] if q.step_scales is not None else q.group_scales[group]
        return fake_quant_activation(x, scale, q.dtype, q.zero_point)

    def input_hook(name):
        def hook(module, inputs):
            x = inputs[0].detach().numpy()
            parts = np.split(x, [splits[name]], axis=1) if name in splits else [x]
            out = [quantized(key, part) for key, part in zip(activation_keys(name, splits), parts)]
            return (torch.from_numpy(np.concatenate(out, axis=1)),) + tuple(inputs[1:])
        return hook

    def output_hook(key):
        def hook(module, inputs, output):
            return torch.from_numpy(quantized(key, output.detach().numpy()))
        return hook

    handles = []
    try:
        for name, module in layers.items():
            module.weight.data = torch.from_numpy(
                fake_quant_weight(originals[name].numpy(), bits.get(name, 8), splits.get(name)))
        for name, module in (quantized_layers(unet).items() if params else ()):
            handles.append(module.register_forward_pre_hook(input_hook(name)))
        for name, projections in (attention_modules(unet).items() if params else ()):
            handles += [modules[p].register_forward_hook(output_hook(key))
                        for key, p in zip(attention_keys(name, PROJECTIONS), projections)]
            if f"{name}@p" in params.activations:
                handles.append(_quantized_softmax(modules[name], lambda a, key=f"{name}@p":
                                                  torch.from_numpy(quantized(key, a.numpy()))))
        yield unet
    finally:
        for handle in handles:
            handle.remove()
        for name, module in layers.items():
            module.weight.data = originals[name]


class _Restore:
    """A handle (like torch's hook handles) undoing ``_quantized_softmax``."""

    def __init__(self, module, processor):
        self.module, self.processor = module, processor

    def remove(self) -> None:
        self.module.set_processor(self.processor)
        del self.module.get_attention_scores  # back to the class's method


def _quantized_softmax(module, quantize) -> _Restore:
    """Run ``module`` with diffusers' explicit AttnProcessor, whose softmax output passes
    through ``quantize`` (the fused SDPA processors never expose it)."""
    from diffusers.models.attention_processor import AttnProcessor

    restore = _Restore(module, module.processor)
    scores = module.get_attention_scores
    module.get_attention_scores = lambda *args, **kwargs: quantize(scores(*args, **kwargs))
    module.set_processor(AttnProcessor())
    return restore
