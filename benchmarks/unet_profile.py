"""Where one UNet call spends its time, by kind of executed node, for several exports side by
side: OpenVINO's own per-node profile (PERF_COUNT) of each export's UNet IR.

It answers why one export's call is slower than another's: the int8 kernels (Convolution,
FullyConnected, MatMul), the softmax, the fused elementwise passes OpenVINO calls Subgraph,
the layout Reorders. For this project's shared-scale graph it also adds up the passes that
carry its runtime multipliers (the nodes OpenVINO built from ``ToIntegerUnits`` and
``FromIntegerUnits``). All exports' UNets are compiled in this one process, each at its
own size for one prompt with guidance (UNet batch 2), with seeded random inputs. After a
warm-up call each, they take turns for --calls rounds, so drift on a shared machine falls on
all of them alike: the call time is the median of those turns, each node's time its median.

    python benchmarks/unet_profile.py nncf=exports/sd14-nncf ours=exports/sd14-w8a8 \\
        --out benchmarks/results/sd14-512-profile

Writes results.json and results.png to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from common import (bars, command_line, figure, machine, markdown_table, parse_exports,
                    save_figure, save_results)

from dq_export.errors import UserError

MULTIPLIER_NODES = ("ToIntegerUnits", "FromIntegerUnits")  # dq_export/graph/shared_scales.py
PASS_KINDS = ("Subgraph", "Eltwise", "FakeQuantize")  # elementwise passes of their own
SHOWN_KINDS = 8  # the table's columns: the kinds with the most time, summed over exports
DURATION = ("Time on 2 cores at full size: sd14 at 512, three exports with 5 rounds: "
            "about 4 minutes.")


def compiled(label: str, export: Path, size: int | None):
    """The export's UNet compiled with per-node profiling for one prompt with guidance at its
    size (or ``size``), seeded random feeds, and the names of the executed nodes that carry
    the shared-scale graph's runtime multipliers."""
    from deploy.pipeline import component_shapes, resized_image
    from dq_export.manifest import ir_files, read_manifest
    from dq_export.openvino_ir.target_cpu import compiled_request

    manifest = read_manifest(export, verify=False)
    if size:
        manifest = {**manifest, "image": resized_image(manifest["image"], (size, size))}
    print(f"compiling {label} ({export}) ...", file=sys.stderr, flush=True)
    graph, weights = ir_files(export, manifest["components"]["unet"])
    request, feeds = compiled_request(graph, component_shapes(manifest, 1)["unet"],
                                      perf_count=True, weights=weights)
    multiplier_nodes = set()
    for op in request.get_compiled_model().get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        original = info["originalLayersNames"].astype(str)
        # a multiplier fused into a kernel's output (a constant one) costs no pass of its own
        if (info["layerType"].astype(str) in PASS_KINDS
                and any(name in original for name in MULTIPLIER_NODES)):
            multiplier_nodes.add(op.get_friendly_name())
    return request, feeds, multiplier_nodes


def profile_in_turns(exports: dict[str, Path], calls: int, size: int | None) -> dict[str, dict]:
    """Every export's UNet compiled in this process, then timed in turns
    (``target_cpu.timed_turns``), so drift on a shared machine falls on all alike; each
    timed call's per-node profile is kept."""
    from dq_export.openvino_ir.target_cpu import timed_turns

    runs = []
    for label, path in exports.items():
        runs.append(compiled(label, path, size))
    print(f"timing {calls} rounds ...", file=sys.stderr, flush=True)
    nodes: list[dict[str, list[float]]] = [defaultdict(list) for _ in runs]
    kinds: dict[str, str] = {}

    def keep_profile(i: int) -> None:
        for info in runs[i][0].profiling_info:
            nodes[i][info.node_name].append(info.real_time.total_seconds() * 1e3)
            kinds[info.node_name] = info.node_type

    walls = timed_turns([(request, feeds) for request, feeds, _ in runs], calls, keep_profile)
    return {label: summary(wall, own, kinds, run[2])
            for label, wall, own, run in zip(exports, walls, nodes, runs)}


