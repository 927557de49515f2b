"""Graph passes for a per-group activation precision: which layer inputs are int8 may differ
between timestep groups (RAQ's step-wise precision), with weights shared by all groups.

- ONNX, one graph per group: a layer whose input is float in that group simply loses its
  QuantizeLinear/DequantizeLinear pair (``drop_activation_quantizers``).
- OpenVINO, one graph for all groups: a FakeQuantize cannot be switched off at run time
  (and a non-constant range would make OpenVINO run it in FP32), so a layer that is int8 in
  some groups and float in others gets both paths as the two branches of an ``If`` on
  ``Gather(table, step_index)`` (``switch_paths``): only the taken branch runs, and each
  holds its weights as its own constants (the int8 branch's quantizers stay constant-range,
  so its kernel is int8). The price is memory: both copies of the weights, which the
  allocation charges (``calibration.allocation``). Summing both paths with 0/1 weights
  instead runs both kernels at every step (``benchmarks/mixed_form.py`` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibration.allocation import FLOAT, Choice
from calibration.fit import QuantParams
from calibration.layers import activation_keys, quantized_layers, shortcut_splits
from calibration.rd_curves import layer_kind
from dq_export.onnx_export import save_with_external_data
from dq_export.qdq import STEP_INDEX, LayerNode, build_qdq_unet, quantize_activations, set_group
from dq_export.quantize_unet import WEIGHTS_FILE
from dq_export.shared_scales import quantize_activations_shared


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


@dataclass
class Plan:
    """An allocation in the terms the graph writers use."""
    bits: dict[str, int]  # weight bits per layer (32: float weights)
    params: QuantParams  # quantizers of the layers whose input is int8 in some group
    float_steps: dict[str, np.ndarray]  # dual-path key -> float input at each step
    float_weights: dict[str, np.ndarray]  # dual-path Conv key -> its FP32 weights

    def float_keys(self, group: int, params: QuantParams) -> set[str]:
        """Dual-path keys whose input is float in ``group``."""
        step = params.groups[group][0]
        return {k for k, steps in self.float_steps.items() if steps[step]}


def plan(unet, params: QuantParams, choices: dict[str, Choice],
         splits: dict[str, int]) -> Plan:
    modules = quantized_layers(unet)
    group_of = params.group_of()
    everywhere_float = [n for n, c in choices.items() if 8 not in c.paths()]
    float_steps, float_weights = {}, {}
    for name, choice in choices.items():
        if len(choice.paths()) < 2:
            continue
        steps = np.array([choice.activations[g] == FLOAT for g in group_of])
        weight = modules[name].weight.detach().numpy()
        halves = np.split(weight, [splits[name]], axis=1) if name in splits else [weight]
        for key, half in zip(activation_keys(name, splits), halves):
            float_steps[key] = steps
            if layer_kind(modules[name]) == "conv":
                float_weights[key] = half
    bits = {name: choice.weight_bits for name, choice in choices.items()}
    return Plan(bits, params.without(everywhere_float), float_steps, float_weights)


def simulation(choices: dict[str, Choice], kinds: dict[str, str], params: QuantParams,
               group: int) -> tuple[dict[str, int], QuantParams]:
    """Weight bits and quantizers that ``calibration.fakequant`` runs ``group`` with."""
    bits = {n: c.weights_in(kinds[n], group) for n, c in choices.items()}
    return bits, params.without([n for n, c in choices.items() if c.activations[group] == FLOAT])


def _base_graph(fp32_onnx: Path, unet, recipe, p: Plan, activations) -> onnx.ModelProto:
    model = onnx.load(str(fp32_onnx), load_external_data=True)
    splits = shortcut_splits(unet) if recipe.split_shortcut else {}
    return build_qdq_unet(model, p.params, splits, p.bits, activations)


def write_group_graphs(fp32_onnx: Path, out_dir: Path, unet, recipe, p: Plan) -> list[Path]:
    """One QDQ graph per group on one weight file (with the FP32 weights of dual-path
    convolutions): each group's graph without the quantizers of its float-input layers."""
    base = _base_graph(fp32_onnx, unet, recipe, p, quantize_activations)
    base.graph.initializer.extend(numpy_helper.from_array(
        np.ascontiguousarray(w, np.float32), float_weight_name(k))
        for k, w in p.float_weights.items())
    paths = [out_dir / f"unet_group{g}.onnx" for g in range(len(p.params.groups))]
    save_with_external_data(base, paths[0], WEIGHTS_FILE)  # base now refers to that file
    for g, path in enumerate(paths):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        set_group(model, p.params, g)
        dropped = p.float_keys(g, p.params)
        consumers = {name: node for node in model.graph.node for name in node.input}
        for key in dropped & set(p.float_weights):  # a Conv's float path: FP32 weights
            consumers[f"{key}.dequantized"].input[1] = float_weight_name(key)
        drop_activation_quantizers(model, dropped)
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))  # by path: it reads the shared weight file
    return paths


