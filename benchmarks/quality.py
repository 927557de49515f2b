"""What quantization costs in quality, on the trained reference model (tiny-sd, digits).

For each scheduler (default PNDM 50 steps, the paper's setting, and DPM-Solver++ 20), every
export draws the ten digits ("a handwritten digit D") for seeds 0..S-1 with the same
seeds, and is scored by the judge: class accuracy and digits FID against the held-out real
digits, its digits FID to FP32's own samples, and final-image PSNR/SSIM against the FP32
export's image of the same seed. Along
FP32's own trajectories (the first ``--fidelity-seeds`` seeds) every export's noise
prediction is compared with FP32's at each step: relative MSE and the rate-distortion
paper's MSE+SSIM distortion (dq_export.evaluation.fidelity).

Noise: seeds are resampled with replacement (each seed's ten digits together) to give 95%
intervals, and the same resamples pair each export with FP32, so a difference from FP32
whose interval holds 0 is within noise at this sample size.

    python benchmarks/quality.py fp32=exports/tiny-fp32 nncf=exports/tiny-nncf \\
        ours-w8a8=exports/tiny-w8a8 --seeds 50 --out benchmarks/results/quality

Prints a table per scheduler; writes results.json, results.png (per-step curves) and
samples-SCHEDULER.png (rows: exports, same seeds) to --out. Generated samples are kept in
--out/samples and reused when the same export is scored again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from common import machine, markdown_table, parse_exports, parse_schedulers, save_figure
from dq_export.errors import UserError

DIGITS = 10
CI = (2.5, 97.5)

DURATION = ("Time on 2 cores: each export's 300 PNDM-50 samples (--seeds 30) take 2-6 "
            "minutes; four exports at --schedulers pndm:50 --seeds 30: about 8 minutes.")


def load_exports(items: list[str]) -> dict:
    """LABEL=DIR -> Pipelines compiled for ten prompts; the FP32 export without a feature
    cache, the reference every export is compared with, first (an FP32 export with a cache
    is a row like any other)."""
    from deploy import Pipeline

    pipes = {label: Pipeline.load(path, batch_size=DIGITS, verify=False)
             for label, path in parse_exports(items).items()}
    fp32 = [k for k, p in pipes.items()
            if p.manifest["recipe"]["bits"] == "fp32" and p.cache is None]
    if len(fp32) != 1:
        raise UserError(f"{len(fp32)} uncached FP32 exports among {list(pipes)}: give exactly "
                        "one (dq-export --bits fp32), the reference every export is compared "
                        "with")
    return {fp32[0]: pipes.pop(fp32[0]), **pipes}


def samples(pipe, label: str, scheduler: str, steps: int, seeds: int, cache: Path,
            ray: str | None = None) -> np.ndarray:
    """[seeds * 10, H, W, 3] uint8 digits (seed-major, digits 0-9), cached on disk by
    export manifest, scheduler, steps and seed count. ``ray``: a cluster address to draw
    them on, the seeds sharded over its CPUs (the same images)."""
    from dq_export.evaluation.reference.evaluate import generate_digits, generate_digits_on_ray

    key = hashlib.sha256((pipe.root / "manifest.json").read_bytes()).hexdigest()[:12]
    path = cache / f"{label}-{scheduler}-{steps}-s{seeds}-{key}.npy"
    if path.is_file():
        return np.load(path)
    if ray is None:
        images, _ = generate_digits(pipe, range(seeds), steps, scheduler)
    else:
        images, _ = generate_digits_on_ray(pipe.root, range(seeds), steps, scheduler,
                                           address=ray, ov_config=pipe.ov_config)
    array = np.stack([np.asarray(im) for im in images])
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return array


def draws(seeds: int, resamples: int) -> list[np.ndarray]:
    """Image rows of the full sample, then of ``resamples`` seed resamples (fixed rng, so
    every export gets the same ones: paired with FP32)."""
    rng = np.random.default_rng(0)
    picks = [np.arange(seeds)] + [rng.integers(0, seeds, seeds) for _ in range(resamples)]
    return [(pick[:, None] * DIGITS + np.arange(DIGITS)).ravel() for pick in picks]


def judged(images: np.ndarray, rows: list[np.ndarray], real_features: np.ndarray) -> dict:
    """Accuracy and digits FID of ``images`` for each set of rows."""
    from dq_export.evaluation.reference import judge

    labels = np.tile(np.arange(DIGITS), len(images) // DIGITS)
    pil = list(_pil(images))
    predicted, _ = judge.classify(pil)
    correct, features = predicted == labels, judge.features(pil)
    return {"accuracy": np.array([correct[r].mean() for r in rows]),
            "digits_fid": np.array([judge.digits_fid(features[r], real_features) for r in rows]),
            "features": features}


def image_psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR of every image against FP32's image of the same seed and digit."""
    from dq_export.evaluation.image_metrics import psnr

    return np.array([psnr(a, b) for a, b in zip(reference, images)])


