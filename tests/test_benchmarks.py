"""benchmarks/image_latency.py end to end on the session's tiny exports (the --quick
settings), the README tables generated from its JSON, its ratios, and its one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCHEDULERS = ("pndm:2", "dpm++:2")  # --quick's
TIMED = ("text_encoder_ms", "unet_loop_ms", "unet_step_ms", "vae_decoder_ms", "total_ms")


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tiny_export, tiny_w8a8, tmp_path_factory):
    out = tmp_path_factory.mktemp("image-latency")
    done = run_script("image_latency.py", "--quick", f"fp32={tiny_export}",
                      f"ours={tiny_w8a8}", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def test_quick_run_has_every_export_component_and_ratio(quick_run):
    done, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 0
    assert results["schedulers"] == list(SCHEDULERS) and results["repeats"] == 1
    assert set(results["machine"]) >= {"cpu", "cores", "isa", "openvino"}
    assert list(results["exports"]) == ["fp32", "ours"]
    for row in results["exports"].values():
        assert row["load_and_compile_s"] > 0 and row["peak_rss_mb"] > 0
        assert all(row["first_image"][k] > 0 for k in TIMED)
        for spec in SCHEDULERS:
            assert all(row["latency"][spec][k] > 0 for k in TIMED)
        assert set(row["sizes_mb"]) == {"text_encoder", "unet", "vae_decoder", "export"}
        assert row["sizes_mb"]["export"] > sum(row["sizes_mb"][k] for k in
                                               ("text_encoder", "unet", "vae_decoder"))
        throughput = row["throughput"]["2"]
        assert throughput["requests"] >= 1 and throughput["images_per_min"] > 0
        assert throughput["images"] == 2 * throughput["requests"]
    assert results["exports"]["ours"]["sizes_mb"]["unet"] < \
        results["exports"]["fp32"]["sizes_mb"]["unet"]
    # int8 weights: tiny-sd's IR .xml (graph text) is as big as its weights, so compare the .bin
    weights = {label: (Path(row["export"]) / "unet" / "openvino_model.bin").stat().st_size
               for label, row in results["exports"].items()}
    assert weights["ours"] < weights["fp32"] / 3.5
    ratios = results["ratios"]
    assert ratios["fp32"]["speedup_vs_fp32"] == {s: {"total": 1.0, "unet_loop": 1.0}
                                                 for s in SCHEDULERS}
    assert set(ratios["ours"]["speedup_vs_fp32"]) == set(SCHEDULERS)
    assert set(ratios["ours"]["throughput_vs_fp32"]) == {"2"}
    assert ratios["ours"]["peak_rss_vs_fp32"] > 0
    assert "speedup_vs_nncf" not in ratios["ours"]  # no NNCF export in this run
    assert set(results["goals"]["memory"]["exports"]) == {"ours"}


def test_readme_tables_are_generated_from_the_json(quick_run):
    done, out = quick_run
    tables = run_script("readme_table.py", out / "results.json")
    assert tables.returncode == 0, tables.stderr
    assert tables.stdout in done.stdout  # what the run printed, made again from the JSON
    for heading in ("**Image latency, pndm:2**", "**Image latency, dpm++:2**",
                    "**Start-up, memory and size on disk**", "**Throughput**",
                    "Memory goal", "python benchmarks/image_latency.py --quick"):
        assert heading in tables.stdout
    assert tables.stdout.count("| ours |") == 4  # two samplers, memory, throughput


def test_ratios_against_fp32_and_nncf(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from image_latency import memory_goal, ratios

    def row(bits, method, total_ms, unet_ms, rss, per_min):
        return {"bits": bits, "method": method, "peak_rss_mb": rss, "cache": None,
                "latency": {"pndm:50": {"total_ms": total_ms, "unet_loop_ms": unet_ms}},
                "throughput": {"4": {"images_per_min": per_min}}}

    rows = {"fp32": row("fp32", "dq", 8000, 6000, 1000, 2), "nncf": row("w8a8", "nncf", 4000,
                                                                         3000, 500, 4),
            "ours": row("w8a8", "dq", 2000, 1000, 350, 8)}
    out = ratios(rows)
    assert out["ours"]["speedup_vs_fp32"] == {"pndm:50": {"total": 4.0, "unet_loop": 6.0}}
    assert out["ours"]["speedup_vs_nncf"] == {"pndm:50": {"total": 2.0, "unet_loop": 3.0}}
    assert out["ours"]["throughput_vs_fp32"] == {"4": 4.0}
    assert out["ours"]["peak_rss_vs_fp32"] == 0.35
    assert "speedup_vs_nncf" not in out["nncf"] and "speedup_vs_nncf" not in out["fp32"]
    assert memory_goal(rows, out) == {"ours": {"peak_rss_vs_fp32": 0.35, "met": True}}
    del rows["fp32"]
    assert "speedup_vs_fp32" not in ratios(rows)["ours"]  # no FP32 export, no such ratio


def test_cache_goal_needs_both_ratios(monkeypatch):
    """Ours + cache meets the goal only at >= 2x its uncached twin and >= 5x FP32."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from image_latency import cache_goal, ratios

    def row(bits, total_ms, cache=None):
        return {"bits": bits, "method": "dq", "peak_rss_mb": 100, "cache": cache,
                "latency": {"pndm:50": {"total_ms": total_ms, "unet_loop_ms": total_ms}},
                "throughput": {}}

    cache = {"branch": 0, "kind": "dp", "full_steps": 17, "calibrated_steps": 50}
    rows = {"fp32": row("fp32", 10000), "ours": row("w8a8", 4000),
            "ours-cache": row("w8a8", 2000, cache)}
    assert cache_goal(rows, ratios(rows)) == {
        "ours-cache": {"pndm:50": {"vs_uncached": 2.0, "vs_fp32": 5.0, "met": True}}}
    rows["ours-cache"]["latency"]["pndm:50"]["total_ms"] = 2100  # 1.9x and 4.76x: not met
    assert not cache_goal(rows, ratios(rows))["ours-cache"]["pndm:50"]["met"]