def write_shared_graph(fp32_onnx: Path, path: Path, unet, recipe, p: Plan) -> Path:
    """The one OpenVINO graph: shared scales, and both paths where groups differ."""
    def activations(model, layers, params):
        quantize_activations_shared(model, layers, params)
        switch_paths(model, layers, p.float_steps, p.float_weights)

    save_with_external_data(_base_graph(fp32_onnx, unet, recipe, p, activations), path,
                            path.name + ".data")
    return path


def switch_paths(model: onnx.ModelProto, layers: dict[str, LayerNode],
                 float_steps: dict[str, np.ndarray],
                 float_weights: dict[str, np.ndarray]) -> None:
    """On a shared-scale graph: put each layer of ``float_steps`` under an ``If`` on the
    step's table entry, its int8 path in one branch and a float kernel (``float_weights``
    where given, else the layer's own dequantized weights) in the other. Only the taken
    branch runs; each branch holds its weights as its own constants, so OpenVINO keeps the
    int8 branch's quantizers constant-range (int8 kernels) and the float branch's weights
    packed."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    for key, steps in float_steps.items():
        kernel = layers[key].node
        weight_dq = by_name[f"{key}.weight/DequantizeLinear"]
        moved = [by_name[f"{key}/{n}"] for n in ("ToIntegerUnits", "QuantizeLinear",
                                                 "DequantizeLinear")]
        rescale = by_name[f"{key}/FromIntegerUnits"]
        source, output = moved[0].input[0], rescale.output[0]
        int8_nodes = [weight_dq, *moved, kernel, rescale]
        int8_inits = [inits[n] for n in (*weight_dq.input, f"{key}.y_zero_point")]
        unit = numpy_helper.from_array(np.float32(1.0), f"{key}.unit_scale")
        int8_body = _body(f"{key}.int8_path", int8_nodes, [*int8_inits, unit], output,
                          {"unit_scale": unit.name})
        weight = kernel.input[1]
        float_inits, float_nodes = [], []
        if key in float_weights:
            weight = float_weight_name(key)
            float_inits.append(numpy_helper.from_array(
                np.ascontiguousarray(float_weights[key], np.float32), weight))
        else:  # its own copy of the int8 weights and their dequantization, under names of
            # its own (OpenVINO's ONNX reader mixes up equal names in sibling branches)
            dq = onnx.NodeProto()
            dq.CopyFrom(weight_dq)
            for i, name in enumerate(dq.input):
                dq.input[i] = f"{name}.float_path"
                tensor = onnx.TensorProto()
                tensor.CopyFrom(inits[name])
                tensor.name = dq.input[i]
                float_inits.append(tensor)
            dq.output[0] = weight = f"{dq.output[0]}.float_path"
            dq.name = f"{dq.name}.float_path"
            float_nodes.append(dq)
        twin = helper.make_node(kernel.op_type, [source, weight, *kernel.input[2:]],
                                [output], name=f"{key}/FloatPath")
        twin.attribute.extend(kernel.attribute)
        float_body = _body(f"{key}.float_path", [*float_nodes, twin], float_inits, output, {})
        graph.initializer.append(numpy_helper.from_array(np.asarray(steps, bool),
                                                         f"{key}.float_path_table"))
        switch = [helper.make_node("Gather", [f"{key}.float_path_table", STEP_INDEX],
                                   [f"{key}.float_path_taken"], name=f"{key}/GatherFloatPath",
                                   axis=0),
                  helper.make_node("If", [f"{key}.float_path_taken"], [output],
                                   name=f"{key}/SwitchPaths", then_branch=float_body,
                                   else_branch=int8_body)]
        index = list(graph.node).index(rescale)
        for offset, node in enumerate(switch):
            graph.node.insert(index + offset, node)
        for node in int8_nodes:
            graph.node.remove(node)
        for tensor in int8_inits:
            graph.initializer.remove(tensor)


def _body(name: str, nodes: list, initializers: list, output: str,
          renames: dict[str, str]) -> onnx.GraphProto:
    """A branch graph of copies of ``nodes``, with its own initializers; ``renames`` maps
    outer names its nodes must not read from outside (constants) to the branch's own."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, value in enumerate(copy.input):
            copy.input[i] = renames.get(value, value)
        copies.append(copy)
    out = f"{name}.output"
    copies[-1].output[0] = out
    return helper.make_graph(copies, name, [],
                             [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
                             list(initializers))
