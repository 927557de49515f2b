"""Markdown tables of a ``benchmarks/image_latency.py`` results.json, so that docs/results.md
(benchmarks/results_doc.py) is generated from the measurements, never typed.

    python benchmarks/readme_table.py benchmarks/results/sd14-image-latency/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import markdown_table


def seconds(ms: float) -> str:
    return f"{ms / 1e3:.3g}"


def times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def machine_line(results: dict) -> str:
    m, size = results["machine"], results["image_size"]
    return (f"Measured on {m['cpu']}, {m['cores']} cores ({', '.join(m['isa']) or 'no AVX2'}), "
            f"OpenVINO {m['openvino'].split('-')[0]}, Python {m['python']}: {results['model']} "
            f"{size}x{size}, one prompt with guidance (UNet batch 2), median of "
            f"{results['repeats']} image{'s' * (results['repeats'] != 1)} after the first; each "
            f"export in a fresh process{rounds_note(results.get('rounds', []))}.")


def rounds_note(orders: list[list[str]]) -> str:
    """How ``--rounds`` ordered the processes (nothing for a single round)."""
    if len(orders) < 2:
        return ""
    return (f", {len(orders)} rounds in the orders "
            + "; ".join(", ".join(order) for order in orders) + ", medians over the rounds")


def latency_table(results: dict, spec: str) -> str:
    head = (spec, "UNet calls full/cached", "text encoder s", "UNet loop s", "UNet step ms",
            "VAE decoder s", "image s", "speed-up vs FP32", "speed-up vs NNCF",
            "speed-up vs uncached")
    lines = []
    for label, row in results["exports"].items():
        lat, ratio = row["latency"][spec], results["ratios"][label]
        calls = lat.get("unet_calls") or {}
        lines.append((label, f"{calls.get('full', '-')}/{calls.get('cached', 0)}",
                      seconds(lat["text_encoder_ms"]), seconds(lat["unet_loop_ms"]),
                      f"{lat['unet_step_ms']:.1f}", seconds(lat["vae_decoder_ms"]),
                      seconds(lat["total_ms"]), _pair(ratio.get("speedup_vs_fp32"), spec),
                      _pair(ratio.get("speedup_vs_nncf"), spec),
                      _pair(ratio.get("speedup_vs_uncached"), spec)))
    return markdown_table(head, lines)


def _pair(speedups: dict | None, spec: str) -> str:
    if speedups is None:
        return "-"
    return f"{times(speedups[spec]['total'])} / {times(speedups[spec]['unet_loop'])}"


def memory_table(results: dict) -> str:
    head = ("export", "bits", "method", "load + compile s", "first image s", "peak RSS MB",
            "RSS vs FP32", "text encoder MB", "UNet MB", "VAE decoder MB", "export MB")
    lines = []
    for label, row in results["exports"].items():
        sizes = row["sizes_mb"]
        method = "-" if row["bits"] == "fp32" else row["method"]
        lines.append((label, row["bits"], method, row["load_and_compile_s"],
                      seconds(row["first_image"]["total_ms"]), row["peak_rss_mb"],
                      times(results["ratios"][label].get("peak_rss_vs_fp32")),
                      sizes["text_encoder"], sizes["unet"], sizes["vae_decoder"],
                      sizes["export"]))
    return markdown_table(head, lines)


def throughput_table(results: dict) -> str:
    head = ("export", "batch", "requests in flight", "images/min", "vs FP32", "peak RSS MB")
    lines = []
    for label, row in results["exports"].items():
        vs_fp32 = results["ratios"][label].get("throughput_vs_fp32", {})
        for batch, t in row["throughput"].items():
            lines.append((label, batch, t["requests"], t["images_per_min"],
                          times(vs_fp32.get(batch)), t["peak_rss_mb"]))
    return markdown_table(head, lines)


def goal_lines(results: dict) -> list[str]:
    lines = []
    goal = results["goals"]["memory"]
    if goal["exports"]:
        verdicts = [f"{label} {times(g['peak_rss_vs_fp32'])} ({'met' if g['met'] else 'not met'})"
                    for label, g in goal["exports"].items()]
        lines.append(f"Memory goal, ours W8A8 peak RSS <= {goal['target_peak_rss_vs_fp32']}x "
                     "FP32: " + "; ".join(verdicts) + ".")
    cache = results["goals"].get("cache", {"exports": {}})  # results before the feature cache
    for label, specs in cache["exports"].items():
        target = cache["target"]
        verdicts = [f"{spec}: {times(g['vs_uncached'])} uncached, {times(g['vs_fp32'])} FP32 "
                    f"({'met' if g['met'] else 'not met'})" for spec, g in specs.items()]
        lines.append(f"Cache goal, {label} per image >= {target['vs_uncached']}x uncached and "
                     f">= {target['vs_fp32']}x FP32 (set at pndm:50): " + "; ".join(verdicts)
                     + ".")
    return lines


def markdown(results: dict) -> str:
    throughput = results["throughput"]
    first_image = next(iter(results["exports"].values()))["first_image"]["scheduler"]
    parts = [machine_line(results)]
    parts += [f"**Image latency, {spec}** (median seconds by component; a UNet step is one "
              "UNet call and the sampler update; speed-ups: image / UNet loop):\n\n"
              + latency_table(results, spec) for spec in results["schedulers"]]
    parts.append(f"**Start-up, memory and size on disk** (first image: the process's first, "
                 f"{first_image}; peak RSS of the latency process; sizes: each "
                 "component's OpenVINO IR, and the whole export folder):\n\n"
                 + memory_table(results))
    if throughput["batches"]:
        parts.append(f"**Throughput** ({throughput['scheduler']}, `PERFORMANCE_HINT: "
                     f"{throughput['hint']}`, the UNet's OPTIMAL_NUMBER_OF_INFER_REQUESTS "
                     "batches in flight; one process per batch size):\n\n"
                     + throughput_table(results))
    parts += goal_lines(results)
    parts.append(f"Reproduce:\n\n```sh\n{results['command']}\n```")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="results.json written by image_latency.py")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        text = markdown(results)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"readme_table: error: {args.results} is not an image_latency results.json "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
