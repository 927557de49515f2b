"""End-to-end image latency by component, peak memory, size on disk and server throughput of
several exports side by side, with the ratios that matter: speed-up over FP32, ours over
NNCF, peak RSS over FP32.

Every measurement runs in a fresh process, one after the other, never in parallel, so a peak
RSS is that measurement's alone. Latency (OpenVINO's LATENCY hint, one prompt: UNet batch 2
with guidance): load + compile, the first image on its own (first-call allocations), then
--repeats images per sampler, each timed by component (text encoder, UNet loop, VAE decoder,
total; a UNet step is one UNet call plus the scheduler update); medians. Throughput, one
process per --batch B: ``PERFORMANCE_HINT: THROUGHPUT``, and as many threads as the compiled
UNet's OPTIMAL_NUMBER_OF_INFER_REQUESTS, each generating its own batch of B prompts on a
``Pipeline.sibling()`` (the same compiled models: one copy of the weights); images per minute.
With --rounds N, every export's latency process runs N times, in the given order and then
reversed, alternately, and each figure is the median over rounds: this machine has drifted
by 20 % between processes at 512, more than the gaps being measured.

    python benchmarks/image_latency.py fp32=exports/sd14-fp32 nncf=exports/sd14-nncf \\
        ours=exports/sd14-w8a8 --out benchmarks/results/sd14-image-latency
    python benchmarks/image_latency.py --quick    # CI smoke run on tiny-sd: works, not speed

Prints markdown tables (``benchmarks/readme_table.py RESULTS_JSON`` prints them again);
writes results.json and results.png to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (bars, child_main, command_line, disk_sizes, figure, machine, parse_exports,
                    parse_schedulers, run_child, save_figure, save_results)
from readme_table import markdown

from dq_export.errors import UserError
from dq_export.filesystem import make_folder

DEFAULT_SCHEDULERS = "pndm:50,dpm++:20"  # the papers' PLMS 50 steps, and a fast sampler
DEFAULT_THROUGHPUT = "dpm++:20"
QUICK = {"schedulers": "pndm:2,dpm++:2", "throughput": "dpm++:2", "repeats": 1, "batch": "2"}
QUICK_OUT = Path("outputs/image-latency-quick")
PROMPT = "a photograph of a lighthouse at dusk"
TIMED = ("text_encoder", "unet_loop", "vae_decoder", "total")  # deploy.Pipeline's timings
MEMORY_GOAL = 0.4  # the issue's goal: ours W8A8 peak RSS <= 0.4x FP32's
CACHE_GOAL = {"vs_uncached": 2.0, "vs_fp32": 5.0}  # ours + cache per image, at pndm:50

DURATION = ("Time on 2 cores at full size: sd14 at 512, three exports, one dpm++:20 image "
            "each plus dpm++:4 throughput (--repeats 1 --batch 1 --throughput-scheduler "
            "dpm++:4): about 20 minutes; four exports with pndm:50 as well: about 49 minutes.")


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise UserError(f"--batch {text!r}: give batch sizes >= 1, comma-separated, e.g. 2,4")
    return sorted(set(batches))


def _image(pipe, spec: str, seed: int):
    name, steps = spec.split(":")
    return pipe.generate([PROMPT] * pipe.batch_size, steps=int(steps), scheduler=name,
                         seed=seed)


def _medians(images: list) -> dict:
    """Median milliseconds of each timed component, and of every sampler step."""
    out = {f"{k}_ms": round(1e3 * statistics.median(r.timings[k] for r in images), 2)
           for k in TIMED}
    out["unet_step_ms"] = round(1e3 * statistics.median(s for r in images
                                                        for s in r.step_seconds), 2)
    out["total_ms_all"] = [round(1e3 * r.timings["total"], 2) for r in images]
    out["unet_calls"] = images[0].unet_calls  # full and on cached features (the same each image)
    return out


def _import_runtime(export: str, schedulers: list[str]) -> None:
    """Python's imports (OpenVINO, transformers, the numpy samplers) before any
    clock starts: they are the interpreter's start-up, not the export's load or first image."""
    import openvino  # noqa: F401
    from transformers import CLIPTokenizer  # noqa: F401

    from deploy.schedulers import make_scheduler
    from dq_export.manifest import read_manifest

    config = read_manifest(Path(export), verify=False)["scheduler"]
    for spec in schedulers:
        make_scheduler(spec.split(":")[0], config)


def measure_latency(export: str, label: str, schedulers: list[str], repeats: int,
                    first_image: str, image_size: int | None = None) -> dict:
    """Child: load + compile, the first image (``first_image``'s sampler), then ``repeats``
    images per sampler."""
    from tqdm import tqdm

    from deploy import Pipeline

    _import_runtime(export, schedulers)
    start = time.perf_counter()
    pipe = Pipeline.load(export, verify=False, image_size=_square(image_size))
    load_s = time.perf_counter() - start
    images: dict[str, list] = {spec: [] for spec in schedulers}
    with tqdm(total=1 + repeats * len(schedulers), desc=f"{label}: latency", unit="image",
              file=sys.stderr) as bar:
        first = _image(pipe, first_image, seed=0)
        bar.update()
        for spec in schedulers:
            for i in range(repeats):
                images[spec].append(_image(pipe, spec, seed=1 + i))
                bar.update()
    return {"load_and_compile_s": round(load_s, 3),
            "first_image": {"scheduler": first_image, **_medians([first])},
            "latency": {spec: _medians(runs) for spec, runs in images.items()}}


def measure_throughput(export: str, label: str, batch: int, scheduler: str,
                       repeats: int, image_size: int | None = None) -> dict:
    """Child: images per minute with the UNet's optimal number of requests in flight."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from deploy import Pipeline

    pipe = Pipeline.load(export, batch_size=batch, verify=False, image_size=_square(image_size),
                         ov_config={"PERFORMANCE_HINT": "THROUGHPUT"})
    workers = [pipe] + [pipe.sibling() for _ in range(pipe.optimal_requests - 1)]
    with tqdm(total=len(workers) * batch * (1 + repeats), unit="image", file=sys.stderr,
              desc=f"{label}: throughput, batch {batch} x {len(workers)} requests") as bar:

        def generate(worker, rounds: int) -> None:
            for i in range(rounds):
                _image(worker, scheduler, seed=i)
                bar.update(batch)

        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(generate, workers, [1] * len(workers)))  # every request's first call
            start = time.perf_counter()
            list(pool.map(generate, workers, [repeats] * len(workers)))
            wall = time.perf_counter() - start
    images = len(workers) * batch * repeats
    return {"batch": batch, "requests": len(workers), "scheduler": scheduler, "images": images,
            "wall_s": round(wall, 3), "images_per_min": round(60 * images / wall, 2)}