def summary(wall: float, nodes: dict[str, list[float]], kinds: dict[str, str],
            multiplier_nodes: set[str]) -> dict:
    node_ms = {name: statistics.median(times) for name, times in nodes.items()}
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in node_ms.items():
        by_kind[kinds[name]] += ms
    return {"call_s": round(wall, 4),
            "node_sum_ms": round(sum(node_ms.values()), 1),
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(),
                                                             key=lambda kv: -kv[1])},
            "multiplier_passes_ms": round(sum(ms for name, ms in node_ms.items()
                                              if name in multiplier_nodes), 1),
            "nodes": len(node_ms)}


def shown_kinds(results: dict) -> list[str]:
    total: dict[str, float] = defaultdict(float)
    for row in results["rows"].values():
        for kind, ms in row["by_kind_ms"].items():
            total[kind] += ms
    return sorted(total, key=lambda k: -total[k])[:SHOWN_KINDS]


def other_ms(row: dict, kinds: list[str]) -> float:
    """A row's node time outside the shown ``kinds``."""
    return round(row["node_sum_ms"] - sum(row["by_kind_ms"].get(k, 0.0) for k in kinds), 1)


def table(results: dict) -> str:
    kinds = shown_kinds(results)
    first = next(iter(results["rows"].values()))["call_s"]
    head = ("export", "call s (in turns)", "vs first row", "sum of nodes ms",
            "multiplier passes ms", *kinds, "other ms")
    lines = []
    for label, row in results["rows"].items():
        shown = [row["by_kind_ms"].get(k, 0.0) for k in kinds]
        lines.append((label, row["call_s"], f"{row['call_s'] / first:.3f}x", row["node_sum_ms"],
                      row["multiplier_passes_ms"], *shown, other_ms(row, kinds)))
    return markdown_table(head, lines)


def chart(results: dict, path: Path) -> None:
    kinds = shown_kinds(results)
    fig, axes = figure(2, width=5.5)
    labels = list(results["rows"])
    bars(axes[0], labels, [row["call_s"] for row in results["rows"].values()],
         "UNet call, s (median, in turns)")
    bottom = [0.0] * len(labels)
    for kind in kinds + ["other"]:
        values = [row["by_kind_ms"].get(kind, 0.0) if kind != "other" else other_ms(row, kinds)
                  for row in results["rows"].values()]
        axes[1].bar(labels, values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set_title("by kind of node, ms (median per node)")
    axes[1].legend(fontsize=7)
    save_figure(fig, path, f"{results['machine']['cpu']}, {results['machine']['cores']} cores, "
                f"{results['image']}", fontsize=9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("exports", nargs="*", help="LABEL=EXPORT_DIR, in the order to run them")
    p.add_argument("--calls", type=int, default=3, help="profiled calls per export (3)")
    p.add_argument("--image-size", type=int, help="call the UNet at this side in pixels "
                   "instead of the export's (speed only: the calibration is the export's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/unet-profile"))
    args = p.parse_args(argv)
    try:
        if args.calls < 1:
            raise UserError("--calls must be at least 1")
        exports = parse_exports(args.exports)
        rows = profile_in_turns(exports, args.calls, args.image_size)
    except UserError as e:
        print(f"unet_profile: error: {e}", file=sys.stderr)
        return e.exit_code
    from dq_export.manifest import read_manifest

    image = read_manifest(next(iter(exports.values())), verify=False)["image"]
    side = (f"{args.image_size}x{args.image_size}" if args.image_size
            else f"{image['height']}x{image['width']}")
    results = {"kind": "unet_profile", "machine": machine(), "calls": args.calls,
               "image": f"{side}, UNet batch 2",
               "command": command_line("unet_profile.py", argv), "rows": rows}
    print(table(results))
    save_results(args.out, results, chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
