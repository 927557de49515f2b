"""Our Python sampler loop against OpenVINO GenAI's C++ loop on the same export, at several
image sizes, side by side in one run: per-image latency, UNet step time and peak RSS.

Both runtimes read the same IR (GenAI the optimum-intel layout, ours its own UNet graph over
the same weights), compile it with static shapes for one prompt with guidance (UNet batch 2)
under OpenVINO's LATENCY hint, draw an untimed 2-step first image, then --repeats timed
images. A UNet step is one UNet call plus the sampler update (GenAI's iteration duration).
Each runtime and size runs in a fresh process, one after the other, so each peak RSS is its
own. Sizes other than the export's reuse its calibration (speed, not quality).

    python benchmarks/genai_runtime.py exports/sd14-w8a8 --sizes 256,512 \\
        --out benchmarks/results/sd14-genai-runtime

Writes results.json and results.png to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import (bars, child_main, command_line, figure, machine, markdown_table, run_child,
                    save_figure, save_results)

from dq_export.errors import UserError

PROMPT = "a photograph of a lighthouse at dusk"
RUNTIMES = ("ours", "genai")
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}  # ours' default
DURATION = ("Time on 2 cores: sd14 W8A8 at 256 and 512 with pndm:20 and --repeats 1: about "
            "15 minutes on an AVX2 CPU.")


def _ours(export: str, size: int, scheduler: str, steps: int, repeats: int) -> dict:
    from deploy import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(export, verify=False, image_size=(size, size))
    load_s = time.perf_counter() - start
    pipe.generate(PROMPT, steps=2, scheduler=scheduler, seed=0, cache="off")
    runs = [pipe.generate(PROMPT, steps=steps, scheduler=scheduler, seed=1 + i, cache="off")
            for i in range(repeats)]
    return {"load_and_compile_s": load_s,
            "image_s": [r.timings["total"] for r in runs],
            "step_s": [s for r in runs for s in r.step_seconds]}


def _genai(export: str, size: int, scheduler: str, steps: int, repeats: int) -> dict:
    import openvino_genai as og

    from deploy.genai import genai_pipeline

    start = time.perf_counter()
    pipe = genai_pipeline(export, scheduler, device=None)
    pipe.reshape(1, size, size, 7.5)
    pipe.compile("CPU", **OV_CONFIG)
    load_s = time.perf_counter() - start

    def image(steps: int, seed: int) -> tuple[float, list[float]]:
        begin = time.perf_counter()
        pipe.generate(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,
                      width=size, generator=og.TorchGenerator(seed))
        wall = time.perf_counter() - begin
        steps_us = pipe.get_performance_metrics().raw_metrics.iteration_durations  # µs
        return wall, [us / 1e6 for us in steps_us]

    image(2, 0)
    runs = [image(steps, 1 + i) for i in range(repeats)]
    return {"load_and_compile_s": load_s, "image_s": [wall for wall, _ in runs],
            "step_s": [s for _, step_s in runs for s in step_s]}


def measure(runtime: str, **task) -> dict:
    """Child: one runtime at one size; medians in seconds."""
    raw = {"ours": _ours, "genai": _genai}[runtime](**task)
    return {"load_and_compile_s": round(raw["load_and_compile_s"], 2),
            "image_s": round(statistics.median(raw["image_s"]), 3),
            "unet_step_s": round(statistics.median(raw["step_s"]), 4),
            "images_s": [round(s, 3) for s in raw["image_s"]]}


def table(results: dict) -> str:
    head = ("size", "runtime", "image, s", "UNet step, s", "peak RSS MB", "load+compile, s",
            "GenAI / ours (image)")
    lines = []
    for size, rows in results["sizes"].items():
        for runtime, row in rows.items():
            ratio = rows["genai"]["image_s"] / rows["ours"]["image_s"]
            lines.append((size, runtime, row["image_s"], row["unet_step_s"], row["peak_rss_mb"],
                          row["load_and_compile_s"],
                          f"{ratio:.3f}x" if runtime == "genai" else ""))
    return markdown_table(head, lines)


def chart(results: dict, path: Path) -> None:
    fig, axes = figure(3, width=4.2)
    labels = [f"{runtime}\n{size}" for size, rows in results["sizes"].items() for runtime in rows]
    for ax, key, title in zip(axes, ("image_s", "unet_step_s", "peak_rss_mb"),
                              ("image latency, s (median)", "UNet step, s (median)",
                               "peak RSS, MB")):
        bars(ax, labels, [row[key] for rows in results["sizes"].values()
                          for row in rows.values()], title)
    host = results["machine"]
    save_figure(fig, path, f"{results['export']}: {results['scheduler']}, {host['cpu']}, "
                f"{host['cores']} cores", fontsize=9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("export", nargs="?", help="a text-to-image export with the GenAI layout")
    p.add_argument("--sizes", default="256,512", help="image sizes, comma-separated")
    p.add_argument("--scheduler", default="pndm:20",
                   help="SAMPLER:STEPS both runtimes have: pndm, ddim or euler (pndm:20)")
    p.add_argument("--repeats", type=int, default=1, help="timed images per runtime and size")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/genai-runtime"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_out, measure)
    try:
        name, _, steps = args.scheduler.partition(":")
        sizes = [int(s) for s in args.sizes.split(",") if s.strip().isdigit()]
        if not steps.isdigit() or int(steps) < 1 or args.repeats < 1 or not sizes:
            raise UserError("give --scheduler NAME:STEPS, --sizes like 256,512 and "
                            "--repeats >= 1")
        if not args.export or not (Path(args.export) / "model_index.json").is_file():
            raise UserError(f"{args.export} has no GenAI layout (model_index.json): export a "
                            "text-to-image model with dq-export --genai")
        results = {"machine": machine(), "export": args.export, "scheduler": args.scheduler,
                   "prompt": PROMPT, "repeats": args.repeats, "sizes": {},
                   "command": command_line("genai_runtime.py", argv)}
        for size in sizes:
            results["sizes"][str(size)] = {runtime: run_child(__file__, {
                "runtime": runtime, "export": args.export, "size": size, "scheduler": name,
                "steps": int(steps), "repeats": args.repeats}, f"{runtime} at {size}")
                for runtime in RUNTIMES}
    except UserError as e:
        print(f"genai_runtime: error: {e}", file=sys.stderr)
        return e.exit_code
    print(table(results))
    save_results(args.out, results, chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