def test_rounds_alternate_the_order_and_keep_the_median(monkeypatch):
    """``--rounds 3``: orders a b c, c b a, a b c, one process each, and each export's
    figures are the medians over its rounds, with every image's total kept."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import image_latency

    ran = []

    def child(script, task, what):
        ran.append(task["label"])
        ms = {"a": 100.0, "b": 200.0, "c": 300.0}[task["label"]] + len(ran)  # drifts upward
        return {"load_and_compile_s": 1.0, "peak_rss_mb": ms,
                "latency": {"dpm++:2": {"total_ms": ms, "total_ms_all": [ms],
                                        "unet_calls": {"full": 2, "cached": 0}}}}

    monkeypatch.setattr(image_latency, "run_child", child)
    exports = {label: Path(label) for label in "abc"}
    merged = image_latency.latency_rounds(exports, 3, {"schedulers": ["dpm++:2"]})
    assert ran == list("abccbaabc")
    assert merged["a"]["latency"]["dpm++:2"] == {
        "total_ms": 106.0, "total_ms_all": [101.0, 106.0, 107.0],
        "unet_calls": {"full": 2, "cached": 0}}
    assert merged["c"]["peak_rss_mb"] == 304.0
    assert type(merged["a"]["latency"]["dpm++:2"]["unet_calls"]["full"]) is int
    assert image_latency.round_orders(list("ab"), 1) == [["a", "b"]]
    from readme_table import rounds_note
    assert rounds_note(image_latency.round_orders(list("ab"), 2)) == (
        ", 2 rounds in the orders a, b; b, a, medians over the rounds")
    assert rounds_note([["a", "b"]]) == ""


@pytest.mark.parametrize("args, message", [
    (["fp32=/no/such/folder"], "no such folder"),
    (["fp32={tmp}"], "is not a dq-export folder"),
    (["exports/fp32"], "LABEL=EXPORT_DIR"),
    (["a={tmp}", "a={tmp}"], "given twice"),
    ([], "give exports"),
    (["--quick", "--schedulers", "pndm50"], "NAME:STEPS"),
    (["--quick", "--schedulers", "heun:5"], "unknown scheduler"),
    (["--quick", "--schedulers", "pndm:0"], "STEPS >= 1"),
    (["--quick", "--batch", "two"], "--batch"),
    (["--quick", "--repeats", "0"], "--repeats"),
    (["--quick", "--rounds", "0"], "--rounds"),
    (["--quick", "--image-size", "100"], "multiple of 64"),
])
def test_bad_input_is_one_line_error(tmp_path, args, message):
    done = run_script("image_latency.py", *[a.format(tmp=tmp_path) for a in args],
                      "--out", tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("image_latency: error:")
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


def test_quick_without_exports_makes_its_own(monkeypatch, tmp_path):
    """``image_latency.py --quick`` alone, the README's smoke command, once crashed with
    StopIteration in parse_exports: it must go on to make tiny-sd exports and time them, and
    write under outputs/, not benchmarks/results/ (a smoke run is not a result)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.chdir(tmp_path)
    import image_latency

    made = {"fp32": tmp_path / "fp32", "w8a8": tmp_path / "w8a8"}
    timed = []

    class Timed(Exception):
        pass

    def benchmark(exports, *args):
        timed.append(exports)
        raise Timed

    monkeypatch.setattr(image_latency, "quick_exports", lambda root: made)
    monkeypatch.setattr(image_latency, "benchmark", benchmark)
    args = image_latency.build_parser().parse_args(["--quick"])
    with pytest.raises(Timed):
        image_latency.run(args, "python benchmarks/image_latency.py --quick")
    assert timed == [made]
    assert args.out == Path("outputs/image-latency-quick")


