"""Quality against speed of the feature cache on the trained reference model (tiny-sd,
digits): PSNR to FP32 against the number of full UNet steps, DeepCache's uniform schedule
against the DP schedule at the same number of full steps, for each cached export given.

Each export must hold the DP's measured errors (``dq-export --cache-steps K``, whose
``cache_errors.json`` covers gaps up to 2·S/K): every schedule is drawn from them, so one
export per precision serves every point. For each point the export draws the ten digits for
seeds 0..N-1 with that schedule, and is compared image by image with the FP32 export's
uncached digits of the same seeds; the DP - uniform PSNR difference gets a paired 95%
interval over seed resamples. About 40 s per point at 20 seeds on 2 cores.

    python benchmarks/cache_curve.py fp32=exports/tiny-fp32 fp32-cache=exports/tiny-fp32-cache \\
        w8a8-cache=exports/tiny-w8a8-cache --out benchmarks/results/tiny-sd-cache-curve

Writes results.json and results.png (PSNR vs full steps, one line per export and schedule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import figure, machine, markdown_table, parse_exports, save_figure
from quality import CI, draws, image_psnr, samples

from calibration.cache_schedule import dp_full_steps, uniform_full_steps
from dq_export.errors import UserError

INTERVALS = (1, 2, 3, 4, 5, 7, 10)  # the uniform schedules; the DP gets each one's K

DURATION = "Time on 2 cores: about 40 s per point at 20 seeds."


def measured_errors(pipe) -> tuple[np.ndarray, np.ndarray]:
    """The export's per-step errors in full, and reusing an earlier step's feature."""
    name = pipe.cache.get("errors_file")
    if not name:
        raise UserError(f"{pipe.root} has no measured cache errors: export it with "
                        "dq-export --cache-steps K (the DP schedule), not --cache-interval")
    data = json.loads((pipe.root / name).read_text())
    cached = [[np.nan if v is None else v for v in row] for row in data["cached_error"]]
    return np.asarray(data["full_error"], float), np.asarray(cached, float)


def schedules(pipe, intervals) -> list[dict]:
    """Uniform every-N schedules and the DP's schedule of the same K, where the measured
    gaps allow one."""
    full_error, cached_error = measured_errors(pipe)
    steps, out = len(full_error), []
    for n in intervals:
        uniform = uniform_full_steps(steps, n)
        out.append({"kind": "uniform", "interval": n, "full_steps": uniform})
        try:
            dp = dp_full_steps(full_error, cached_error, len(uniform))
        except ValueError:  # gaps longer than the export measured
            continue
        out.append({"kind": "dp", "full_steps": dp})
    return out


def with_schedule(pipe, full_steps: list[int]):
    """``pipe`` sampling with these full steps (its own cache entry otherwise)."""
    schedule = {**pipe.cache["schedule"], "full_steps": full_steps}
    pipe.cache = {**pipe.cache, "schedule": schedule}
    return pipe


def run(exports: dict, scheduler: str, steps: int, seeds: int, resamples: int,
        intervals, out: Path) -> dict:
    from deploy import Pipeline

    pipes = {label: Pipeline.load(path, batch_size=10, verify=False)
             for label, path in exports.items()}
    reference_label = next(iter(pipes))
    reference = pipes.pop(reference_label)
    if reference.cache is not None or reference.manifest["recipe"]["bits"] != "fp32":
        raise UserError(f"the first export ({reference_label}) must be FP32 without a cache: "
                        "the reference every point is compared with")
    fp32 = samples(reference, reference_label, scheduler, steps, seeds, out / "samples")
    rows = draws(seeds, resamples)
    points = {}
    for label, pipe in pipes.items():
        if pipe.cache is None:
            raise UserError(f"{label} has no feature cache: give exports made with --cache")
        points[label] = []
        for schedule in schedules(pipe, intervals):
            tag = f"{schedule['kind']}{len(schedule['full_steps'])}"
            print(f"{label}: {tag}", file=sys.stderr, flush=True)
            images = samples(with_schedule(pipe, schedule["full_steps"]), f"{label}-{tag}",
                             scheduler, steps, seeds, out / "samples")
            psnr = image_psnr(images, fp32)
            points[label].append({**schedule, "k": len(schedule["full_steps"]),
                                  "psnr": _estimate(psnr, rows), "per_image": psnr})
    return {"scheduler": scheduler, "steps": steps, "seeds": seeds,
            "calibrated_steps": len(next(iter(pipes.values())).cache["timesteps"]),
            "exports": {label: _summarise(p, rows) for label, p in points.items()}}


def _estimate(values: np.ndarray, rows: list[np.ndarray]) -> dict:
    means = [values[r].mean() for r in rows]
    low, high = np.percentile(means[1:], CI)
    return {"value": round(float(means[0]), 3), "ci": [round(float(low), 3),
                                                       round(float(high), 3)]}


def _summarise(points: list[dict], rows: list[np.ndarray]) -> list[dict]:
    """Points without their per-image PSNRs, the DP ones with the paired difference to the
    uniform schedule of the same K."""
    uniform = {p["k"]: p["per_image"] for p in points if p["kind"] == "uniform"}
    out = []
    for p in points:
        entry = {k: v for k, v in p.items() if k != "per_image"}
        if p["kind"] == "dp":
            entry["psnr_minus_uniform"] = _estimate(p["per_image"] - uniform[p["k"]], rows)
        out.append(entry)
    return out


def table(results: dict) -> str:
    head = ("export", "full steps", "uniform PSNR dB [95% CI]", "DP PSNR dB [95% CI]",
            "DP - uniform dB [95% CI]", "DP full steps")
    lines = []
    for label, points in results["exports"].items():
        by_k = {}
        for p in points:
            by_k.setdefault(p["k"], {})[p["kind"]] = p
        for k, pair in sorted(by_k.items()):
            u, d = pair.get("uniform"), pair.get("dp")
            lines.append((label, f"{k} of {results['calibrated_steps']}",
                          _fmt(u["psnr"]) if u else "-", _fmt(d["psnr"]) if d else "-",
                          _fmt(d["psnr_minus_uniform"]) if d else "-",
                          " ".join(map(str, d["full_steps"])) if d else "-"))
    return markdown_table(head, lines)


def _fmt(estimate: dict) -> str:
    return f"{estimate['value']:.2f} [{estimate['ci'][0]:.2f}, {estimate['ci'][1]:.2f}]"


def chart(results: dict, path: Path) -> None:
    fig, ax = figure(1, width=7.0)
    for label, points in results["exports"].items():
        for kind, style in (("uniform", "--o"), ("dp", "-s")):
            ps = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["k"])
            ks = [p["k"] for p in ps]
            values = [p["psnr"]["value"] for p in ps]
            errors = np.abs(np.array([p["psnr"]["ci"] for p in ps]).T - values)
            ax.errorbar(ks, values, yerr=errors, fmt=style, capsize=3, label=f"{label}, {kind}")
    ax.set_xlabel(f"full UNet steps of {results['calibrated_steps']} "
                  f"({results['scheduler']} {results['steps']}; fewer is faster)")
    ax.set_ylabel("PSNR to FP32 uncached, dB")
    ax.set_title(f"feature cache: quality vs full steps, {results['seeds']} seeds x 10 digits")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("exports", nargs="+", help="LABEL=DIR: FP32 uncached first, then cached "
                   "exports of tiny-sd made with --cache-steps")
    p.add_argument("--scheduler", default="pndm:50", help="SAMPLER:STEPS (default pndm:50)")
    p.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1, ten digits each (20)")
    p.add_argument("--resamples", type=int, default=300, help="bootstrap resamples (300)")
    p.add_argument("--intervals", default=",".join(map(str, INTERVALS)),
                   help="uniform intervals N; the DP gets each one's full-step count")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cache-curve"))
    args = p.parse_args(argv)
    try:
        scheduler, _, steps = args.scheduler.partition(":")
        if not steps.isdigit() or args.seeds < 2:
            raise UserError("give --scheduler NAME:STEPS and --seeds of at least 2")
        intervals = [int(n) for n in args.intervals.split(",")]
        if min(intervals) < 1:
            raise UserError("--intervals must be integers >= 1")
        exports = parse_exports(args.exports)
        args.out.mkdir(parents=True, exist_ok=True)
        results = run(exports, scheduler, int(steps), args.seeds, args.resamples, intervals,
                      args.out)
    except (UserError, ValueError) as error:
        print(f"cache_curve: error: {error}", file=sys.stderr)
        return 2
    results.update(machine=machine(), exports_dirs={k: str(v) for k, v in exports.items()},
                   command=" ".join(["python benchmarks/cache_curve.py",
                                     *(argv or sys.argv[1:])]))
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    chart(results, args.out / "results.png")
    print(table(results))
    print(f"wrote {args.out}/results.json and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