def paired_psnr(images: dict, pairs: list[str], rows: list[np.ndarray]) -> dict:
    """``A:B`` -> mean PSNR of A minus B's (both against FP32, image by image) with the
    interval of the seed resamples: whether one export is closer to FP32 beyond noise."""
    fp32 = next(iter(images.values()))
    out = {}
    for pair in pairs:
        a, b = pair.split(":")
        diff = image_psnr(images[a], fp32) - image_psnr(images[b], fp32)
        out[pair] = _estimate(np.array([diff[r].mean() for r in rows]))
    return out


def scores(images: np.ndarray, reference: np.ndarray, own: dict, fp32: dict,
           rows: list[np.ndarray]) -> dict:
    """Estimates with intervals, differences from FP32 on the same resamples, and the
    images' PSNR (with its interval) and SSIM against FP32's images of the same seeds."""
    from dq_export.evaluation.image_metrics import ssim
    from dq_export.evaluation.reference import judge

    result = {"accuracy": _estimate(own["accuracy"]),
              # resampling duplicates images, which inflates FID: no interval on FID itself,
              # but the paired difference carries about the same bias on both sides
              "digits_fid": {"value": round(float(own["digits_fid"][0]), 2)}}
    for metric in ("accuracy", "digits_fid"):
        result[f"{metric}_delta"] = _estimate(own[metric] - fp32[metric])
    # the distance to FP32's own samples: fidelity to FP32, where FID to the data is not
    result["fid_to_fp32"] = round(judge.digits_fid(own["features"], fp32["features"]), 2)
    if images is not reference:
        per_image = image_psnr(images, reference)
        result["psnr"] = round(float(per_image.mean()), 2)
        result["psnr_ci"] = [round(float(v), 2) for v in
                             np.percentile([per_image[r].mean() for r in rows[1:]], CI)]
        result["ssim"] = round(float(np.mean([ssim(a, b) for a, b in zip(reference, images)])), 4)
    return result


def _estimate(values: np.ndarray) -> dict:
    """The full-sample value and the bootstrap interval of the resamples."""
    low, high = np.percentile(values[1:], CI) if len(values) > 1 else (values[0],) * 2
    return {"value": round(float(values[0]), 4), "ci": [round(float(low), 4),
                                                       round(float(high), 4)]}


def _pil(array: np.ndarray):
    from PIL import Image

    return (Image.fromarray(a) for a in array)


def fidelity(pipes: dict, scheduler: str, steps: int, seeds: int) -> dict:
    """Per-step relative MSE and distortion of every export along FP32's trajectories."""
    from dq_export.evaluation.fidelity import METRICS, trajectory_errors
    from dq_export.evaluation.reference.digits import CANONICAL

    (_, reference), others = next(iter(pipes.items())), dict(list(pipes.items())[1:])
    prompts = [CANONICAL.format(d=d) for d in range(DIGITS)] * seeds
    metrics = {name: METRICS[name] for name in ("relative_mse", "distortion")}
    errors = trajectory_errors(reference, others, prompts, steps, scheduler, seed=0,
                               metrics=metrics)
    return {label: {metric: {"mean": round(float(e.mean()), 5),
                             "per_step": np.round(e.mean(axis=0), 5).tolist()}
                    for metric, e in per.items()}
            for label, per in errors.items()}


