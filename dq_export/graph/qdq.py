"""Graph passes that turn the FP32 UNet ONNX graph into QDQ graphs, one per timestep group.

Each pass is a small function with one job, run in order by ``build_qdq_unet``; the result
passes the ONNX checker. Graph nodes are matched to torch modules by the names the torch
exporter gives them (``/unet/down_blocks.0/resnets.0/conv1/Conv`` is module
``down_blocks.0.resnets.0.conv1``). What stays in float: norms, activations, softmax, and
the softmax output A (Q-Diffusion keeps attention scores above 8 bits). The attention-score
MatMuls Q.K^T and A.V get int8 q, k and v, which OpenVINO runs inside its fused attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.fit import QuantParams
from calibration.layers import ATTENTION_OPERANDS, PROJECTIONS, activation_keys, owner
from calibration.quant_math import INT_TYPES, quantize_linear, weight_scales

STEP_INDEX = "step_index"  # the calibrated step: selects group scales and table entries
TIMESTEP = "timestep"  # the UNet's timestep input
INT4_OPSET = 21
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class LayerNode:
    name: str  # torch module name
    node: onnx.NodeProto
    weight: str  # initializer name of the weight input
    axis: int  # output-channel axis of that weight


@dataclass
class Edge:
    """One node input that an activation quantizer is put on."""
    key: str  # the quantizer's name in QuantParams
    node: onnx.NodeProto
    index: int


@dataclass
class AttentionNodes:
    """The two products of one attention, and where its q, k, v and p enter them."""
    name: str  # torch module name
    scores: onnx.NodeProto  # MatMul(q, k^T), feeding the softmax
    output: onnx.NodeProto  # MatMul(softmax, v)
    edges: dict[str, Edge]  # operand ("q", "k", "v", "p") -> its quantizer's edge


def module_name(node_name: str) -> str:
    """'/unet/down_blocks.0/resnets.0/conv1/Conv' -> 'down_blocks.0.resnets.0.conv1'."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[1:-1])


def graph_modules(model: onnx.ModelProto) -> set[str]:
    """Names of the torch modules whose Conv, Gemm or MatMul nodes this graph runs."""
    return {module_name(node.name) for node in model.graph.node if node.op_type in WEIGHT_OPS}


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


def find_attentions(model: onnx.ModelProto, names: set[str]) -> dict[str, AttentionNodes]:
    """The score products of the named attention modules.

    The torch exporter writes ``softmax((q*c) @ (k^T*c)) @ v`` with c = scale^1/2 and q, k, v
    split into heads: q, k and v are quantized at their projections' outputs (as
    calibrated), the softmax output p where it enters the second MatMul. In an opset-21
    graph (int4 weights) q, k and v are quantized after the head split, where they enter
    the products (q and k before their ``* c``): ONNX Runtime's QDQ propagation mistypes
    the Q it copies behind a Reshape there (the graph fails to load; onnxruntime#27845).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    walk_through = ("Reshape", "Transpose", "Mul")
    if model.opset_import[0].version >= INT4_OPSET:
        walk_through = ("Mul",)
    by_module: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and module_name(node.name) in names:
            by_module.setdefault(module_name(node.name), []).append(node)
    found = {}
    for name in sorted(names):  # a set: sorted, so the initializers come in one order
        matmuls = by_module.get(name, [])
        output = next((n for n in matmuls if producers.get(n.input[0]) is not None
                       and producers[n.input[0]].op_type == "Softmax"), None)
        softmax = producers[output.input[0]] if output is not None else None
        scores = next((n for n in matmuls if softmax is not None
                       and n.output[0] == softmax.input[0]), None)
        if scores is None:
            raise ValueError(f"no softmax(q @ k^T) @ v found in the ONNX graph for {name}")
        edges = {}
        for operand, (node, index) in zip(ATTENTION_OPERANDS, ((scores, 0), (scores, 1),
                                                              (output, 1), (output, 0))):
            if operand in PROJECTIONS:
                node, index = _projection_edge(node, index, producers, walk_through)
            edges[operand] = Edge(f"{name}@{operand}", node, index)
        found[name] = AttentionNodes(name, scores, output, edges)
    return found


def _projection_edge(node: onnx.NodeProto, index: int, producers: dict,
                     walk_through: tuple[str, ...]) -> tuple:
    """Walk from a product's input back through the ``* c`` scaling and (``walk_through``)
    the head split (Reshape, Transpose) to the projection's output: the quantizer goes
    there, so its scale is the calibrated one and OpenVINO moves int8, not float, through
    the head split. The walk stops before the ``* c``, and a Reshape or Transpose only moves
    values, so the projection's calibrated scale holds wherever it stops."""
    while True:
        before = producers.get(node.input[index])
        if before is None or before.op_type not in walk_through:
            return node, index
        node, index = before, _data_input(before, producers)


