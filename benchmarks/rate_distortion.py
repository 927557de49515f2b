"""Measured rate-distortion points of exports: UNet size against per-step distortion.

Reads a ``benchmarks/quality.py`` results.json (per-step MSE + SSIM distortion of each
export along FP32's trajectories) and each export's manifest: the UNet IR's weights (the
.bin), and for
``--budget`` exports the allocation's weight bytes and predicted distortion. Plots the
uniform recipes as points and the allocations as a curve, and prints the table.

    python benchmarks/rate_distortion.py benchmarks/results/tiny-sd-mixed-precision/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import markdown_table, save_figure


def points(results: dict) -> list[dict]:
    from dq_export.manifest import ir_files, read_manifest

    run = results["runs"][0]
    rows = []
    for label, entry in results["exports"].items():
        if label not in run["fidelity"]:
            continue  # the FP32 reference
        root = Path(entry["dir"])
        manifest = read_manifest(root, verify=False)
        allocation = manifest["quantization"].get("allocation")
        fidelity = run["fidelity"][label]
        _, weights = ir_files(root, manifest["components"]["unet"])
        rows.append({"export": label, "ir_mb": round(weights.stat().st_size / 1e6, 3),
                     "budget": allocation["budget"] if allocation else None,
                     "weight_mb": allocation["weight_bytes"] / 1e6 if allocation else None,
                     "predicted": allocation["predicted_distortion"] if allocation else None,
                     "distortion": fidelity["distortion"]["mean"],
                     "relative_mse": fidelity["relative_mse"]["mean"],
                     "psnr": run["exports"][label].get("psnr")})
    return sorted(rows, key=lambda r: r["ir_mb"])


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    mixed = [r for r in rows if r["budget"]]
    ax.plot([r["ir_mb"] for r in mixed], [r["distortion"] for r in mixed], "o-",
            color="#4c72b0", label="allocated (--budget), measured")
    ax.plot([r["ir_mb"] for r in mixed], [r["predicted"] for r in mixed], "x--",
            color="#4c72b0", alpha=0.6, label="allocated, predicted by the curves")
    for r in rows:
        if not r["budget"]:
            ax.plot(r["ir_mb"], r["distortion"], "s", color="#c44e52")
            ax.annotate(r["export"], (r["ir_mb"], r["distortion"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("UNet IR weights (.bin), MB")
    ax.set_ylabel("MSE + SSIM distortion per step vs FP32")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a benchmarks/quality.py results.json")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    rows = points(results)
    print(markdown_table(
        ("export", "budget", "UNet IR .bin MB", "allocated weights MB", "distortion / step",
         "predicted", "rel. MSE / step", "PSNR dB"),
        [(r["export"], r["budget"] or "-", r["ir_mb"],
          f"{r['weight_mb']:.3f}" if r["weight_mb"] else "-", f"{r['distortion']:.4f}",
          f"{r['predicted']:.4f}" if r["predicted"] is not None else "-",
          f"{r['relative_mse']:.4f}", r["psnr"]) for r in rows]))
    out = args.results.with_name("rate_distortion.png")
    run = results["runs"][0]
    chart(rows, out, f"{run['scheduler']} {run['steps']} steps, {results['fidelity_seeds']} "
                     "seeds x 10 digits: measured per-step distortion against size")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