def parse_pairs(text: str, labels: list[str]) -> list[str]:
    """``A:B,...`` -> ["A:B", ...], each a pair of non-FP32 export labels."""
    pairs = [item.strip() for item in text.split(",") if item.strip()]
    for pair in pairs:
        a, sep, b = pair.partition(":")
        if not sep or a not in labels or b not in labels or a == b:
            raise UserError(f"--pairs {pair!r}: give A:B with two labels of the non-FP32 "
                            f"exports ({', '.join(labels)})")
    return pairs


def fmt(estimate: dict, digits: int = 3) -> str:
    low, high = estimate["ci"]
    return f"{estimate['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table(run: dict) -> str:
    """One markdown table of one scheduler's results."""
    head = ("export", "accuracy [95% CI]", "accuracy - FP32", "digits FID",
            "FID - FP32 [95% CI]", "FID to FP32", "PSNR dB [95% CI]", "SSIM", "rel. MSE / step",
            "distortion / step")
    rows = []
    for label, r in run["exports"].items():
        fid = run["fidelity"].get(label, {})
        rows.append((
            label, fmt(r["accuracy"]), fmt(r["accuracy_delta"]),
            f"{r['digits_fid']['value']:.1f}", fmt(r["digits_fid_delta"], 1),
            f"{round(r['fid_to_fp32'], 1) + 0.0:.1f}",  # FP32 to itself: -1e-12, not "-0.0"
            _psnr(r), f"{r['ssim']:.3f}" if "ssim" in r else "-",
            f"{fid['relative_mse']['mean']:.4f}" if fid else "-",
            f"{fid['distortion']['mean']:.4f}" if fid else "-"))
    return markdown_table(head, rows)


