"""Which per-layer precisions OpenVINO on this CPU executes, and what a per-group input
precision costs in one graph.

Builds two small stand-in graphs with the export's own passes, a stack of 3x3 convolutions
(SD's ResNet convs) and a stack of Linear layers on tokens (SD's attention projections and
feed-forwards), in each candidate form: FP32; int8 weights + int8 input (W8A8, the
shared-scale form); int8 weights + float input; ``dual`` (the export's form,
``dq_export.graph.mixed_precision``: int8 in group 0, float in group 1, both kernels run and are
summed with 0/1 weights); ``switch``, an ``If`` on the step running one path
(``switch_paths`` below: faster, but OpenVINO miscomputed it inside the UNet); and for
Linear layers int4 weights with int8 or float inputs. Each form is compiled in a
fresh process: its median call time at a step of each group, the RSS it adds (compile and
the calls), its output's relative distance from ONNX Runtime's on the same graph, and the
kernels OpenVINO picked (``exec_type`` of the performance counters).

    python benchmarks/mixed_form.py --out benchmarks/results/mixed-form
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import child_main, machine, markdown_table, run_child

FORMS = {"conv": ("fp32", "w8a8", "w8-float", "w8-dual", "w8-switch"),  # conv: FP32 float path
         "linear": ("fp32", "w8a8", "w8-float", "w8-dual", "w8-switch", "w4a8", "w4-float")}


def stand_in(kind: str, width: int, depth: int):
    """A module named like the UNet wrapper (``/unet/layers.i/...``) and its example input."""
    import torch

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            make = ((lambda: torch.nn.Conv2d(width, width, 3, padding=1)) if kind == "conv"
                    else (lambda: torch.nn.Linear(width, width)))
            self.layers = torch.nn.ModuleList(make() for _ in range(depth))

        def forward(self, x):
            for layer in self.layers:
                x = torch.nn.functional.silu(layer(x))
            return x

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = Stack()

        def forward(self, x):
            return self.unet(x)

    torch.manual_seed(0)
    shape = (2, width, 8, 8) if kind == "conv" else (2, 64, width)
    return Graph().eval(), torch.randn(shape)


def build(kind: str, form: str, width: int, depth: int, folder: Path) -> tuple[Path, np.ndarray]:
    """The stand-in's ONNX graph in ``form`` (written with the export's passes)."""
    import onnx
    import torch

    from calibration.fit import ActivationQuantizer, QuantParams
    from dq_export.graph.mixed_precision import add_float_paths
    from dq_export.graph.qdq import build_qdq_unet
    from dq_export.graph.shared_scales import quantize_activations_shared

    graph, x = stand_in(kind, width, depth)
    path = folder / f"{kind}-{form}.onnx"
    torch.onnx.export(graph, (x,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    if form == "fp32":
        return path, x.numpy()
    model = onnx.load(str(path))
    names = [f"layers.{i}" for i in range(depth)]
    bits = dict.fromkeys(names, 4 if form.startswith("w4") else 8)
    params = None
    if not form.endswith("float"):
        params = QuantParams([0, 1], [[0], [1]], {n: ActivationQuantizer("int8", [0.03, 0.03])
                                                  for n in names})
    activations = quantize_activations_shared
    if form.endswith(("dual", "switch")):  # convolutions: the float path on FP32 weights
        weights = ({n: graph.unet.layers[i].weight.detach().numpy()
                    for i, n in enumerate(names)} if kind == "conv" else {})
        second_path = add_float_paths if form.endswith("dual") else switch_paths

        def activations(m, layers, p):
            quantize_activations_shared(m, layers, p)
            second_path(m, layers, {n: np.array([False, True]) for n in names}, weights)
    model = build_qdq_unet(model, params, {}, bits, activations)
    onnx.save(model, str(path))
    return path, x.numpy()


def switch_paths(model, layers, float_steps, float_weights) -> None:
    """On a shared-scale graph: put each layer of ``float_steps`` under an ``If`` on the
    step's table entry, its int8 path in one branch and a float kernel (``float_weights``
    where given, else the layer's own dequantized weights) in the other. Only the taken
    branch runs; each branch holds its weights as its own constants, so OpenVINO keeps the
    int8 branch's quantizers constant-range (int8 kernels) and the float branch's weights
    packed. (Not the export's form: see dq_export.graph.mixed_precision.)"""
    import onnx
    from onnx import helper, numpy_helper

    from dq_export.graph.mixed_precision import float_weight_name
    from dq_export.graph.qdq import STEP_INDEX

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


def _body(name: str, nodes: list, initializers: list, output: str, renames: dict[str, str]):
    """A branch graph of copies of ``nodes``, with its own initializers; ``renames`` maps
    outer names its nodes must not read from outside (constants) to the branch's own."""
    import onnx
    from onnx import helper

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


def measure(kind: str, form: str, width: int, depth: int, calls: int) -> dict:
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        path, x = build(kind, form, width, depth, Path(tmp))
        core = ov.Core()
        model = core.read_model(str(path))
        feeds = {"x": x}
        if any("step_index" in p.get_names() for p in model.inputs):
            feeds["step_index"] = np.asarray(0, np.int64)
        steps = (0, 1) if "step_index" in feeds else (0,)  # group 0 int8, group 1 float
        expected = _onnx_runtime(path, feeds, steps)  # before the RSS baseline: not counted
        before = _rss_mb()
        compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True,
                                                     "INFERENCE_PRECISION_HINT": "f32",
                                                     "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        ms, kernels, agreement = {}, set(), []
        for step in steps:
            if "step_index" in feeds:
                feeds["step_index"] = np.asarray(step, np.int64)
            request.infer(feeds)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                request.infer(feeds)
                times.append(time.perf_counter() - start)
            ms[step] = round(1e3 * statistics.median(times), 2)
            got = request.get_output_tensor(0).data
            agreement.append(float(np.linalg.norm(got - expected[step])
                                   / np.linalg.norm(expected[step])))
            kernels |= {f"{i.node_type}:{i.exec_type}" for i in request.profiling_info
                        if i.node_type.startswith(("Convolution", "FullyConnected", "MatMul",
                                                   "If")) and i.real_time.total_seconds() > 0}
        added = _rss_mb() - before
    return {"kind": kind, "form": form, "ms": ms[0], "ms_float_group": ms.get(1, ms[0]),
            "rss_added_mb": round(added, 1), "kernels": sorted(kernels),
            "openvino_vs_onnxruntime": round(max(agreement), 5)}


def _onnx_runtime(path: Path, feeds: dict, steps: tuple) -> dict[int, np.ndarray]:
    """ONNX Runtime's output of the same graph at each step (its session freed after)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = {}
    for step in steps:
        if "step_index" in feeds:
            feeds = {**feeds, "step_index": np.asarray(step, np.int64)}
        outputs[step] = session.run(None, feeds)[0]
    del session
    return outputs


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conv-width", type=int, default=1280, help="channels (SD's deepest: 1280)")
    p.add_argument("--linear-width", type=int, default=2560)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed-form"))
    p.add_argument("--child")
    p.add_argument("--child-out", type=Path)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_out, measure)
    rows, widths = [], {"conv": args.conv_width, "linear": args.linear_width}
    for kind, forms in FORMS.items():
        for form in forms:
            task = {"kind": kind, "form": form, "width": widths[kind], "depth": args.depth,
                    "calls": args.calls}
            rows.append(run_child(__file__, task, f"{kind} {form}"))
            print(rows[-1], file=sys.stderr, flush=True)
    weights_mb = {kind: args.depth * widths[kind] ** 2 * (9 if kind == "conv" else 1) * 4 / 2**20
                  for kind in FORMS}
    print(f"\n{args.depth} layers each; FP32 weights: conv (width {args.conv_width}) "
          f"{weights_mb['conv']:.1f} MB, linear (width {args.linear_width}) "
          f"{weights_mb['linear']:.1f} MB\n")
    print(markdown_table(("layers", "form", "call ms, int8 group", "call ms, float group",
                          "RSS added MB", "OpenVINO vs ONNX Runtime", "kernels (exec type)"),
                         [(r["kind"], r["form"], r["ms"], r["ms_float_group"], r["rss_added_mb"],
                           r["openvino_vs_onnxruntime"], ", ".join(r["kernels"])) for r in rows]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine(), "widths": widths, "depth": args.depth, "calls": args.calls,
         "fp32_weights_mb": weights_mb, "rows": rows,
         "command": " ".join(["python benchmarks/mixed_form.py", *(argv or sys.argv[1:])])},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
