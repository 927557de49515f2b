"""What the side-by-side benchmark scripts share: reading ``LABEL=DIR`` arguments, one fresh
child process per measurement (so a peak RSS is that measurement's alone), the machine
line every result carries, markdown tables and bar charts.

The scripts run as files (``python benchmarks/X.py``), so they import this as ``common``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from dq_export.errors import UserError
from dq_export.manifest import ir_files

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
COLORS = ("#888888", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def parse_exports(items: list[str]) -> dict[str, Path]:
    """``LABEL=EXPORT_DIR`` arguments -> {label: folder}, each checked to be an export, all
    of one model at one image size (ratios between others mean nothing), a text-to-image one
    (these scripts draw prompts; benchmarks/model_zoo.py measures unconditional models)."""
    from dq_export.manifest import read_manifest

    if not items:
        raise UserError("give exports as LABEL=EXPORT_DIR, e.g. fp32=exports/sd14-fp32")
    exports: dict[str, Path] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path or "/" in label or label.startswith("."):
            raise UserError(f"{item!r}: give exports as LABEL=EXPORT_DIR, e.g. "
                            "fp32=exports/sd14-fp32 (a label is a plain folder name)")
        if label in exports:
            raise UserError(f"label {label!r} is given twice: give each export its own label")
        exports[label] = Path(path)
    manifests = {}
    for label, path in exports.items():
        if not path.is_dir():
            raise UserError(f"{path}: no such folder (label {label})")
        manifests[label] = read_manifest(path, verify=False)  # one-line error if no export
        if "text_encoder" not in manifests[label]["components"]:
            raise UserError(f"{path} is an unconditional export and this benchmark draws "
                            "prompts: measure it with benchmarks/model_zoo.py")
    first, manifest = next(iter(manifests.items()))
    for label, other in manifests.items():
        for key in ("model", "image"):
            if other[key] != manifest[key]:
                raise UserError(f"{label} and {first} differ in {key} ({_describe(other)} vs "
                                f"{_describe(manifest)}): compare exports of one model at one size")
    return exports


def _describe(manifest: dict) -> str:
    model, image = manifest["model"], manifest["image"]
    return (f"{model.get('name')} {model.get('init')} weights at "
            f"{image['height']}x{image['width']}")


def disk_sizes(root: Path, manifest: dict) -> dict[str, float]:
    """MB (10^6 bytes) on disk: each component's OpenVINO IR (.xml + .bin) and the whole
    export folder."""
    def mb(paths) -> float:
        return round(sum(p.stat().st_size for p in paths) / 1e6, 2)

    sizes = {}
    for name, entry in manifest["components"].items():
        sizes[name] = mb(ir_files(root, entry))
    sizes["export"] = mb(p for p in root.rglob("*") if p.is_file())
    return sizes


def parse_schedulers(text: str) -> list[str]:
    """``pndm:50,dpm++:20`` -> ``["pndm:50", "dpm++:20"]`` with canonical sampler names."""
    from deploy.schedulers import scheduler_name

    specs = []
    for item in text.split(","):
        name, sep, steps = item.strip().partition(":")
        if not sep or not steps.isdigit() or int(steps) < 1:
            raise UserError(f"scheduler spec {item.strip()!r}: use NAME:STEPS with STEPS >= 1, "
                            "e.g. pndm:50,dpm++:20")
        spec = f"{scheduler_name(name)}:{int(steps)}"
        if spec in specs:
            raise UserError(f"scheduler {spec} is given twice")
        specs.append(spec)
    return specs


def run_child(script: str, task: dict, what: str) -> dict:
    """Run ``script --child TASK --child-out FILE`` in a fresh process and return what it
    wrote there. Its stderr (progress, errors) goes straight to ours."""
    with tempfile.TemporaryDirectory(prefix="dq-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, script, "--child", json.dumps(task), "--child-out", str(out)]
        code = subprocess.run(command).returncode
        if code != 0 or not out.is_file():
            raise UserError(f"{what}: the benchmark process failed (exit {code}); its "
                            "messages are above")
        return json.loads(out.read_text())


def child_main(task: str, out: Path, measure) -> int:
    """The child's side of ``run_child``: ``measure(**task)`` plus this process's peak RSS."""
    from dq_export.export import peak_rss_mb

    try:
        result = measure(**json.loads(task))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    result["peak_rss_mb"] = peak_rss_mb()
    out.write_text(json.dumps(result))
    return 0


def machine() -> dict:
    """What the numbers were measured on (CPU, cores, the ISA flags int8 speed depends on),
    when, and with which code: docs/results.md states all of it beside each table."""
    import openvino as ov

    from dq_export.openvino_ir.cpu_isa import cpu_flags
    from dq_export.openvino_ir.target_cpu import cpu_description

    flags = cpu_flags()
    return {"cpu": cpu_description()["device"], "cores": len(os.sched_getaffinity(0)),
            "isa": [f for f in ISA_FLAGS if f in flags],
            "openvino": ov.get_version(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit()}


def git_commit() -> str | None:
    """This checkout's commit, with ``-dirty`` when tracked files differ from it; None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD"],
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run, as recorded in its results.json."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None
                                                          else argv)])


def save_results(out: Path, results: dict, chart) -> None:
    """``out``/results.json and ``chart(results, out/results.png)``, the pair every
    benchmark leaves."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out / "results.png")
    print(f"wrote {out / 'results.json'} and results.png")


def markdown_table(head: tuple | list, rows: list) -> str:
    lines = [head, ["---"] * len(head), *rows]
    return "\n".join("| " + " | ".join(str(v) for v in line) + " |" for line in lines)


def bars(ax, labels: list[str], values: list[float], title: str) -> None:
    """One bar per label with its value written on top."""
    ax.bar(labels, values, color=[COLORS[i % len(COLORS)] for i in range(len(labels))])
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=8)


def figure(columns: int, width: float = 4.0):
    """A row of ``columns`` matplotlib axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width * columns, 3.8))


def save_figure(fig, path: Path, title: str | None = None, **title_style) -> None:
    """A chart's ending: its title, a tight layout, the PNG, and the figure freed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, **title_style)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