def _psnr(row: dict) -> str:
    """PSNR with its interval (results before intervals were recorded have none)."""
    if "psnr" not in row:
        return "-"
    low, high = row.get("psnr_ci") or (None, None)
    return f"{row['psnr']:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def chart(results: dict, path: Path) -> None:
    """Per-step relative MSE and distortion vs FP32, one column per scheduler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 7), squeeze=False)
    for col, run in enumerate(runs):
        for row, metric in enumerate(("relative_mse", "distortion")):
            ax = axes[row][col]
            for label, per in run["fidelity"].items():
                ax.plot(per[metric]["per_step"], label=f"{label} ({per[metric]['mean']:.4f})")
            ax.set_yscale("log")
            ax.set_xlabel(f"{run['scheduler']} step (of {run['steps']})")
            ax.set_ylabel(f"{metric.replace('_', ' ')} vs FP32")
            ax.legend(fontsize=7)
    save_figure(fig, path, f"noise-prediction fidelity along FP32's trajectories, "
                f"{results['fidelity_seeds']} seeds x 10 digits")


def sample_grid(images: dict[str, np.ndarray], seeds: int, path: Path) -> None:
    """Rows: exports (label at the left); columns: digits 0-9 of the first ``seeds`` seeds."""
    from PIL import Image, ImageDraw

    from dq_export.evaluation.reference.evaluate import grid

    width = 110
    rows = []
    for label, array in images.items():
        row = grid(list(_pil(array[:seeds * DIGITS])), columns=seeds * DIGITS)
        canvas = Image.new("RGB", (row.width + width, row.height), "white")
        canvas.paste(row, (width, 0))
        ImageDraw.Draw(canvas).text((4, row.height // 2 - 6), label, fill="black")
        rows.append(canvas)
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * row.height))
    sheet.save(path)


def run(pipes: dict, scheduler: str, steps: int, args) -> tuple[dict, dict]:
    """One scheduler: every export's samples, scores and per-step fidelity."""
    from dq_export.evaluation.reference import judge
    from dq_export.evaluation.reference.digits import load_split

    real = judge.features(load_split().test_images)
    rows = draws(args.seeds, args.resamples)
    images = {}
    for label, pipe in pipes.items():
        print(f"{scheduler} {steps}: sampling {label}", file=sys.stderr, flush=True)
        images[label] = samples(pipe, label, scheduler, steps, args.seeds, args.out / "samples",
                                args.ray)
    fp32_label = next(iter(pipes))
    judgements = {label: judged(array, rows, real) for label, array in images.items()}
    exports = {label: scores(images[label], images[fp32_label], judgements[label],
                             judgements[fp32_label], rows) for label in pipes}
    fid = fidelity(pipes, scheduler, steps, args.fidelity_seeds) if args.fidelity_seeds else {}
    return {"scheduler": scheduler, "steps": steps, "exports": exports, "fidelity": fid,
            "paired_psnr": paired_psnr(images, args.pairs, rows)}, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("exports", nargs="+", help="LABEL=EXPORT_DIR of tiny-sd; one of them FP32")
    p.add_argument("--schedulers", default="pndm:50,dpm++:20", help="NAME:STEPS,...")
    p.add_argument("--seeds", type=int, default=50, help="seeds 0..N-1, ten digits each (50)")
    p.add_argument("--fidelity-seeds", type=int, default=5,
                   help="seeds of FP32 trajectories for the per-step errors (5; 0: skip)")
    p.add_argument("--resamples", type=int, default=300, help="bootstrap resamples (300)")
    p.add_argument("--grid-seeds", type=int, default=2, help="seeds in the sample grids (2)")
    p.add_argument("--pairs", default="",
                   help="A:B,...: PSNR of export A minus export B's, image by image, with a 95%% "
                        "interval (is A closer to FP32 than B beyond noise?)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="draw the samples on a Ray cluster, the seeds sharded over its CPUs "
                        "(the same images as here); auto: the cluster `ray start` runs on this "
                        "machine, else a new local one")
    args = p.parse_args(argv)
    try:
        if args.seeds < 2 or args.fidelity_seeds < 0:
            raise UserError("--seeds must be at least 2 and --fidelity-seeds at least 0")
        if args.ray is not None:
            from dq_export.ray_cluster import require_ray

            require_ray()
        schedulers = parse_schedulers(args.schedulers)
        pipes = load_exports(args.exports)
        args.pairs = parse_pairs(args.pairs, list(pipes)[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "seeds": args.seeds, "fidelity_seeds": args.fidelity_seeds,
               "resamples": args.resamples, "ci": list(CI),
               "exports": {label: {"dir": pipe.root.as_posix(), **_recipe(pipe.manifest)}
                           for label, pipe in pipes.items()},
               "command": " ".join(["python benchmarks/quality.py", *(argv or sys.argv[1:])]),
               "runs": []}
    for spec in schedulers:
        scheduler, steps = spec.split(":")
        result, images = run(pipes, scheduler, int(steps), args)
        results["runs"].append(result)
        sample_grid(images, args.grid_seeds,
                    args.out / f"samples-{scheduler.replace('+', 'p')}-{steps}.png")
        print(f"\n### {scheduler}, {steps} steps: {args.seeds} seeds x 10 digits\n")
        print(table(result))
        for pair, estimate in result["paired_psnr"].items():
            print(f"PSNR {pair.replace(':', ' - ')}: {fmt(estimate, 2)} dB")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.fidelity_seeds:
        chart(results, args.out / "results.png")
    print(f"\nwrote {args.out}/results.json, results.png and the sample grids")
    return 0


def _recipe(manifest: dict) -> dict:
    recipe = manifest["recipe"]
    keys = ("bits", "method", "groups", "estimator", "time_tables", "split_shortcut")
    out = {k: recipe[k] for k in keys if k in recipe}
    if "cache" in manifest:  # the feature cache's schedule: which calibrated steps run in full
        schedule = manifest["cache"]["schedule"]
        out["cache"] = {"branch": manifest["cache"]["branch"], "kind": schedule["kind"],
                        "full_steps": len(schedule["full_steps"]),
                        "of_steps": len(manifest["cache"]["timesteps"])}
    return out


if __name__ == "__main__":
    sys.exit(main())