def _square(size: int | None) -> tuple[int, int] | None:
    return None if size is None else (size, size)


def measure(kind: str, **task) -> dict:
    return {"latency": measure_latency, "throughput": measure_throughput}[kind](**task)


def round_orders(labels: list[str], rounds: int) -> list[list[str]]:
    """The exports' order in each round: as given, then reversed, alternately, so that a
    drift between processes weighs on every export alike over two rounds."""
    return [labels if r % 2 == 0 else labels[::-1] for r in range(rounds)]


def merge_rounds(runs: list):
    """One latency result from several rounds': the median of every number, every list
    joined (each image's total, round after round), anything else as the first round's."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: merge_rounds([r[k] for r in runs]) for k in first}
    if isinstance(first, list):
        return [x for r in runs for x in r]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and len(set(runs)) > 1:
        return round(statistics.median(runs), 3)
    return first  # also a number equal in every round: a count stays an int


def latency_rounds(exports: dict[str, Path], rounds: int, task: dict) -> dict[str, dict]:
    """Each export's latency process ``rounds`` times, in ``round_orders``; merged."""
    runs: dict[str, list] = {label: [] for label in exports}
    for r, order in enumerate(round_orders(list(exports), rounds)):
        for label in order:
            print(f"{label}: {exports[label]}" + (f" (round {r + 1} of {rounds})"
                                                  if rounds > 1 else ""),
                  file=sys.stderr, flush=True)
            runs[label].append(run_child(__file__, {
                "kind": "latency", **task, "export": str(exports[label]), "label": label},
                f"{label} latency"))
    return {label: merge_rounds(results) for label, results in runs.items()}


