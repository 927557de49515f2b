"""Side by side: UNet latency, group-switch cost, peak memory and size of several exports.

Each export runs in its own fresh process (so peak RSS is that export's alone), one after
the other, never in parallel: load + compile, one short generation (text encoder, UNet,
VAE), then the first UNet call and ``--calls`` timed calls at batch 2 (one prompt with
classifier-free guidance). The timed calls come in pairs on the calibrated steps of each
group in turn, g0 g0 g1 g1 ...: the first of a pair switches group, the second does not, so
the median difference is what a group switch costs, measured interleaved against drift.

    python benchmarks/unet_deployment.py fp32=exports/sd14-fp32 nncf=exports/sd14-nncf \\
        ours-g1=exports/sd14-g1 ours-g4=exports/sd14-g4 --out benchmarks/results/sd14-512

Prints a table; writes results.json and results.png to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import (bars, child_main, figure, machine, markdown_table, parse_exports, run_child,
                    save_figure)

from dq_export.errors import UserError

IMAGE_STEPS = 50  # the image the switch cost is compared with: 50 PNDM steps

DURATION = ("Time on 2 cores at full size: five sd14 exports at 512 and then at 256: about 17 "
            "minutes for both sizes.")


def measure(export_dir: str, calls: int) -> dict:
    """Runs inside the child process: everything about one export (its peak RSS is added)."""
    from deploy import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(export_dir, verify=False)
    load_s = time.perf_counter() - start
    result = pipe.generate("a photograph of a lighthouse at dusk", steps=2, seed=0)
    embeddings = np.concatenate([pipe.encode_prompts([""]), pipe.encode_prompts(["a cat"])])
    shape = (2, *pipe.latent_shape[1:])  # one prompt with guidance: the UNet's batch 2
    latent = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    table = pipe.steps
    group_steps = _steps_by_group(table) if table is not None else [[None]]

    def call(step):
        timestep = float(table.timesteps[step]) if step is not None else 500.0
        t = time.perf_counter()
        pipe.predict_noise(latent, timestep, embeddings)
        return time.perf_counter() - t

    first = call(group_steps[0][0])
    switched, same = [], []
    for i in range(calls // 2):
        steps = group_steps[i % len(group_steps)]
        switched.append(call(steps[0]))
        same.append(call(steps[-1]))
    manifest = pipe.manifest
    unet = manifest["components"]["unet"]["openvino"]
    files = manifest["files"]
    unet_bytes = sum(files[f]["bytes"] for f in (unet, unet[:-4] + ".bin"))
    return {
        "export": str(export_dir), "bits": manifest["recipe"]["bits"],
        "method": manifest["recipe"]["method"],
        "groups": len(group_steps) if table is not None else None,
        "load_and_compile_s": round(load_s, 2), "first_call_ms": round(1e3 * first, 1),
        "call_ms_median": round(1e3 * statistics.median(switched + same), 1),
        "call_ms_all": [round(1e3 * x, 1) for x in switched + same],
        "switch_cost_ms": round(1e3 * (statistics.median(switched) - statistics.median(same)), 2),
        "text_encoder_ms": round(1e3 * result.timings["text_encoder"], 1),
        "vae_decoder_ms": round(1e3 * result.timings["vae_decoder"], 1),
        "unet_ir_mb": round(unet_bytes / 1e6, 1),
        "export_mb": round(sum(f["bytes"] for f in files.values()) / 1e6, 1),
    }


def _steps_by_group(table) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for step, group in enumerate(table.step_to_group):
        groups.setdefault(group, []).append(step)
    return [groups[g] for g in sorted(groups)]


def goals(rows: dict[str, dict]) -> dict:
    """Issue 4's goals from the rows present (labels fp32, nncf, ours-g1, ours-g4)."""
    out = {}
    g4, g1, nncf, fp32 = (rows.get(k) for k in ("ours-g4", "ours-g1", "nncf", "fp32"))
    if g4 and g1:
        out["g4_rss_over_g1"] = round(g4["peak_rss_mb"] / g1["peak_rss_mb"], 3)
    if g4 and nncf:
        out["g4_latency_over_nncf"] = round(g4["call_ms_median"] / nncf["call_ms_median"], 3)
    if g4 and fp32:
        out["fp32_latency_over_g4"] = round(fp32["call_ms_median"] / g4["call_ms_median"], 3)
    if g4:
        image = IMAGE_STEPS * g4["call_ms_median"] + g4["text_encoder_ms"] + g4["vae_decoder_ms"]
        switches = (g4["groups"] or 1) - 1
        out["g4_switch_share_of_image"] = round(max(g4["switch_cost_ms"], 0) * switches / image,
                                                5)
    return out


def table(rows: dict[str, dict]) -> str:
    head = ("export", "UNet call ms (median)", "first call ms", "group switch ms", "peak RSS MB",
            "UNet IR MB", "export MB")
    return markdown_table(head, [(label, r["call_ms_median"], r["first_call_ms"],
                                  r["switch_cost_ms"], r["peak_rss_mb"], r["unet_ir_mb"],
                                  r["export_mb"]) for label, r in rows.items()])


def chart(rows: dict[str, dict], path: Path, title: str) -> None:
    labels = list(rows)
    fig, axes = figure(3)
    for ax, key, name in zip(axes, ("call_ms_median", "peak_rss_mb", "unet_ir_mb"),
                             ("UNet call, ms (median)", "peak RSS, MB", "UNet IR, MB")):
        bars(ax, labels, [rows[label][key] for label in labels], name)
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("exports", nargs="*", help="LABEL=EXPORT_DIR, in the order to run them")
    p.add_argument("--calls", type=int, default=10,
                   help="timed UNet calls per export after the first (default 10)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/unet-deployment"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_out, measure)
    if not args.exports:
        p.error("give exports as LABEL=DIR, e.g. fp32=exports/sd14-fp32")
    if args.calls < 10:
        p.error("--calls must be at least 10 (a median of 5 switched and 5 same-group calls)")
    try:
        rows = {}
        for label, path in parse_exports(args.exports).items():
            print(f"{label}: {path} ...", file=sys.stderr, flush=True)
            rows[label] = run_child(__file__, {"export_dir": str(path), "calls": args.calls},
                                    label)
    except UserError as e:
        print(f"unet_deployment: error: {e}", file=sys.stderr)
        return e.exit_code
    first = next(iter(rows.values()))
    manifest = json.loads((Path(first["export"]) / "manifest.json").read_text())
    size = manifest["image"]["height"]
    results = {"machine": machine(),
               "image_size": size, "unet_batch": 2, "calls": args.calls, "rows": rows,
               "goals": goals(rows),
               "command": " ".join(["python benchmarks/unet_deployment.py",
                                    *(argv or sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(rows, args.out / "results.png", f"{manifest['model'].get('name', '')} {size}x{size}, "
          f"UNet batch 2, {results['machine']['cpu']}")
    print(table(rows))
    print(json.dumps(results["goals"], indent=2))
    print(f"wrote {args.out / 'results.json'} and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
