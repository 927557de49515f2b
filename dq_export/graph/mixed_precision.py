"""Graph passes for a per-group activation precision: which layer inputs are int8 may differ
between timestep groups (RAQ's step-wise precision), with weights shared by all groups.

- ONNX, one graph per group: a layer whose input is float in that group simply loses its
  QuantizeLinear/DequantizeLinear pair (``drop_activation_quantizers``).
- OpenVINO, one graph for all groups: a FakeQuantize cannot be switched off at run time
  (and a non-constant range would make OpenVINO run it in FP32), so a layer that is int8 in
  some groups and float in others gets both paths, summed with per-step 0/1 weights
  (``add_float_paths``):

      y = s_t · W·DQ(Q(x · u_t, 1)) + m_t · W'·x + b

  with (s_t, u_t, m_t) = (s, 1/s, 0) at int8 steps and (0, 1, 1) at float steps, all read
  by ``Gather(table, step_index)``; W' is a Conv's FP32 weights, a Linear's own int8 ones.
  Both kernels run at every step, and the allocation charges both
  (``calibration.allocation``). An ``If`` on the step that runs only one branch is faster,
  but OpenVINO 2026.4 computed some layers' int8 branch wrongly (``benchmarks/mixed_form.py``
  keeps it for measurement).
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
from dq_export.graph.onnx_export import save_with_external_data
from dq_export.graph.qdq import (STEP_INDEX, LayerNode, build_qdq_unet, quantize_activations,
                                 set_group)
from dq_export.graph.quantize_unet import WEIGHTS_FILE, in_weight_range
from dq_export.graph.shared_scales import quantize_activations_shared


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
    return {"output_scale_table": np.where(float_steps, 0, scales).astype(np.float32),
            "inverse_y_scale_table": np.where(float_steps, 1, 1 / scales).astype(np.float32),
            "float_path_table": float_steps.astype(np.float32)}


def add_float_paths(model: onnx.ModelProto, layers: dict[str, LayerNode],
                    float_steps: dict[str, np.ndarray],
                    float_weights: dict[str, np.ndarray]) -> None:
    """On a shared-scale graph (``dq_export.graph.shared_scales``): give each layer of
    ``float_steps`` (key -> bool per calibrated step) a float twin of its kernel, summed
    with its int8 path under the step's 0/1 tables. The twin reads ``float_weights[key]``
    where given (convolutions: OpenVINO would expand int8 weights to FP32 for a float input
    anyway, in more memory than the FP32 weights themselves), else the layer's own
    dequantized weights (Linear layers: OpenVINO keeps them compressed)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    for key, steps in float_steps.items():
        steps = np.asarray(steps, bool)
        scales = numpy_helper.to_array(inits[f"{key}.output_scale_table"])
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


@dataclass
class Plan:
    """An allocation in the terms the graph writers use."""
    bits: dict[str, int]  # weight bits per layer (32: float weights)
    params: QuantParams  # quantizers of the layers whose input is int8 in some group
    float_steps: dict[str, np.ndarray]  # dual-path key -> float input at each step
    float_weights: dict[str, np.ndarray]  # dual-path Conv key -> its FP32 weights

    def float_keys(self, group: int) -> set[str]:
        """Dual-path keys whose input is float in ``group``."""
        step = self.params.groups[group][0]
        return {k for k, steps in self.float_steps.items() if steps[step]}


def plan(unet, params: QuantParams, choices: dict[str, Choice],
         splits: dict[str, int]) -> Plan:
    """The allocation's ``choices`` (layer -> Choice) as weight bits, the quantizers of the
    layers int8 somewhere, and each dual-path key's float steps (and a Conv's FP32 weights,
    split like its input for a split shortcut)."""
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
    return build_qdq_unet(model, p.params, splits, in_weight_range(p.bits, recipe.weight_range),
                          activations)


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
        dropped = p.float_keys(g)
        consumers = {name: node for node in model.graph.node for name in node.input}
        for key in dropped & set(p.float_weights):  # a Conv's float path: FP32 weights
            consumers[f"{key}.dequantized"].input[1] = float_weight_name(key)
        drop_activation_quantizers(model, dropped)
        _prune(model.graph)
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))  # by path: it reads the shared weight file
    return paths


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (a float-path Conv's int8 weight dequantizer)
    and the initializers left unread: each group's graph holds only what it runs (its
    external tensors stay in the shared file)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)


def write_shared_graph(fp32_onnx: Path, path: Path, unet, recipe, p: Plan) -> Path:
    """The one OpenVINO graph: shared scales, and both paths where groups differ."""
    def activations(model, layers, params):
        quantize_activations_shared(model, layers, params)
        add_float_paths(model, layers, p.float_steps, p.float_weights)

    save_with_external_data(_base_graph(fp32_onnx, unet, recipe, p, activations), path,
                            path.name + ".data")
    return path

