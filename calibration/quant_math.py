"""Quantization maths in ONNX's terms (y_scale, y_zero_point, axis), as pure numpy functions.

``quantize_linear``/``dequantize_linear`` follow the ONNX operators exactly (round half to
even, saturate), so a torch or numpy simulation agrees with ONNX Runtime and OpenVINO.
"""

from __future__ import annotations

import numpy as np

# (qmin, qmax, numpy dtype) per integer type used here
INT_TYPES = {"int8": (-128, 127, np.int8), "uint8": (0, 255, np.uint8)}


def activation_dtype(lower: float) -> str:
    """Unsigned where the activation is never negative (ReLU-like inputs), else signed."""
    return "uint8" if lower >= 0 else "int8"


def activation_scale(threshold: float, dtype: str) -> np.float32:
    """Per-tensor scale for clipping range [-T, T] (int8, symmetric) or [0, T] (uint8)."""
    qmax = 127 if dtype == "int8" else 255
    return np.float32(max(float(threshold), 1e-8) / qmax)


def weight_scales(weight: np.ndarray, axis: int = 0, bits: int = 8) -> np.ndarray:
    """Per-output-channel symmetric scales: max|w| / (2^(bits-1) - 1) along ``axis``."""
    qmax = 2 ** (bits - 1) - 1
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=reduce)
    return (np.maximum(amax, 1e-12) / qmax).astype(np.float32)


def _broadcast(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float32)
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def quantize_linear(x: np.ndarray, y_scale, y_zero_point=0, dtype: str = "int8",
                    axis: int | None = None, bits: int = 8) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / y_scale) + y_zero_point)."""
    qmin, qmax, np_type = INT_TYPES[dtype]
    if bits < 8:  # narrower signed range, stored in int8 (e.g. int4: [-8, 7])
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = _broadcast(y_scale, x.ndim, axis)
    zero = _broadcast(y_zero_point, x.ndim, axis)
    q = np.rint(x.astype(np.float32) / scale) + zero
    return np.clip(q, qmin, qmax).astype(np_type)


def dequantize_linear(q: np.ndarray, x_scale, x_zero_point=0, axis: int | None = None):
    """ONNX DequantizeLinear: (q - x_zero_point) * x_scale."""
    scale = _broadcast(x_scale, q.ndim, axis)
    zero = _broadcast(x_zero_point, q.ndim, axis)
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)
