"""Per-layer time of every kernel an allocation can choose, on the exporting CPU: the
latency rate of ``--budget latency=...``.

Each form of ``calibration.allocation.FORMS`` is one whole-UNet graph (FP32; all-int8 W8A8
in the shared-scale form; int8 and int4 weights with float inputs), profiled with
OpenVINO's per-layer counters (``dq_export.openvino_ir.target_cpu``); each executed node is
charged to its layer. Nodes no layer owns (attention scores, softmax, norms) are the same in
every form: their int8-graph total is the fixed part of a step.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from calibration.layers import quantized_layers


def form_times(components, fp32_onnx: Path, recipe, params, latent_size: int) -> dict:
    """{"layers": {layer: {form: ms}}, "fixed_ms", "int8_ms" (the all-int8 step)}."""
    from dq_export.graph.quantize_unet import write_group_graphs, write_shared_graph
    from dq_export.openvino_ir.target_cpu import layer_seconds, profile_nodes, profile_shapes

    unet = components.unet
    layers = set(quantized_layers(unet))
    shapes = profile_shapes(components, latent_size)
    times, fixed_ms, int8_ms = {}, 0.0, 0.0
    with tempfile.TemporaryDirectory(dir=fp32_onnx.parent, prefix=".forms-") as scratch:
        folder = Path(scratch)
        graphs = {"fp32": fp32_onnx,
                  "int8": write_shared_graph(fp32_onnx, folder / "int8.onnx", unet,
                                             replace(recipe, bits="w8a8"), params)}
        for form, bits in (("w8-float", "w8a16"), ("w4-float", "w4a16")):
            (folder / form).mkdir()
            graphs[form] = write_group_graphs(fp32_onnx, folder / form, unet,
                                              replace(recipe, bits=bits), None)[0]
        for form, graph in graphs.items():
            nodes = profile_nodes(graph, shapes)
            per_layer = layer_seconds(nodes, layers)
            times[form] = per_layer
            if form == "int8":
                int8_ms = 1e3 * sum(nodes.values())
                fixed_ms = int8_ms - 1e3 * sum(per_layer.values())
    return {"layers": {name: {form: round(1e3 * times[form][name], 4) for form in times}
                       for name in sorted(layers)},
            "fixed_ms": round(fixed_ms, 3), "int8_ms": round(int8_ms, 3)}
