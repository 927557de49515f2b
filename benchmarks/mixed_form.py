"""Which per-layer precisions OpenVINO on this CPU executes, and what the dual-path form costs.

Builds two small stand-in graphs with the export's own passes, a stack of 3x3 convolutions
(SD's ResNet convs) and a stack of Linear layers on tokens (SD's attention projections and
feed-forwards), in each candidate form: FP32; int8 weights + int8 input (W8A8, the
shared-scale form); int8 weights + float input; the dual path of ``dq_export.mixed_precision``
(int8 in one group, float in the other: both kernels run); and for Linear layers the same
with int4 weights. Each form is compiled in a fresh process: its median call time, the RSS
it adds (compile + one call), and the kernel OpenVINO picked (``exec_type`` from the
performance counters) go into the table.

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

FORMS = {"conv": ("fp32", "w8a8", "w8-float", "w8-dual"),  # conv w8-dual: FP32 float path
         "linear": ("fp32", "w8a8", "w8-float", "w8-dual", "w4a8", "w4-float", "w4-dual")}


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
    from dq_export.mixed_precision import add_float_paths
    from dq_export.qdq import build_qdq_unet
    from dq_export.shared_scales import quantize_activations_shared

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
    if form.endswith("dual"):  # convolutions: the float path on FP32 weights, as exported
        weights = ({n: graph.unet.layers[i].weight.detach().numpy()
                    for i, n in enumerate(names)} if kind == "conv" else {})

        def activations(m, layers, p):
            quantize_activations_shared(m, layers, p)
            add_float_paths(m, layers, {n: np.array([False, True]) for n in names}, weights)
    model = build_qdq_unet(model, params, {}, bits, activations)
    onnx.save(model, str(path))
    return path, x.numpy()


def measure(kind: str, form: str, width: int, depth: int, calls: int) -> dict:
    import openvino as ov

    from dq_export.export import peak_rss_mb

    with tempfile.TemporaryDirectory() as tmp:
        path, x = build(kind, form, width, depth, Path(tmp))
        core = ov.Core()
        model = core.read_model(str(path))
        feeds = {"x": x}
        if any("step_index" in p.get_names() for p in model.inputs):
            feeds["step_index"] = np.asarray(0, np.int64)
        before = _rss_mb()
        compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True,
                                                     "INFERENCE_PRECISION_HINT": "f32",
                                                     "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        request.infer(feeds)
        added = _rss_mb() - before
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            request.infer(feeds)
            times.append(time.perf_counter() - start)
        kernels = sorted({f"{i.node_type}:{i.exec_type}" for i in request.profiling_info
                          if i.node_type.startswith(("Convolution", "FullyConnected", "MatMul"))
                          and i.real_time.total_seconds() > 0})
    return {"kind": kind, "form": form, "ms": round(1e3 * statistics.median(times), 2),
            "rss_added_mb": round(added, 1), "kernels": kernels, "peak_rss": peak_rss_mb()}


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
    print(markdown_table(("layers", "form", "call ms", "RSS added MB", "kernels (exec type)"),
                         [(r["kind"], r["form"], r["ms"], r["rss_added_mb"],
                           ", ".join(r["kernels"])) for r in rows]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine(), "widths": widths, "depth": args.depth, "calls": args.calls,
         "fp32_weights_mb": weights_mb, "rows": rows,
         "command": " ".join(["python benchmarks/mixed_form.py", *(argv or sys.argv[1:])])},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
