"""One UNet graph for every timestep group: scales as runtime multipliers around
unit-scale quantizers.

OpenVINO runs a FakeQuantize in int8 only when its ranges are constants, and every compiled
model holds its own copy of the weights. So instead of one graph per group, each quantized
layer ``y = W·DQ(Q(x, s)) + b`` is rewritten with the exact identity

    y = s · (W·DQ(Q(x · 1/s, 1))) + b

where the quantizer has the constant scale 1 (integer units) and the step's scale ``s`` comes
from ``Gather(table, step_index)``: the group's scale at every step of that group, and the
step's own scale on the time-embedding path. The layer is linear and has no zero point
(symmetric int8, or uint8 from 0), so only the bias has to move behind the multiplier.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.fit import QuantParams
from calibration.quant_math import INT_TYPES
from dq_export.qdq import STEP_INDEX, LayerNode, insert_before


def step_scale_tables(params: QuantParams) -> dict[str, np.ndarray]:
    """y_scale of every quantizer at every calibrated step."""
    group_of = params.group_of()
    return {key: np.asarray(q.step_scales if q.step_scales is not None
                            else [q.group_scales[g] for g in group_of], np.float32)
            for key, q in params.activations.items()}


def _detach_bias(graph: onnx.GraphProto, layer: LayerNode) -> str | None:
    """Remove a Conv/Gemm bias input and return a name holding it in broadcastable shape."""
    node = layer.node
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    bias = node.input[2]
    del node.input[2]
    if node.op_type == "Gemm":
        return bias
    inits = {i.name: i for i in graph.initializer}
    values = numpy_helper.to_array(inits[bias])
    name = f"{layer.name}.bias_nchw"
    graph.initializer.append(numpy_helper.from_array(values.reshape(1, -1, 1, 1), name))
    return name


def quantize_activations_shared(model: onnx.ModelProto, layers: dict[str, LayerNode],
                                params: QuantParams) -> None:
    """Unit-scale QuantizeLinear/DequantizeLinear on each layer input, with the step's
    scale applied by a Multiply before it and after the layer (the bias after that)."""
    graph = model.graph
    tables = step_scale_tables(params)
    graph.initializer.append(numpy_helper.from_array(np.float32(1.0), "unit_scale"))
    for key, layer in layers.items():
        if key not in params.activations:  # kept in float (``--target-cpu``)
            continue
        _, _, np_type = INT_TYPES[params.activations[key].dtype]
        zero, scale, inverse = (f"{key}.y_zero_point", f"{key}.y_scale_step",
                                f"{key}.inverse_y_scale_step")
        graph.initializer.extend([
            numpy_helper.from_array(np.zeros((), np_type), zero),
            numpy_helper.from_array(tables[key], f"{key}.y_scale_table"),
            numpy_helper.from_array((1 / tables[key]).astype(np.float32),
                                    f"{key}.inverse_y_scale_table"),
        ])
        node = layer.node
        insert_before(graph, node, [
            helper.make_node("Gather", [f"{key}.y_scale_table", STEP_INDEX], [scale],
                             name=f"{key}/GatherScale", axis=0),
            helper.make_node("Gather", [f"{key}.inverse_y_scale_table", STEP_INDEX], [inverse],
                             name=f"{key}/GatherInverseScale", axis=0),
            helper.make_node("Mul", [node.input[0], inverse], [f"{key}.integer_units"],
                             name=f"{key}/ToIntegerUnits"),
            helper.make_node("QuantizeLinear", [f"{key}.integer_units", "unit_scale", zero],
                             [f"{key}.quantized"], name=f"{key}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{key}.quantized", "unit_scale", zero],
                             [f"{key}.dequantized"], name=f"{key}/DequantizeLinear"),
        ])
        node.input[0] = f"{key}.dequantized"
        bias = _detach_bias(graph, layer)
        output = node.output[0]
        node.output[0] = f"{key}.output_integer_units"
        rescaled = f"{key}.output_rescaled" if bias else output
        after = [helper.make_node("Mul", [node.output[0], scale], [rescaled],
                                  name=f"{key}/FromIntegerUnits")]
        if bias:
            after.append(helper.make_node("Add", [rescaled, bias], [output], name=f"{key}/Bias"))
        index = list(graph.node).index(node) + 1
        for offset, new in enumerate(after):
            graph.node.insert(index + offset, new)
    graph.input.append(helper.make_tensor_value_info(STEP_INDEX, TensorProto.INT64, []))