def test_parse_exports_refuses_an_empty_list(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from common import parse_exports

    from dq_export.errors import UserError

    with pytest.raises(UserError, match="LABEL=EXPORT_DIR"):
        parse_exports([])


SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")
TIMED_AT_FULL_SIZE = {"additivity.py", "cache_curve.py", "genai_runtime.py", "image_latency.py",
                      "model_zoo.py", "quality.py", "sd_quality.py", "unet_deployment.py",
                      "unet_profile.py"}  # the measured ones


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_says_what_it_measures(script):
    """--help is instant, exits 0, opens with what the script measures or makes, and says how
    long a full-size run took on 2 cores where that was measured."""
    done = run_script(script, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    description = done.stdout.split("\n\n")[1]
    assert len(description.split()) >= 6, done.stdout[:500]
    assert ("Time on 2 cores" in done.stdout) == (script in TIMED_AT_FULL_SIZE)


def test_readme_table_refuses_other_json(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    for path in (tmp_path / "x.json", tmp_path / "missing.json"):
        done = run_script("readme_table.py", path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_model_zoo_compares_each_export_with_its_torch_model(tiny_export, tiny_w8a8, tmp_path):
    """benchmarks/model_zoo.py: sizes, step time and the deployed UNet against torch, for an
    FP32 export (equal) and a W8A8 one (close, at three calibrated steps)."""
    done = run_script("model_zoo.py", tiny_export, tiny_w8a8, "--calls", 2, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fp32, w8a8 = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert fp32["params"]["unet"] == w8a8["params"]["unet"] > 1e6
    assert w8a8["unet_ir_mb"] < 0.6 * fp32["unet_ir_mb"]  # int8 weights
    assert min(fp32["cosine_vs_torch"]) > 0.99999
    assert len(w8a8["cosine_vs_torch"]) == 3 and 0.99 < min(w8a8["cosine_vs_torch"]) < 0.99999
    assert fp32["step_ms_median"] > 0 and "| tiny-sd | random | w8a8 |" in done.stdout


def test_unet_profile_charges_the_runtime_multipliers_to_ours_only(tiny_export, tiny_w8a8,
                                                                   tmp_path):
    """benchmarks/unet_profile.py: call times in turns, per-kind node times that add up, the
    shared-scale graph's multiplier passes found in ours and not in FP32, a table results_doc renders, and
    a one-line error for bad input."""
    done = run_script("unet_profile.py", f"fp32={tiny_export}", f"ours={tiny_w8a8}",
                      "--calls", 1, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    fp32, ours = results["rows"]["fp32"], results["rows"]["ours"]
    for row in (fp32, ours):
        assert row["call_s"] > 0 and row["node_sum_ms"] > 0
        assert sum(row["by_kind_ms"].values()) == pytest.approx(row["node_sum_ms"],
                                                                abs=0.1 * row["nodes"])
    assert fp32["multiplier_passes_ms"] == 0 < ours["multiplier_passes_ms"] < ours["node_sum_ms"]
    assert "| ours |" in done.stdout and (tmp_path / "results.png").stat().st_size > 1000
    sys.path.insert(0, str(BENCHMARKS))
    from results_doc import kind
    assert kind(results) == "unet_profile"
    bad = run_script("unet_profile.py", f"ours={tiny_w8a8}", "--calls", 0, "--out", tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr == "unet_profile: error: --calls must be at least 1\n"
    assert not (tmp_path / "x").exists()