def benchmark(exports: dict[str, Path], schedulers: list[str], repeats: int,
              batches: list[int], throughput: str, first_image: str,
              image_size: int | None = None, rounds: int = 1) -> dict[str, dict]:
    """The latency processes (``latency_rounds``), then one throughput process per export and
    batch size; at ``image_size`` (None: each export's own)."""
    from dq_export.manifest import read_manifest

    latency = latency_rounds(exports, rounds, {
        "image_size": image_size, "schedulers": schedulers, "repeats": repeats,
        "first_image": first_image})
    rows = {}
    for label, root in exports.items():
        manifest = read_manifest(root, verify=False)
        quantization = manifest.get("quantization", {})
        task = {"export": str(root), "label": label, "image_size": image_size}
        row = {"export": str(root), "model": manifest["model"].get("name") or root.name,
               "init": manifest["model"].get("init"), "bits": manifest["recipe"]["bits"],
               "method": manifest["recipe"]["method"],
               "groups": len(set(quantization["step_to_group"]))
               if "step_to_group" in quantization else None,
               "image_size": image_size or manifest["image"]["height"],
               "exported_size": manifest["image"]["height"],
               "cache": cache_summary(manifest),
               **latency[label],
               "sizes_mb": disk_sizes(root, manifest)}
        row["throughput"] = {str(b): run_child(__file__, {  # none under --no-throughput
            "kind": "throughput", **task, "batch": b, "scheduler": throughput,
            "repeats": repeats}, f"{label} throughput at batch {b}") for b in batches}
        rows[label] = row
    return rows


def cache_summary(manifest: dict) -> dict | None:
    """The feature cache an export runs with by default: its schedule in calibrated steps."""
    if "cache" not in manifest:
        return None
    cache = manifest["cache"]
    return {"branch": cache["branch"], "kind": cache["schedule"]["kind"],
            "full_steps": len(cache["schedule"]["full_steps"]),
            "calibrated_steps": len(cache["timesteps"])}


def _is_ours(row: dict) -> bool:
    return row["method"] == "dq" and row["bits"] not in ("fp32", "fp16")


def ratios(rows: dict[str, dict]) -> dict[str, dict]:
    """Per export: speed-ups (image and UNet loop, per sampler) and throughput and peak RSS
    over the first FP32 export; speed-ups of ours over the first NNCF export; and of an
    export with a feature cache over the uncached export of the same recipe."""
    fp32 = next((label for label, r in rows.items() if r["bits"] == "fp32"), None)
    nncf = next((label for label, r in rows.items() if r["method"] == "nncf"), None)

    def speedups(base: dict, row: dict) -> dict:
        return {spec: {part: round(base["latency"][spec][f"{part}_ms"] / lat[f"{part}_ms"], 3)
                       for part in ("total", "unet_loop")}
                for spec, lat in row["latency"].items()}

    out = {}
    for label, row in rows.items():
        entry = {}
        if fp32 is not None:
            base = rows[fp32]
            entry["speedup_vs_fp32"] = speedups(base, row)
            entry["throughput_vs_fp32"] = {
                b: round(t["images_per_min"] / base["throughput"][b]["images_per_min"], 3)
                for b, t in row["throughput"].items()}
            entry["peak_rss_vs_fp32"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 3)
        if nncf is not None and _is_ours(row):
            entry["speedup_vs_nncf"] = speedups(rows[nncf], row)
        twin = next((other for other, r in rows.items() if row.get("cache") and not r.get("cache")
                     and (r["bits"], r["method"]) == (row["bits"], row["method"])), None)
        if twin is not None:
            entry["speedup_vs_uncached"] = speedups(rows[twin], row)
        out[label] = entry
    return out


