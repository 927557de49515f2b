"""One UNet graph for every timestep group: scales as runtime multipliers around
unit-scale quantizers.

OpenVINO runs a FakeQuantize in int8 only when its ranges are constants, and every compiled
model holds its own copy of the weights. So instead of one graph per group, each quantized
layer ``y = W·DQ(Q(x, s)) + b`` is rewritten with the exact identity

    y = s · (W·DQ(Q(x · 1/s, 1))) + b

where the quantizer has the constant scale 1 (integer units) and the step's scale ``s`` comes
from ``Gather(table, step_index)``: the group's scale at every step of that group, and the
step's own scale on the time-embedding path. The layer is linear and the zero point is one
constant per quantizer (the integer range is the same at every step), so only the bias has
to move behind the multiplier.
An attention's products are bilinear: ``(q·c)(k^T·c)`` is rescaled by ``s_q·s_k`` before
the softmax, and ``A·v`` by ``s_v`` (``s_p·s_v`` when the softmax output is quantized too).
The fit keeps ``s_q·s_k`` the same in every group (``calibration.fit.constant_score_scales``),
so the scores' multiplier is a constant: a runtime one would be one more pass over the
[heads, tokens, tokens] scores, the largest tensor of the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.fit import QuantParams
from calibration.quant_math import INT_TYPES
from dq_export.graph.qdq import STEP_INDEX, LayerNode, activation_edges, insert_before


CONSTANT_RTOL = 1e-6  # a product of scales this close at every step is one constant


@dataclass
class Rescale:
    """A linear node whose output is in integer units of the product of ``keys``' scales."""
    node: onnx.NodeProto
    keys: list[str]
    name: str  # prefix of the nodes and tables added for it
    bias: str | None = None  # initializer added after the rescale (a detached Conv/Gemm bias)
    # an attention product: a constant multiplier where the product is the same at every step
    # (layers keep their lookup table, which mixed precision's dual paths rewrite)
    foldable: bool = False


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


def _to_integer_units(graph: onnx.GraphProto, key: str, node: onnx.NodeProto, index: int,
                      table: np.ndarray, quantizer) -> None:
    """``x -> DQ(Q(x · 1/s, 1, z), 1, z)`` on input ``index`` of ``node``: the integers
    -z..255-z (or -128..127), the same range at every step."""
    _, _, np_type = INT_TYPES[quantizer.dtype]
    zero, inverse = f"{key}.y_zero_point", f"{key}.inverse_y_scale_step"
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(quantizer.zero_point, np_type), zero),
        numpy_helper.from_array((1 / table).astype(np.float32), f"{key}.inverse_y_scale_table"),
    ])
    insert_before(graph, node, [
        helper.make_node("Gather", [f"{key}.inverse_y_scale_table", STEP_INDEX], [inverse],
                         name=f"{key}/GatherInverseScale", axis=0),
        helper.make_node("Mul", [node.input[index], inverse], [f"{key}.integer_units"],
                         name=f"{key}/ToIntegerUnits"),
        helper.make_node("QuantizeLinear", [f"{key}.integer_units", "unit_scale", zero],
                         [f"{key}.quantized"], name=f"{key}/QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{key}.quantized", "unit_scale", zero],
                         [f"{key}.dequantized"], name=f"{key}/DequantizeLinear"),
    ])
    node.input[index] = f"{key}.dequantized"


def _from_integer_units(graph: onnx.GraphProto, rescale: Rescale,
                        tables: dict[str, np.ndarray]) -> None:
    """Multiply ``rescale.node``'s output by the step's product of scales (then add the bias)."""
    node, name = rescale.node, rescale.name
    table = np.prod([tables[key] for key in rescale.keys], axis=0).astype(np.float32)
    output = node.output[0]
    node.output[0] = f"{name}.output_integer_units"
    rescaled = f"{name}.output_rescaled" if rescale.bias else output
    after = []
    if rescale.foldable and np.allclose(table, table[0], rtol=CONSTANT_RTOL, atol=0):
        # the same at every step (coupled q, k scales): a constant OpenVINO folds into MatMul
        graph.initializer.append(numpy_helper.from_array(np.float32(table.mean()),
                                                         f"{name}.output_scale"))
        scale = f"{name}.output_scale"
    else:
        graph.initializer.append(numpy_helper.from_array(table, f"{name}.output_scale_table"))
        scale = f"{name}.output_scale_step"
        after.append(helper.make_node("Gather", [f"{name}.output_scale_table", STEP_INDEX],
                                      [scale], name=f"{name}/GatherScale", axis=0))
    after.append(helper.make_node("Mul", [node.output[0], scale], [rescaled],
                                  name=f"{name}/FromIntegerUnits"))
    if rescale.bias:
        after.append(helper.make_node("Add", [rescaled, rescale.bias], [output],
                                      name=f"{name}/Bias"))
    index = list(graph.node).index(node) + 1
    for offset, new in enumerate(after):
        graph.node.insert(index + offset, new)


def quantize_activations_shared(model: onnx.ModelProto, layers: dict[str, LayerNode],
                                params: QuantParams) -> None:
    """Unit-scale QuantizeLinear/DequantizeLinear on each quantized edge, with the step's
    scales applied by a Multiply before it and after the node it feeds (the bias after
    that); layers without a quantizer (``--target-cpu``) keep a float input."""
    graph = model.graph
    tables = step_scale_tables(params)
    graph.initializer.append(numpy_helper.from_array(np.float32(1.0), "unit_scale"))
    edges, attentions = activation_edges(model, layers, params)
    rescales = [Rescale(layer.node, [key], key, _detach_bias(graph, layer))
                for key, layer in layers.items() if key in params.activations]
    for attention in attentions.values():
        for node, operands, suffix in ((attention.scores, ("q", "k"), "@qk"),
                                       (attention.output, ("p", "v"), "@pv")):
            keys = [attention.edges[x].key for x in operands
                    if attention.edges[x].key in params.activations]
            rescales.append(Rescale(node, keys, attention.name + suffix, foldable=True))
    for edge in edges:
        _to_integer_units(graph, edge.key, edge.node, edge.index, tables[edge.key],
                          params.activations[edge.key])
    for rescale in rescales:
        _from_integer_units(graph, rescale, tables)
    graph.input.append(helper.make_tensor_value_info(STEP_INDEX, TensorProto.INT64, []))
