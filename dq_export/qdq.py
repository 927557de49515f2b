"""Graph passes that turn the FP32 UNet ONNX graph into QDQ graphs, one per timestep group.

Each pass is a small function with one job, run in order by ``build_qdq_unet``; the result
passes the ONNX checker. Graph nodes are matched to torch modules by the names the torch
exporter gives them (``/unet/down_blocks.0/resnets.0/conv1/Conv`` is module
``down_blocks.0.resnets.0.conv1``). What stays in float: norms, activations, softmax, and
the attention-score MatMuls (Q.K^T and A.V, Q-Diffusion's finding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.fit import QuantParams
from calibration.layers import activation_keys
from calibration.quant_math import INT_TYPES, quantize_linear, weight_scales

STEP_INDEX = "step_index"
INT4_OPSET = 21
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class LayerNode:
    name: str  # torch module name
    node: onnx.NodeProto
    weight: str  # initializer name of the weight input
    axis: int  # output-channel axis of that weight


def module_name(node_name: str) -> str:
    """'/unet/down_blocks.0/resnets.0/conv1/Conv' -> 'down_blocks.0.resnets.0.conv1'."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[1:-1])


def find_layers(model: onnx.ModelProto, layer_names: set[str]) -> dict[str, LayerNode]:
    """The Conv/Gemm/MatMul node of every quantized module, with its weight initializer."""
    inits = {i.name for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or module_name(node.name) not in layer_names:
            continue
        weight = node.input[1]
        if weight not in inits:
            continue
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            axis = 0 if node.op_type == "Conv" else 1  # MatMul weights are [in, out]
        found[module_name(node.name)] = LayerNode(module_name(node.name), node, weight, axis)
    missing = layer_names - set(found)
    if missing:
        raise ValueError(f"no ONNX node found for quantized layers {sorted(missing)[:5]}")
    return found


def insert_before(graph: onnx.GraphProto, anchor: onnx.NodeProto, nodes: list) -> list:
    """Insert ``nodes`` before ``anchor``; return the graph's own copies (protobuf copies)."""
    index = list(graph.node).index(anchor)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    return [graph.node[index + offset] for offset in range(len(nodes))]


def split_shortcut_convs(model: onnx.ModelProto, layers: dict[str, LayerNode],
                         splits: dict[str, int]) -> None:
    """Rewrite each up-path ``conv_shortcut(Concat(hidden, skip))`` as
    ``Conv(hidden, W[:, :k]) + Conv(skip, W[:, k:])`` (Q-Diffusion's split shortcut).

    Each half becomes an ordinary layer, ``<name>#0`` and ``<name>#1``, with its own input
    scale and per-channel weight scales; the original Concat still feeds the GroupNorm. Two
    plain quantized convs run as int8 kernels in OpenVINO, where a Concat of differently
    scaled inputs would not.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}
    for name, first in splits.items():
        layer = layers.pop(name)
        node = layer.node
        concat = producers[node.input[0]]
        weight = numpy_helper.to_array(inits[layer.weight])
        graph.initializer.remove(inits[layer.weight])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        keys = activation_keys(name, splits)
        convs = []
        for part, (key, source, w) in enumerate(zip(keys, concat.input,
                                                    (weight[:, :first], weight[:, first:]))):
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w),
                                                             f"{key}.weight_fp32"))
            inputs = [source, f"{key}.weight_fp32"] + list(node.input[2:3] if part else [])
            convs.append(helper.make_node("Conv", inputs, [f"{key}.output"], name=f"{key}/Conv",
                                          **attrs))
        add = helper.make_node("Add", [f"{key}.output" for key in keys], list(node.output),
                               name=f"{name}/SplitAdd")
        inserted = insert_before(graph, node, convs + [add])
        for key, conv in zip(keys, inserted):
            layers[key] = LayerNode(key, conv, conv.input[1], 0)
        graph.node.remove(node)


def int_tensor(values: np.ndarray, name: str, bits: int) -> onnx.TensorProto:
    """An integer initializer: int8, or ONNX INT4 packed two values a byte (low nibble first)."""
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8), name)
    nibbles = (values.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


def quantize_weights(model: onnx.ModelProto, layers: dict[str, LayerNode],
                     bits: dict[str, int]) -> None:
    """Replace each weight by int8 (or int4) values + a per-channel DequantizeLinear.
    Disk and memory then hold the integer weights."""
    inits = {i.name: i for i in model.graph.initializer}
    for layer in layers.values():
        tensor = inits[layer.weight]
        weight = numpy_helper.to_array(tensor)
        layer_bits = bits[layer.name.split("#")[0]]
        if layer_bits >= 32:  # a float layer of a mixed-precision allocation
            continue
        scale = weight_scales(weight, layer.axis, layer_bits)
        q = quantize_linear(weight, scale, 0, "int8", layer.axis, layer_bits)
        model.graph.initializer.remove(tensor)
        prefix = f"{layer.name}.weight"  # "<module>.weight", or "<module>#<half>.weight"
        model.graph.initializer.extend([
            int_tensor(q, f"{prefix}_quantized", layer_bits),
            numpy_helper.from_array(scale, f"{prefix}_scale"),
            int_tensor(np.zeros(scale.shape, np.int8), f"{prefix}_zero_point", layer_bits),
        ])
        dq = helper.make_node("DequantizeLinear", [f"{prefix}_quantized", f"{prefix}_scale",
                                                   f"{prefix}_zero_point"],
                              [f"{prefix}_dequantized"], name=f"{prefix}/DequantizeLinear",
                              axis=layer.axis)
        insert_before(model.graph, layer.node, [dq])
        layer.node.input[1] = f"{prefix}_dequantized"


def quantize_activations(model: onnx.ModelProto, layers: dict[str, LayerNode],
                         params: QuantParams) -> None:
    """Put a QuantizeLinear/DequantizeLinear pair on each quantized layer's input.

    Layers without a quantizer in ``params`` keep a float input.
    Scales are initializers ``<key>.y_scale`` (rewritten per group by ``set_group``);
    time-embedding layers with a per-step table read theirs with
    Gather(``<key>.y_scale_table``, step_index), ``step_index`` being a graph input.
    """
    graph = model.graph
    uses_table = False
    for key, layer in layers.items():
        quantizer = params.activations.get(key)
        if quantizer is None:  # kept in float (``--target-cpu``)
            continue
        _, _, np_type = INT_TYPES[quantizer.dtype]
        graph.initializer.append(numpy_helper.from_array(np.zeros((), np_type),
                                                         f"{key}.y_zero_point"))
        new_nodes = []
        if quantizer.step_scales is None:
            scale_name = f"{key}.y_scale"
            graph.initializer.append(numpy_helper.from_array(
                np.float32(quantizer.group_scales[0]), scale_name))
        else:
            uses_table = True
            scale_name = f"{key}.y_scale_from_table"
            graph.initializer.append(numpy_helper.from_array(
                np.asarray(quantizer.step_scales, np.float32), f"{key}.y_scale_table"))
            new_nodes.append(helper.make_node("Gather", [f"{key}.y_scale_table", STEP_INDEX],
                                              [scale_name], name=f"{key}/Gather", axis=0))
        zero = f"{key}.y_zero_point"
        new_nodes += [
            helper.make_node("QuantizeLinear", [layer.node.input[0], scale_name, zero],
                             [f"{key}.quantized"], name=f"{key}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{key}.quantized", scale_name, zero],
                             [f"{key}.dequantized"], name=f"{key}/DequantizeLinear"),
        ]
        insert_before(graph, layer.node, new_nodes)
        layer.node.input[0] = f"{key}.dequantized"
    if uses_table:
        graph.input.append(helper.make_tensor_value_info(STEP_INDEX, TensorProto.INT64, []))


def set_group(model: onnx.ModelProto, params: QuantParams, group: int) -> None:
    """Rewrite every ``<key>.y_scale`` initializer with that group's value, in place."""
    inits = {i.name: i for i in model.graph.initializer}
    for key, quantizer in params.activations.items():
        name = f"{key}.y_scale"
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(np.float32(quantizer.group_scales[group]),
                                                         name))


def build_qdq_unet(model: onnx.ModelProto, params: QuantParams | None, splits: dict[str, int],
                   weight_bits: dict[str, int], activations=quantize_activations) -> onnx.ModelProto:
    """Run the passes in order on the FP32 graph (modified in place) and check the result.
    ``activations`` is the pass that quantizes layer inputs (per-group scales by default);
    without ``params`` (weight-only recipes) inputs stay in float."""
    layers = find_layers(model, set(weight_bits))
    if min(weight_bits.values()) < 8:  # INT4 tensors need opset 21 (IR version 10)
        model.opset_import[0].version = max(model.opset_import[0].version, INT4_OPSET)
        model.ir_version = max(model.ir_version, 10)
    split_shortcut_convs(model, layers, splits)
    quantize_weights(model, layers, weight_bits)
    if params is not None:
        activations(model, layers, params)
    onnx.checker.check_model(model)
    return model
