"""Graph passes for a per-group activation precision: which layer inputs are int8 may differ
between timestep groups (RAQ's step-wise precision), with weights shared by all groups.

- ONNX, one graph per group: a layer whose input is float in that group simply loses its
  QuantizeLinear/DequantizeLinear pair (``drop_activation_quantizers``).
- OpenVINO, one graph for all groups: a FakeQuantize cannot be switched off at run time
  (and a non-constant range would make OpenVINO run it in FP32), so a layer that is int8 in
  some groups and float in others gets both paths, summed with per-step 0/1 weights
  (``add_float_paths``):

      y = s_t · W·DQ(Q(x · u_t, 1)) + m_t · W·x + b

  with (s_t, u_t, m_t) = (s, 1/s, 0) at int8 steps and (0, 1, 1) at float steps, all read
  by ``Gather(table, step_index)``. Both kernels run at every step; the allocation charges
  both (``calibration.allocation``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dq_export.qdq import STEP_INDEX, LayerNode


def drop_activation_quantizers(model: onnx.ModelProto, keys: set[str]) -> None:
    """Give the layers of ``keys`` their float input back (removes ``<key>/QuantizeLinear``,
    its DequantizeLinear and, on the time path, the Gather of its scale)."""
    graph = model.graph
    by_name = {node.name: node for node in graph.node}
    for key in keys:
        quantize = by_name[f"{key}/QuantizeLinear"]
        source = quantize.input[0]
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == f"{key}.dequantized":
                    node.input[i] = source
        for suffix in ("QuantizeLinear", "DequantizeLinear", "Gather"):
            if f"{key}/{suffix}" in by_name:
                graph.node.remove(by_name[f"{key}/{suffix}"])


def float_weight_name(key: str) -> str:
    return f"{key}.weight_float_path"


def path_tables(scales: np.ndarray, float_steps: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step tables of one dual-path layer: the int8 path's output multiplier (the scale,
    0 at float steps), its input multiplier (1/scale, 1 at float steps: finite, so the
    switched-off path computes zeros, never NaN) and the float path's 0/1 weight."""
    scales = np.asarray(scales, np.float32)
    return {"y_scale_table": np.where(float_steps, 0, scales).astype(np.float32),
            "inverse_y_scale_table": np.where(float_steps, 1, 1 / scales).astype(np.float32),
            "float_path_table": float_steps.astype(np.float32)}


def add_float_paths(model: onnx.ModelProto, layers: dict[str, LayerNode],
                    float_steps: dict[str, np.ndarray],
                    float_weights: dict[str, np.ndarray]) -> None:
    """On a shared-scale graph (``dq_export.shared_scales``): give each layer of
    ``float_steps`` (key -> bool per calibrated step) a float twin of its kernel, and switch
    between the two paths by the step's tables. The twin reads ``float_weights[key]`` where
    given (convolutions: OpenVINO would expand int8 weights to FP32 for a float input anyway,
    in more memory than the FP32 weights themselves), else the layer's own dequantized
    weights (Linear layers: OpenVINO keeps them compressed)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    for key, steps in float_steps.items():
        steps = np.asarray(steps, bool)
        scales = numpy_helper.to_array(inits[f"{key}.y_scale_table"])
        for name, values in path_tables(scales, steps).items():
            tensor = numpy_helper.from_array(values, f"{key}.{name}")
            if f"{key}.{name}" in inits:
                inits[f"{key}.{name}"].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
        kernel = layers[key].node
        source = by_name[f"{key}/ToIntegerUnits"].input[0]
        rescale = by_name[f"{key}/FromIntegerUnits"]
        int8_out = f"{key}.int8_path"
        joined = rescale.output[0]
        rescale.output[0] = int8_out
        weight = kernel.input[1]
        if key in float_weights:
            weight = float_weight_name(key)
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(float_weights[key], np.float32), weight))
        twin = helper.make_node(kernel.op_type, [source, weight, *kernel.input[2:]],
                                [f"{key}.float_path"], name=f"{key}/FloatPath")
        twin.attribute.extend(kernel.attribute)
        new = [twin,
               helper.make_node("Gather", [f"{key}.float_path_table", STEP_INDEX],
                                [f"{key}.float_path_weight"], name=f"{key}/GatherFloatPath",
                                axis=0),
               helper.make_node("Mul", [f"{key}.float_path", f"{key}.float_path_weight"],
                                [f"{key}.float_path_weighted"], name=f"{key}/WeighFloatPath"),
               helper.make_node("Add", [int8_out, f"{key}.float_path_weighted"], [joined],
                                name=f"{key}/JoinPaths")]
        index = list(graph.node).index(rescale) + 1
        for offset, node in enumerate(new):
            graph.node.insert(index + offset, node)
