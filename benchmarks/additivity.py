"""Does the rate-distortion paper's additivity property (its property 1, figure 1) hold here?

The allocation adds single-layer distortions: quantizing several layers at once should
cost the sum of what each costs alone. This builds every layer's curves (Algorithm 1, the
export's own code and cache), then quantizes random sets of layers together (each with a
random curve point: int8 or int4 weights, int8 input, or both) and the uniform recipes
(all W8A8, all weights, all inputs, W4A8), measures the joint distortion on the UNet output
per timestep group, and plots it against the sum of the single-layer points. Then it times
the slope search from the cached curves under a sweep of size budgets, and draws the
allocation at uniform W8A8's size (figure 9's form).

    python benchmarks/additivity.py --model tiny-sd --out benchmarks/results/additivity-tiny-sd
    python benchmarks/additivity.py --model sd14 --init random --size 64 --calib-prompts 1 \\
        --calib-steps 10 --groups 1 --steps-per-group 1 --conditional-only \
        --out benchmarks/results/additivity-sd14
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import machine, save_figure

SUBSET_SIZES = (2, 4, 8, 16, 32, 64, 128)
POINTS = ("w8", "w4", "a8", "w8+a8")

DURATION = ("Time on 2 cores: the single-layer curves took about 13 minutes for sd14 at 64x64 "
            "with one group, and about 2 minutes for the tiny-sd reference model with four.")


def random_config(rng, names: list[str], kinds: dict[str, str], count: int) -> dict:
    """``count`` random layers, each at a random point of its curves."""
    config = {"bits": {}, "inputs": []}
    for name in rng.choice(names, size=min(count, len(names)), replace=False):
        options = [p for p in POINTS if kinds[name] == "linear" or p != "w4"]
        point = options[rng.integers(len(options))]
        if point.startswith("w"):
            config["bits"][name] = int(point[1])
        if "a8" in point:
            config["inputs"].append(name)
    return config


def uniform_configs(names: list[str], kinds: dict[str, str]) -> dict[str, dict]:
    return {"all W8A8": {"bits": dict.fromkeys(names, 8), "inputs": names},
            "all weights int8": {"bits": dict.fromkeys(names, 8), "inputs": []},
            "all inputs int8": {"bits": {}, "inputs": names},
            "W4A8 (int4 Linear)": {"bits": {n: 4 if kinds[n] == "linear" else 8
                                            for n in names}, "inputs": names}}


def predicted(curves: dict, config: dict) -> np.ndarray:
    """Sum of the single-layer points of ``config``, per group."""
    layers = {layer["name"]: layer for layer in curves["layers"]}
    total = np.zeros(len(curves["shares"]))
    for name, bits in config["bits"].items():
        total += layers[name]["weight_distortion"][str(bits)]
    for name in config["inputs"]:
        total += layers[name]["input_distortion"]
    return total


def allocation_timing(curves: dict, unet, params, out: Path, label: str) -> dict:
    """Seconds of the slope search from the cached curves, over a sweep of size budgets
    from the smallest reachable size (W4A8's) to FP32's; draws the allocation at W8A8's."""
    from calibration.allocation import Budget, Choice, allocate, table, weight_bytes
    from calibration.rd_curves import load_curves
    from dq_export.allocation_chart import draw
    from dq_export.mixed_export import fixed_bytes

    start = time.perf_counter()
    layers = load_curves(curves)
    t = table(layers, curves["shares"])
    build = time.perf_counter() - start
    fixed = fixed_bytes(unet)
    groups = len(curves["shares"])
    w4a8, w8a8 = (fixed + sum(weight_bytes(layer.kind, layer.params, Choice(
        4 if layer.kind == "linear" and four else 8, (8,) * groups)) for layer in layers)
        for four in (True, False))
    low, high = fixed + t.size.min(axis=1).sum(), fixed + 4 * sum(x.params for x in layers)
    rows = []
    for size in [w4a8, w8a8, *np.linspace(low, high, 8)]:
        start = time.perf_counter()
        result = allocate(t, Budget(size_bytes=float(size)), fixed)
        rows.append({"budget_mb": round(size / 1e6, 3), "size_mb": round(result.size_bytes / 1e6, 3),
                     "predicted_distortion": result.distortion,
                     "seconds": round(time.perf_counter() - start, 4)})
    kinds = {layer.name: layer.kind for layer in layers}
    result = allocate(t, Budget(size_bytes=w8a8), fixed)
    draw(result.choices, kinds, params.groups, params.timesteps, out / "allocation.png",
         f"{label}: allocation at W8A8's size ({w8a8 / 1e6:.1f} MB), predicted distortion "
         f"{result.distortion:.3g}")
    return {"table_seconds": round(build, 4), "layers": len(layers),
            "candidates_per_layer": int(np.isfinite(t.size).sum(axis=1).max()),
            "w4a8_mb": round(w4a8 / 1e6, 3), "w8a8_mb": round(w8a8 / 1e6, 3), "budgets": rows}


def chart(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    sizes = sorted({p["layers"] for p in points})
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(sizes):
        chosen = [p for p in points if p["layers"] == n and not p["uniform"]]
        if chosen:
            ax.scatter([p["sum_of_singles"] for p in chosen], [p["joint"] for p in chosen],
                       s=16, color=cmap(i / max(1, len(sizes) - 1)), label=f"{n} random layers")
    uniform = [p for p in points if p["uniform"]]
    ax.scatter([p["sum_of_singles"] for p in uniform], [p["joint"] for p in uniform], s=40,
               marker="*", color="#c44e52", label="uniform recipes")
    values = [v for p in points for v in (p["sum_of_singles"], p["joint"]) if v > 0]
    line = [min(values), max(values)]
    ax.plot(line, line, color="black", linewidth=0.8, label="joint = sum")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sum of single-layer distortions (MSE + SSIM)")
    ax.set_ylabel("joint distortion, all of them quantized together")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--init", default="pretrained", choices=("pretrained", "random"))
    p.add_argument("--size", type=int, default=None, help="image size (default: native)")
    p.add_argument("--calib-prompts", type=int, default=None)
    p.add_argument("--calib-steps", type=int, default=50)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--steps-per-group", type=int, default=None,
                   help="calibrated steps per group the curves measure (the export's default)")
    p.add_argument("--conditional-only", action="store_true",
                   help="measure on the prompts' rows of each guided call only (half the cost)")
    p.add_argument("--trials", type=int, default=3, help="random sets per subset size")
    p.add_argument("--calibration-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/additivity"))
    args = p.parse_args(argv)

    import torch

    from calibration import rd_curves
    from calibration.collect import collect, load_inputs, read_prompts
    from calibration.fit import fit
    from calibration.layers import shortcut_splits
    from dq_export.loading import load_components
    from dq_export.graph.quantize_unet import calibration_settings
    from dq_export.recipe import Recipe
    from dq_export.registry import default_calib_prompts

    recipe = Recipe(bits="w8a8", groups=args.groups, calib_steps=args.calib_steps,
                    calib_prompts=args.calib_prompts or default_calib_prompts(args.model))
    per_group = args.steps_per_group or rd_curves.STEPS_PER_GROUP
    components = load_components(args.model, args.init, recipe.seed)
    size = args.size or components.image_size
    unet = components.unet
    start = time.perf_counter()
    stats, summary = collect(components, calibration_settings(recipe), read_prompts(None), size,
                             args.calibration_dir)
    params = fit(stats, summary["calibrated_timesteps"], recipe.groups, recipe.group_split,
                 recipe.estimator)
    collect_seconds = time.perf_counter() - start
    calls = load_inputs(summary["cache_dir"])
    splits = shortcut_splits(unet)
    identity = {k: v for k, v in summary.items() if k != "seconds"}
    extra = {"conditional_only": True} if args.conditional_only else {}
    key = rd_curves.curves_key(params, {**identity, **extra}, per_group)
    curves = rd_curves.cached_curves(summary["cache_dir"], key, lambda: rd_curves.build_curves(
        unet, params, calls, splits, per_group, conditional_only=args.conditional_only))
    print(f"curves: {curves['seconds']} s when built ({len(curves['layers'])} layers, "
          f"{len(params.groups)} groups, steps {curves['steps_measured']})", file=sys.stderr)

    kinds = {layer["name"]: layer["kind"] for layer in curves["layers"]}
    names = list(kinds)
    rng = np.random.default_rng(0)
    configs = [(f"{n} random layers", n, False, random_config(rng, names, kinds, n))
               for n in SUBSET_SIZES if n < len(names) for _ in range(args.trials)]
    configs += [(label, len(names), True, c) for label, c in uniform_configs(names, kinds).items()]
    inputs = rd_curves.group_inputs(calls, params, per_group, args.conditional_only)
    start = time.perf_counter()
    torch.set_num_threads(1)
    joint = rd_curves.measure(unet, params, inputs, splits, [c for *_, c in configs])
    joint_seconds = time.perf_counter() - start
    points = []
    for (label, n, uniform, config), row in zip(configs, joint):
        for g, (j, s) in enumerate(zip(row, predicted(curves, config))):
            points.append({"config": label, "layers": n, "uniform": uniform, "group": g,
                           "joint": j, "sum_of_singles": float(s)})
    ratios = np.array([p["joint"] / p["sum_of_singles"] for p in points])
    logs = np.log([[p["sum_of_singles"], p["joint"]] for p in points])
    correlation = float(np.corrcoef(logs.T)[0, 1])
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"{args.model} ({args.init}, {size}x{size})"
    timing = allocation_timing(curves, unet, params, args.out, label)
    result = {"machine": machine(), "model": args.model, "init": args.init, "image_size": size,
              "calibration": summary, "collect_and_fit_seconds": round(collect_seconds, 1),
              "curves_seconds": curves["seconds"], "joint_seconds": round(joint_seconds, 1),
              "steps_measured": curves["steps_measured"],
              "ratio_joint_to_sum": {"median": float(np.median(ratios)),
                                     "p10": float(np.percentile(ratios, 10)),
                                     "p90": float(np.percentile(ratios, 90))},
              "log_correlation": correlation, "points": points, "allocation": timing,
              "command": " ".join(["python benchmarks/additivity.py", *(argv or sys.argv[1:])])}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    chart(points, args.out / "results.png",
          f"additivity, {label}\njoint / sum median {np.median(ratios):.2f} "
          f"[p10 {np.percentile(ratios, 10):.2f}, p90 {np.percentile(ratios, 90):.2f}], "
          f"log correlation {correlation:.3f}")
    print(f"{label}: joint / sum of singles, median {np.median(ratios):.3f} "
          f"(p10 {np.percentile(ratios, 10):.3f}, p90 {np.percentile(ratios, 90):.3f}); "
          f"correlation of logs {correlation:.4f}")
    for p_ in points:
        if p_["uniform"]:
            print(f"  {p_['config']:22s} group {p_['group']}: joint {p_['joint']:.4g}, "
                  f"sum {p_['sum_of_singles']:.4g}")
    print(f"slope search: table {timing['table_seconds']} s, per budget "
          f"{max(r['seconds'] for r in timing['budgets'])} s at most "
          f"({timing['layers']} layers, up to {timing['candidates_per_layer']} candidates each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