def memory_goal(rows: dict[str, dict], ratio: dict[str, dict]) -> dict:
    """Ours at W8A8 against the goal peak RSS <= 0.4x FP32 (needs an FP32 export)."""
    return {label: {"peak_rss_vs_fp32": ratio[label]["peak_rss_vs_fp32"],
                    "met": ratio[label]["peak_rss_vs_fp32"] <= MEMORY_GOAL}
            for label, row in rows.items()
            if _is_ours(row) and row["bits"] == "w8a8" and "peak_rss_vs_fp32" in ratio[label]}


def cache_goal(rows: dict[str, dict], ratio: dict[str, dict]) -> dict:
    """Ours with a feature cache against the goal: per image >= 2x ours uncached and >= 5x
    FP32, for every timed sampler (the goal is set at pndm:50; others are as measured)."""
    out = {}
    for label, row in rows.items():
        entry = ratio[label]
        if not (_is_ours(row) and row.get("cache") and "speedup_vs_uncached" in entry
                and "speedup_vs_fp32" in entry):
            continue
        out[label] = {spec: {"vs_uncached": entry["speedup_vs_uncached"][spec]["total"],
                             "vs_fp32": entry["speedup_vs_fp32"][spec]["total"]}
                      for spec in row["latency"]}
        for figures in out[label].values():
            figures["met"] = all(figures[k] >= v for k, v in CACHE_GOAL.items())
    return out


