"""Hardware-aware precision (``--target-cpu auto``): a layer's input stays in float where
the int8 form is not faster on the CPU doing the export.

Whether int8 wins depends on the CPU: without VNNI, OpenVINO's int8 FullyConnected can be
slower than FP32; with VNNI nearly every layer gains. So the export measures instead of
guessing. It compiles the FP32 UNet and the all-int8 shared-scale UNet at the export's
shapes, runs both with OpenVINO's per-layer performance counters, charges every executed
node to the layer it belongs to (its kernel, and in the int8 graph also its quantizer and
output multiplier), and keeps in float the layers whose int8 total is not below their FP32
total. Each attention is one more such unit: its fused Q.K^T-softmax-A.V with int8 q, k, v
against the FP32 one.

The counters see nodes, not what happens between them: a float layer between int8
neighbours adds reorders and breaks fusions that no layer is charged for. So the graph the
per-layer choice makes is timed as a whole against the all-int8 one, calls interleaved, and
the choice is kept only if it is faster (on sd14 at 256 on a 2-core EPYC the counters chose
24 units float and the whole call got 12 % slower).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calibration.layers import owner

PROFILE_CALLS = 3  # timed calls after one warm-up; each node's median is used
WHOLE_CALLS = 5  # interleaved whole-graph calls per graph to confirm the choice


def owning_layer(node_name: str, layers: set[str]) -> str | None:
    """The quantized layer (or attention) an executed OpenVINO node belongs to, if any.

    Nodes from the torch exporter are named by module path (``/unet/down_blocks.0/
    resnets.0/conv1/Conv/WithoutBiases``): the longest module path in ``layers`` owns it;
    nodes added by the QDQ passes start with the quantizer key
    (``up_blocks.0.resnets.0.conv_shortcut#1/Bias``, ``...attn1@qk/FromIntegerUnits``).
    """
    if node_name.startswith("/"):
        parts = [p for p in node_name.split("/") if p][1:]
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in layers:
                return ".".join(parts[:n])
        return None
    head = owner(node_name.split("/")[0])
    return head if head in layers else None


def layer_seconds(node_seconds: dict[str, float], layers: set[str]) -> dict[str, float]:
    """Sum per layer of the nodes it owns; nodes no layer owns are left out."""
    totals = dict.fromkeys(layers, 0.0)
    for node, seconds in node_seconds.items():
        owner = owning_layer(node, layers)
        if owner is not None:
            totals[owner] += seconds
    return totals


def layers_kept_float(int8: dict[str, float], fp32: dict[str, float]) -> list[str]:
    """Layers whose int8 form (kernel + quantizer + multiplier) is not faster than FP32."""
    return sorted(name for name in fp32 if int8.get(name, 0.0) >= fp32[name])


def profile_shapes(components, latent_size: int) -> dict[str, list[int]]:
    """The UNet's inputs for one sampler step of one image at the export's size (batch 2
    with guidance, 1 for an unconditional model), as the export traces them."""
    from dq_export.graph.onnx_export import unet_example, unet_input_names

    return {name: list(example.shape) for name, example in
            zip(unet_input_names(components), unet_example(components, latent_size))}


def profile_nodes(graph: Path, shapes: dict[str, list[int]], device: str = "CPU",
                  calls: int = PROFILE_CALLS) -> dict[str, float]:
    """Median seconds of every executed node over ``calls`` runs of seeded random inputs."""
    request, feeds = compiled_request(graph, shapes, device, perf_count=True)
    request.infer(feeds)  # warm-up: first-call allocations are not the steady state
    runs: dict[str, list[float]] = {}
    for _ in range(calls):
        request.infer(feeds)
        for info in request.profiling_info:
            runs.setdefault(info.node_name, []).append(info.real_time.total_seconds())
    return {node: statistics.median(times) for node, times in runs.items()}


def whole_call_seconds(graphs: list[Path], shapes: dict[str, list[int]], device: str = "CPU",
                       calls: int = WHOLE_CALLS) -> list[float]:
    """Median seconds of one whole call of each graph; the graphs take turns, so drift on a
    shared machine falls on all of them alike."""
    return timed_turns([compiled_request(graph, shapes, device) for graph in graphs], calls)


def timed_turns(runs: list[tuple], calls: int = WHOLE_CALLS,
                after_call: Callable[[int], None] | None = None) -> list[float]:
    """Median seconds of one call of each (infer request, feeds) of ``runs``, after one
    warm-up call each; the requests take turns. ``after_call(i)`` runs after each timed call
    of ``runs[i]``, untimed (to read that call's profile, say)."""
    for request, feeds in runs:
        request.infer(feeds)  # warm-up
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(calls):
        for i, ((request, feeds), own) in enumerate(zip(runs, times)):
            start = time.perf_counter()
            request.infer(feeds)
            own.append(time.perf_counter() - start)
            if after_call is not None:
                after_call(i)
    return [statistics.median(own) for own in times]


def confirmed(choice: dict, all_int8_seconds: float, chosen_seconds: float) -> dict:
    """The per-layer choice, kept only if its graph's whole call beats the all-int8 graph's;
    otherwise nothing stays float, and what was proposed is recorded beside the timings."""
    faster = chosen_seconds < all_int8_seconds
    return {**choice, "kept_float": choice["kept_float"] if faster else [],
            "proposed_float": choice["kept_float"],
            "whole_call_ms": {"all_int8": round(1e3 * all_int8_seconds, 2),
                              "proposed_float": round(1e3 * chosen_seconds, 2)}}


def compiled_request(graph: Path, shapes: dict[str, list[int]], device: str = "CPU",
                     perf_count: bool = False, weights: Path | None = None):
    """A compiled infer request for ``graph`` (its weights in ``weights``, else beside it)
    at ``shapes``, and seeded random feeds."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(graph), *([str(weights)] if weights else []))
    names = [_graph_name(port, shapes) for port in model.inputs]
    model.reshape({name: ov.PartialShape(shapes[name]) for name in names if name in shapes})
    compiled = core.compile_model(model, device, {"PERF_COUNT": perf_count,
                                                  "INFERENCE_PRECISION_HINT": "f32",
                                                  "PERFORMANCE_HINT": "LATENCY"})
    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        name = _graph_name(port, shapes)
        if name == "step_index":
            feeds[name] = np.asarray(0, np.int64)
        elif name == "timestep":
            feeds[name] = np.full(shapes[name], 500.0, np.float32)
        else:
            feeds[name] = rng.standard_normal(shapes[name]).astype(np.float32)
    return compiled.create_infer_request(), feeds


def _graph_name(port, shapes: dict) -> str:
    """A port's interface name (an ONNX input can carry internal tensor names too)."""
    names = port.get_names()
    return next((n for n in ("step_index", *shapes) if n in names), port.get_any_name())


def cpu_description(device: str = "CPU") -> dict:
    import openvino as ov

    core = ov.Core()
    return {"device": core.get_property(device, "FULL_DEVICE_NAME"),
            "capabilities": list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))}


def choose_float_layers(fp32_graph: Path, int8_graph: Path, shapes: dict[str, list[int]],
                        layers: set[str]) -> dict:
    """Profile both graphs and decide; the result (with every layer's timings) goes into the
    export so the choice can be read and reproduced."""
    fp32 = layer_seconds(profile_nodes(fp32_graph, shapes), layers)
    int8 = layer_seconds(profile_nodes(int8_graph, shapes), layers)
    kept = layers_kept_float(int8, fp32)
    return {"cpu": cpu_description(), "shapes": shapes, "calls": PROFILE_CALLS,
            "kept_float": kept,
            "int8_seconds": round(sum(int8.values()), 4),
            "fp32_seconds": round(sum(fp32.values()), 4),
            "layers": {name: {"int8_ms": round(1e3 * int8[name], 3),
                              "fp32_ms": round(1e3 * fp32[name], 3)} for name in sorted(layers)}}