def _data_input(node: onnx.NodeProto, producers: dict) -> int:
    """The input of a Reshape, Transpose or ``x * c`` that carries the data: the first,
    except for a Mul whose first input is the scale computed from the shape."""
    if node.op_type != "Mul":
        return 0
    for index, name in enumerate(node.input):
        if name in producers and producers[name].op_type in ("Transpose", "Reshape", "MatMul",
                                                              "Add"):
            return index
    raise ValueError(f"cannot tell the data input of {node.name}")


def activation_edges(model: onnx.ModelProto, layers: dict[str, LayerNode],
                     params: QuantParams) -> tuple[list[Edge], dict[str, AttentionNodes]]:
    """Every edge with a quantizer in ``params``: layer inputs, then the operands of each
    attention that has q, k and v (and p, if it has one); and those attentions."""
    edges = [Edge(key, layer.node, 0) for key, layer in layers.items()
             if key in params.activations]
    names = {owner(key) for key in params.activations if "@" in key}
    names = {n for n in names if all(f"{n}@{x}" in params.activations for x in PROJECTIONS)}
    attentions = find_attentions(model, names)
    for attention in attentions.values():
        edges += [e for e in attention.edges.values() if e.key in params.activations]
    return edges, attentions


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
    """An integer initializer: int8 (8 or 7 bits), or ONNX INT4 packed two values a byte (low
    nibble first)."""
    if bits > 4:
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
    """Put a QuantizeLinear/DequantizeLinear pair on each quantized edge: layer inputs and
    attention operands. Layers without a quantizer in ``params`` keep a float input.

    Scales are initializers ``<key>.y_scale`` (rewritten per group by ``set_group``);
    time-embedding layers with a per-step table read theirs with
    Gather(``<key>.y_scale_table``, step_index), ``step_index`` being a graph input.
    """
    graph = model.graph
    uses_table = False
    edges, _ = activation_edges(model, layers, params)
    for edge in edges:
        key, quantizer = edge.key, params.activations[edge.key]
        _, _, np_type = INT_TYPES[quantizer.dtype]
        graph.initializer.append(numpy_helper.from_array(
            np.asarray(quantizer.zero_point, np_type), f"{key}.y_zero_point"))
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
            helper.make_node("QuantizeLinear", [edge.node.input[edge.index], scale_name, zero],
                             [f"{key}.quantized"], name=f"{key}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{key}.quantized", scale_name, zero],
                             [f"{key}.dequantized"], name=f"{key}/DequantizeLinear"),
        ]
        insert_before(graph, edge.node, new_nodes)
        edge.node.input[edge.index] = f"{key}.dequantized"
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
    if min(weight_bits.values()) <= 4:  # INT4 tensors need opset 21 (IR version 10)
        model.opset_import[0].version = max(model.opset_import[0].version, INT4_OPSET)
        model.ir_version = max(model.ir_version, 10)
    split_shortcut_convs(model, layers, splits)
    quantize_weights(model, layers, weight_bits)
    if params is not None:
        activations(model, layers, params)
        select_step_in_graph(model, params.timesteps)
    onnx.checker.check_model(model)
    return model


def select_step_in_graph(model: onnx.ModelProto, timesteps: list[int]) -> None:
    """Replace the ``step_index`` input, where a pass added one, by the index computed from
    the graph's own ``timestep``: the nearest calibrated timestep, the first of two equally
    near (deploy.StepTable's rule). The graph then has only the UNet's standard inputs, so
    any runtime, OpenVINO GenAI's C++ sampler loop among them, selects each step's group
    scales and table entries by itself."""
    graph = model.graph
    step_input = next((i for i in graph.input if i.name == STEP_INDEX), None)
    if step_input is None:
        return
    graph.input.remove(step_input)
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(timesteps, np.float32), "calibrated_timesteps"),
        numpy_helper.from_array(np.asarray(0, np.int64), f"{STEP_INDEX}.first_row")])
    nodes = [
        helper.make_node("Gather", [TIMESTEP, f"{STEP_INDEX}.first_row"],
                         [f"{STEP_INDEX}.timestep"], name=f"{STEP_INDEX}/Timestep", axis=0),
        helper.make_node("Sub", ["calibrated_timesteps", f"{STEP_INDEX}.timestep"],
                         [f"{STEP_INDEX}.difference"], name=f"{STEP_INDEX}/Difference"),
        helper.make_node("Abs", [f"{STEP_INDEX}.difference"], [f"{STEP_INDEX}.distance"],
                         name=f"{STEP_INDEX}/Distance"),
        helper.make_node("ArgMin", [f"{STEP_INDEX}.distance"], [STEP_INDEX],
                         name=f"{STEP_INDEX}/Nearest", axis=0, keepdims=0),
    ]
    for offset, node in enumerate(nodes):
        graph.node.insert(offset, node)