def chart(results: dict, path: Path) -> None:
    rows = results["exports"]
    labels = list(rows)
    fig, (latency, memory, served) = figure(3, width=4.6)
    names = [f"{label}\n{spec}" for label in labels for spec in results["schedulers"]]
    bottom = [0.0] * len(names)
    for part, color in zip(("text_encoder", "unet_loop", "vae_decoder"),
                           ("#dd8452", "#4c72b0", "#55a868")):
        seconds = [rows[label]["latency"][spec][f"{part}_ms"] / 1e3 for label in labels
                   for spec in results["schedulers"]]
        latency.bar(names, seconds, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom = [b + s for b, s in zip(bottom, seconds)]
    latency.set_title("image latency, s (median)")
    latency.tick_params(axis="x", labelsize=7)
    latency.legend(fontsize=7)
    bars(memory, labels, [rows[label]["peak_rss_mb"] for label in labels], "peak RSS, MB")
    if results["throughput"]["batches"]:
        batch = str(results["throughput"]["batches"][-1])
        bars(served, labels, [rows[label]["throughput"][batch]["images_per_min"]
                              for label in labels],
             f"images/min, batch {batch}, {results['throughput']['scheduler']}")
    else:
        bars(served, labels, [rows[label]["sizes_mb"]["export"] for label in labels],
             "export size on disk, MB")
    save_figure(fig, path, f"{results['model']} {results['image_size']}x{results['image_size']}, "
                f"{results['machine']['cpu']}, {results['machine']['cores']} cores")


def quick_exports(root: Path) -> dict[str, Path]:
    """--quick without exports: tiny-sd with random weights at FP32 and W8A8 (tiny
    calibration), written under ``root``."""
    from dq_export.export import export
    from dq_export.recipe import TINY_CALIBRATION, Recipe

    recipes = {"fp32": Recipe(bits="fp32"), "w8a8": Recipe(bits="w8a8", **TINY_CALIBRATION)}
    for label, recipe in recipes.items():
        print(f"--quick: exporting tiny-sd {label} (random weights)", file=sys.stderr,
              flush=True)
        export("tiny-sd", root / label, recipe, init="random",
               calibration_dir=root / "calibration")
    return {label: root / label for label in recipes}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("exports", nargs="*", help="LABEL=EXPORT_DIR, in the order to run them")
    p.add_argument("--schedulers", help="SAMPLER:STEPS,... timed for latency "
                   f"(default {DEFAULT_SCHEDULERS}; --quick {QUICK['schedulers']})")
    p.add_argument("--repeats", type=int, help="timed images per sampler after the first "
                   f"(default 3; --quick {QUICK['repeats']}); also throughput rounds")
    p.add_argument("--batch", help="prompts per request in the throughput runs, comma-separated"
                   f" (default 4; --quick {QUICK['batch']})")
    p.add_argument("--throughput-scheduler", help="SAMPLER:STEPS of the throughput runs "
                   f"(default {DEFAULT_THROUGHPUT}; --quick {QUICK['throughput']})")
    p.add_argument("--first-image", help="SAMPLER:STEPS of the untimed first image, which "
                   "pays the first calls' allocations (default: the first of --schedulers; a "
                   "short one, e.g. dpm++:2, saves a full-size run's time)")
    p.add_argument("--image-size", type=int, help="generate at this side in pixels instead of "
                   "each export's own (a multiple of 64; the UNet reuses the export's "
                   "calibration there: for speed, not quality)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every export's latency process this many times, in the given "
                        "order and then reversed, alternately, and report medians: a drift of "
                        "the machine between processes then weighs on every export alike "
                        "(default 1)")
    p.add_argument("--no-throughput", action="store_true",
                   help="latency, memory and size only (a full-size throughput run takes long)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 2-step samplers, 1 "
                   "repeat, batch 2; without exports, tiny-sd FP32 and W8A8 made in a temp dir")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/"
                   f"image-latency; --quick {QUICK_OUT}: a smoke run is not a result)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace, command: str) -> int:
    quick = QUICK if args.quick else {}
    schedulers = parse_schedulers(args.schedulers or quick.get("schedulers", DEFAULT_SCHEDULERS))
    first_image, = parse_schedulers(args.first_image) if args.first_image else schedulers[:1]
    throughput, = parse_schedulers(args.throughput_scheduler
                                   or quick.get("throughput", DEFAULT_THROUGHPUT))
    batches = [] if args.no_throughput else parse_batches(args.batch or quick.get("batch", "4"))
    repeats = args.repeats if args.repeats is not None else quick.get("repeats", 3)
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    if args.image_size is not None and (args.image_size < 64 or args.image_size % 64):
        raise UserError(f"--image-size {args.image_size}: give a multiple of 64, e.g. 256")
    if not args.exports and not args.quick:
        raise UserError("give exports as LABEL=DIR, e.g. fp32=exports/sd14-fp32 (or --quick)")
    args.out = args.out or (QUICK_OUT if args.quick else Path("benchmarks/results/image-latency"))
    exports = parse_exports(args.exports) if args.exports else {}  # --quick makes its own
    make_folder(args.out, "--out")  # before the measurements, not after them
    with tempfile.TemporaryDirectory(prefix="dq-bench-quick-") as tmp:
        exports = exports or quick_exports(Path(tmp))
        rows = benchmark(exports, schedulers, repeats, batches, throughput, first_image,
                         args.image_size, args.rounds)
    ratio = ratios(rows)
    first = next(iter(rows.values()))
    results = {"machine": machine(), "model": first["model"],
               "image_size": first["image_size"], "prompt": PROMPT, "schedulers": schedulers,
               "repeats": repeats, "rounds": round_orders(list(rows), args.rounds),
               "throughput": {"scheduler": throughput, "batches": batches,
                              "hint": "THROUGHPUT"},
               "exports": rows, "ratios": ratio,
               "goals": {"memory": {"target_peak_rss_vs_fp32": MEMORY_GOAL,
                                    "exports": memory_goal(rows, ratio)},
                         "cache": {"target": CACHE_GOAL, "exports": cache_goal(rows, ratio)}},
               "command": command}
    print(markdown(results))
    save_results(args.out, results, chart)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_out, measure)
    command = command_line("image_latency.py", argv)
    try:
        return run(args, command)
    except UserError as e:
        print(f"image_latency: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
