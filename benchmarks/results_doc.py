"""docs/results.md and the README's headline table, generated from the committed results
JSON (benchmarks/results/*/results.json and benchmarks/results/*.json), so that no measured
number in the docs is typed by hand.

    python benchmarks/results_doc.py           # rewrite docs/results.md and the README block
    python benchmarks/results_doc.py --check   # exit 1 if either differs from the JSON

One section per results folder, with the machine, ISA, date and commit its JSON records, its
tables (each benchmark's own renderer where it has one), the folder's notes.md and other .md
files verbatim, and links to its figures. A JSON no renderer understands is listed at the
end, never dropped. The README block between ``<!-- results:headline LATENCY QUALITY -->``
and ``<!-- /results:headline -->`` is the headline table: image latency, UNet step, peak RSS
and size from the image_latency folder LATENCY, fidelity from the quality.py folder QUALITY;
point the marker at a new run's folders and run this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
HEADLINE = re.compile(r"(<!-- results:headline (\S+) (\S+) -->\n).*?"
                      r"(<!-- /results:headline -->)", re.S)
KINDS = {  # kind -> the script that writes it
    "image_latency": "image_latency.py", "unet_deployment": "unet_deployment.py",
    "model_zoo": "model_zoo.py", "mixed_form": "mixed_form.py",
    "noise_fidelity": "noise_fidelity.py", "quality": "quality.py",
    "additivity": "additivity.py", "cache_curve": "cache_curve.py", "load_test": "load_test.py",
    "genai_runtime": "genai_runtime.py", "genai_parity": "genai_parity.py",
    "unet_profile": "unet_profile.py"}


def kind(results: dict) -> str | None:
    """Which benchmark wrote this JSON, from its shape (older files carry no name)."""
    rows = results.get("rows")
    first = rows[0] if isinstance(rows, list) and rows else {}
    checks = (("unet_profile", results.get("kind") == "unet_profile"),
              ("image_latency", "ratios" in results and "schedulers" in results),
              ("unet_deployment", isinstance(rows, dict) and "calls" in results),
              ("model_zoo", "step_ms_median" in first), ("mixed_form", "form" in first),
              ("noise_fidelity", "per_step_mean" in results), ("quality", "runs" in results),
              ("additivity", "ratio_joint_to_sum" in results),
              ("cache_curve", "calibrated_steps" in results),
              ("load_test", "levels" in results or "configs" in results),
              ("genai_runtime", "sizes" in results and "scheduler" in results),
              ("genai_parity", "judge_accuracy" in first))
    return next((name for name, hit in checks if hit), None)


def provenance(results: dict) -> str:
    """Machine, ISA, date and commit as the JSON records them."""
    m = results.get("machine") or {}
    cores = m.get("cores", m.get("cpus"))
    where = ", ".join(str(v) for v in (m.get("cpu"), f"{cores} cores" if cores else None) if v)
    isa = ", ".join(m["isa"]) if "isa" in m else None
    openvino = m["openvino"].split("-")[0] if "openvino" in m else None
    facts = (("machine", where or None), ("ISA", isa), ("OpenVINO", openvino),
             ("date", m.get("date")), ("commit", m.get("commit")))
    return "; ".join(f"{name}: {value or 'not recorded'}" for name, value in facts)


def image_latency(results: dict) -> str:
    from readme_table import markdown

    return markdown(results)


def unet_deployment(results: dict) -> str:
    from unet_deployment import table

    goals = ", ".join(f"{k} {v}" for k, v in results["goals"].items())
    return (f"{results['image_size']}x{results['image_size']}, UNet batch "
            f"{results['unet_batch']}, median of {results['calls']} calls after the first:\n\n"
            f"{table(results['rows'])}\n\nGoals: {goals or 'none computed'}.")


def model_zoo(results: dict) -> str:
    from model_zoo import table

    return table(results["rows"])


def mixed_form(results: dict) -> str:
    head = ("layers", "form", "call ms, int8 group", "call ms, float group", "RSS added MB",
            "OpenVINO vs ONNX Runtime", "kernels (exec type)")
    rows = [(r["kind"], r["form"], r["ms"], r["ms_float_group"], r["rss_added_mb"],
             r["openvino_vs_onnxruntime"], ", ".join(r["kernels"])) for r in results["rows"]]
    widths = ", ".join(f"{kind} {width} wide" for kind, width in results["widths"].items())
    return (f"{results['depth']} layers per stack ({widths}), {results['calls']} calls:\n\n"
            + markdown_table(head, rows))


def noise_fidelity(results: dict) -> str:
    head = ("export", f"mean error vs {results['reference']}", "max error")
    rows = [(label, results["mean"][label], results["max"][label]) for label in results["mean"]]
    return (f"{len(results['prompts'])} prompts x {results['steps']} {results['scheduler']} "
            f"steps, seed {results['seed']}; error ||eps - eps_ref|| / ||eps_ref|| per UNet "
            "call:\n\n" + markdown_table(head, rows))


def quality(results: dict) -> str:
    from quality import fmt, table

    parts = []
    for run in results["runs"]:
        parts.append(f"**{run['scheduler']}, {run['steps']} steps** ({results['seeds']} seeds "
                     f"x 10 digits; per-step columns: {results['fidelity_seeds']} seeds):\n\n"
                     + table(run))
        parts += [f"PSNR {pair.replace(':', ' - ')}: {fmt(estimate, 2)} dB"
                  for pair, estimate in run.get("paired_psnr", {}).items()]
    return "\n\n".join(parts)


def additivity(results: dict) -> str:
    ratio = results["ratio_joint_to_sum"]
    size = results["image_size"]
    summary = markdown_table(
        ("model", "points", "joint / sum, median [p10, p90]", "correlation of logs"),
        [(f"{results['model']} ({results['init']}, {size}x{size})", len(results["points"]),
          f"{ratio['median']:.2f} [{ratio['p10']:.2f}, {ratio['p90']:.2f}]",
          f"{results['log_correlation']:.4f}")])
    uniform = markdown_table(
        ("uniform recipe", "group", "joint", "sum of singles"),
        [(p["config"], p["group"], f"{p['joint']:.2e}", f"{p['sum_of_singles']:.2e}")
         for p in results["points"] if p["uniform"]])
    allocation = results["allocation"]
    slowest = max(b["seconds"] for b in allocation["budgets"])
    return (f"{summary}\n\n{uniform}\n\nSlope search: {allocation['layers']} layers, "
            f"{allocation['candidates_per_layer']} candidates each; table "
            f"{allocation['table_seconds']} s, at most {slowest} s per budget over "
            f"{len(allocation['budgets'])} budgets. Curves took {results['curves_seconds']} s.")


def cache_curve(results: dict) -> str:
    from cache_curve import table

    return (f"{results['scheduler']} {results['steps']} steps, {results['seeds']} seeds x 10 "
            "digits, PSNR against the FP32 export's uncached image:\n\n" + table(results))


def load_test(results: dict) -> str:
    if "configs" in results:  # one server per --workers setting
        from load_test import table

        body = results["body"]
        return (f"dq-serve {results['model']} {results['bits']} {results['size']}, POST "
                f"{results['endpoint']}, {body['steps']} {body['scheduler']} steps, "
                f"{results['requests_per_level']} requests per level, one image each:\n\n"
                + table(results))
    server = results["server"]
    head = ("clients", "ok / sent", "req/s", "p50 ms", "p90 ms", "p99 ms", "server step ms")

    def ms(seconds):
        return "-" if seconds is None else f"{seconds * 1000:.0f}"

    rows = [(r["concurrency"], f"{r['ok']} / {r['sent']}", f"{r['requests_per_s']:.2f}",
             ms(r["p50_s"]), ms(r["p90_s"]), ms(r["p99_s"]),
             f"{r['server_step_mean_s'] * 1000:.1f}") for r in results["levels"]]
    body = results["body"]
    return (f"dq-serve {server['model']} {server['bits']} {server['size']}, POST "
            f"{results['endpoint']}, {body['steps']} {body['scheduler']} steps, "
            f"{results['requests_per_level']} requests per level:\n\n"
            + markdown_table(head, rows))


def genai_runtime(results: dict) -> str:
    from genai_runtime import table

    return (f"{results['export']}, {results['scheduler']}, {results['repeats']} timed image(s) "
            "per runtime and size, static shapes, LATENCY hint:\n\n" + table(results))


def genai_parity(results: dict) -> str:
    from genai_parity import table

    return (f"trained tiny-sd, digits 0-9, {results['steps']} steps, guidance "
            f"{results['guidance']}, seed {results['seed']}, one prompt per call:\n\n"
            + table(results))


def unet_profile(results: dict) -> str:
    from unet_profile import table

    return (f"{results['image']}, {results['calls']} profiled calls per export in turns; "
            "medians of the call and of each node (OpenVINO PERF_COUNT):\n\n" + table(results))


RENDERERS = {"unet_profile": unet_profile, "image_latency": image_latency,
             "unet_deployment": unet_deployment, "model_zoo": model_zoo, "mixed_form": mixed_form,
             "noise_fidelity": noise_fidelity, "quality": quality, "additivity": additivity,
             "cache_curve": cache_curve, "load_test": load_test, "genai_runtime": genai_runtime,
             "genai_parity": genai_parity}


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def result_files(results_dir: Path) -> list[Path]:
    return sorted([*results_dir.glob("*/results.json"), *results_dir.glob("*.json")])


def name_of(path: Path) -> str:
    return path.parent.name if path.name == "results.json" else path.stem


def section(path: Path, results_dir: Path) -> tuple[str | None, str | None]:
    """(markdown section, None), or (None, why it cannot be rendered)."""
    try:
        results = json.loads(path.read_text())
        which = kind(results)
        if which is None:
            return None, "no renderer knows this JSON's shape"
        tables = RENDERERS[which](results)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return None, f"{type(e).__name__}: {e}"
    if "command" in results and which != "image_latency":  # readme_table prints its own
        tables += f"\n\nReproduce:\n\n```sh\n{results['command']}\n```"
    parts = [f"## {name_of(path)}", f"`benchmarks/{KINDS[which]}`; {provenance(results)}.",
             tables]
    if path.name == "results.json":
        notes = sorted(path.parent.glob("*.md"), key=lambda p: (p.name != "notes.md", p.name))
        parts += [p.read_text().strip() for p in notes]
        figures = sorted(path.parent.glob("*.png"))
        if figures:
            rel = path.parent.relative_to(results_dir.parents[1]).as_posix()
            parts.append("Figures: " + ", ".join(f"[{p.name}](../{rel}/{p.name})"
                                                 for p in figures) + ".")
    return "\n\n".join(parts), None


def results_doc(results_dir: Path = RESULTS) -> str:
    sections, skipped = [], []
    for path in result_files(results_dir):
        text, why = section(path, results_dir)
        if text:
            sections.append(text)
        else:
            skipped.append(f"- `{path.relative_to(results_dir.parents[1]).as_posix()}`: {why}")
    names = [text.splitlines()[0][3:] for text in sections]
    index = [f"- [{name}](#{anchor(name)})" for name in names]
    head = ("# Results\n\n<!-- generated by benchmarks/results_doc.py from benchmarks/results/: "
            "do not edit; edit a folder's notes.md or rerun its benchmark, then run "
            "`python benchmarks/results_doc.py` -->\n\nEvery table below is made from a "
            "results JSON committed under `benchmarks/results/`, by the script that wrote it "
            "where it has a renderer. Each states the machine it ran on: compare figures "
            "within one table, not across tables. How to run and read each benchmark: "
            "[benchmarks.md](benchmarks.md).")
    tail = "## Not rendered\n\n" + ("\n".join(skipped) if skipped else "None: every JSON above.")
    return "\n\n".join([head, "\n".join(index), *sections, tail]) + "\n"


def headline(latency_dir: str, quality_dir: str, results_dir: Path = RESULTS) -> str:
    """The README's one table: the image_latency run's first sampler, and the quality run's
    first scheduler, joined by export label."""
    lat = json.loads((results_dir / latency_dir / "results.json").read_text())
    qual = json.loads((results_dir / quality_dir / "results.json").read_text())
    if kind(lat) != "image_latency" or kind(qual) != "quality":
        raise ValueError(f"headline: {latency_dir} must be an image_latency.py result and "
                         f"{quality_dir} a quality.py one")
    spec, run = lat["schedulers"][0], qual["runs"][0]
    size = lat["image_size"]
    head = ("export", "image s", "UNet step ms", "peak RSS MB", "export MB", "speed-up vs FP32",
            "vs NNCF", "PSNR vs FP32 dB", "digits FID - FP32 [95% CI]")
    rows = []
    for label, row in lat["exports"].items():
        speedup = lat["ratios"][label].get("speedup_vs_fp32")
        vs_nncf = lat["ratios"][label].get("speedup_vs_nncf")
        fidelity = run["exports"].get(label, {})
        fid = fidelity.get("digits_fid_delta")
        rows.append((label, f"{row['latency'][spec]['total_ms'] / 1e3:.1f}",
                     f"{row['latency'][spec]['unet_step_ms']:.0f}", f"{row['peak_rss_mb']:.0f}",
                     f"{row['sizes_mb']['export']:.0f}",
                     f"{speedup[spec]['total']:.2f}x" if speedup else "-",
                     f"{vs_nncf[spec]['total']:.2f}x" if vs_nncf else "-",
                     f"{fidelity['psnr']:.1f}" if "psnr" in fidelity else "-",
                     f"{fid['value']:.1f} [{fid['ci'][0]:.1f}, {fid['ci'][1]:.1f}]" if fid
                     else "-"))
    inits = {row.get("init") for row in lat["exports"].values()} - {None}
    weights = f" ({', '.join(sorted(inits))} weights)" if inits else ""
    return (f"{lat['model']}{weights} at {size}x{size}, one {spec} image with guidance; "
            f"fidelity on the trained tiny-sd reference model ({run['scheduler']} "
            f"{run['steps']}, {qual['seeds']} seeds x 10 digits), each image against FP32's "
            f"of the same seed.\n\n{markdown_table(head, rows)}\n\n"
            f"Latency: [{latency_dir}](docs/results.md#{anchor(latency_dir)}): "
            f"{provenance(lat)}. Fidelity: [{quality_dir}](docs/results.md#"
            f"{anchor(quality_dir)}): {provenance(qual)}.\n")


def readme_with_headline(readme: str, results_dir: Path = RESULTS) -> str:
    match = HEADLINE.search(readme)
    if not match:
        raise ValueError("README.md has no <!-- results:headline LATENCY QUALITY --> block")
    block = match.group(1) + headline(match.group(2), match.group(3), results_dir) \
        + match.group(4)
    return readme[:match.start()] + block + readme[match.end():]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if docs/results.md or the README block differ")
    args = p.parse_args(argv)
    try:
        wanted = {DOC: results_doc(), README: readme_with_headline(README.read_text())}
    except (OSError, ValueError, KeyError) as e:
        print(f"results_doc: error: {e}", file=sys.stderr)
        return 2
    stale = [path for path, text in wanted.items()
             if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"results_doc: {path.relative_to(ROOT)} is out of date: run python "
                  "benchmarks/results_doc.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
