"""Each model's export beside its torch model: parameters, FP32 vs export size, the deployed
UNet's time per step at the export's size, and one UNet step against torch.

The table every registry architecture gets: does its export run, how big, how fast, and does
the deployed UNet compute what torch computes? The torch model is rebuilt from the manifest
(registry name or folder, ``--init`` and seed), so ``--init random`` exports compare exactly.
Inputs are real trajectory inputs from the export's calibration cache at its first, middle and
last calibrated step (FP32 exports: a seeded random input at t = 999), each one sampler step
of one image: batch 2 (guided) for text-to-image, batch 1 for an unconditional model.

    python benchmarks/model_zoo.py E/sd14-w8a8 E/sd21-base-w8a8 --out benchmarks/results/model-zoo
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import disk_sizes, machine, markdown_table
from dq_export.errors import UserError


DURATION = ("Time on 2 cores at full size: an sd14 FP32 and W8A8 pair at 512 with --calls 5: "
            "about 5 minutes.")


def measure(export: Path, calls: int) -> dict:
    import torch

    from calibration.collect import load_inputs
    from deploy import Pipeline
    from dq_export.loading import load_components
    from dq_export.manifest import read_manifest
    from dq_export.graph.onnx_export import unet_example, unet_input_names

    manifest = read_manifest(export, verify=False)
    source = manifest["model"]
    model = source["path"] if source["kind"] == "folder" else source["name"]
    components = load_components(model, source["init"], source.get("seed") or 0)
    unet, names = components.unet, unet_input_names(components)
    params = {name: sum(p.numel() for p in module.parameters())
              for name, module in components.modules().items()}
    cache = manifest.get("quantization", {}).get("calibration", {}) or {}
    if cache.get("cache_dir"):
        probes = [one_image(call, components.conditional)
                  for call in first_middle_last(load_inputs(Path(cache["cache_dir"])))]
    else:
        latent = manifest["image"]["height"] // manifest["image"]["vae_scale_factor"]
        torch.manual_seed(0)
        probes = [{name: t.numpy() for name, t in zip(names, unet_example(components, latent))}]
    pipe = Pipeline.load(export, verify=False)
    cosines = []
    for probe in probes:
        with torch.no_grad():
            expected = unet(*(torch.from_numpy(probe[k]) for k in names)).sample.numpy()
        got = pipe.predict_noise(probe["sample"], float(probe["timestep"][0]),
                                 probe.get("encoder_hidden_states"))
        cosines.append(float(got.ravel() @ expected.ravel()
                             / (np.linalg.norm(got) * np.linalg.norm(expected))))
    del components, unet
    gc.collect()
    probe = probes[len(probes) // 2]
    seconds = []
    for _ in range(calls + 1):  # the first call is warm-up
        start = time.perf_counter()
        pipe.predict_noise(probe["sample"], float(probe["timestep"][0]),
                           probe.get("encoder_hidden_states"))
        seconds.append(time.perf_counter() - start)
    sizes = disk_sizes(export, manifest)
    return {
        "export": str(export), "model": model,
        "init": source["init"], "bits": manifest["recipe"]["bits"],
        "size": manifest["image"]["height"], "params": params,
        "unet_fp32_mb": round(params["unet"] * 4 / 1e6, 1), "unet_ir_mb": sizes["unet"],
        "export_mb": sizes["export"],
        "unet_batch": len(probe["sample"]),
        "step_ms_median": round(1e3 * statistics.median(seconds[1:]), 1),
        "timesteps": [float(p["timestep"][0]) for p in probes],
        "cosine_vs_torch": [round(c, 6) for c in cosines],
    }


def first_middle_last(calls: list[dict]) -> list[dict]:
    """The first recorded call at the first, middle and last calibrated timestep (sampling
    runs from high t to low; a cache holds every batch's trajectory one after the other)."""
    steps = sorted({float(c["timestep"][0]) for c in calls}, reverse=True)
    wanted = (steps[0], steps[len(steps) // 2], steps[-1])
    return [next(c for c in calls if float(c["timestep"][0]) == t) for t in wanted]


def one_image(call: dict, conditional: bool) -> dict:
    """One image's rows of a cached batch: its unconditional and conditional rows (the
    [uncond; cond] halves of a guided batch), or its one row."""
    half = len(call["sample"]) // 2
    rows = [0, half] if conditional else [0]
    return {name: value[rows] for name, value in call.items()}


def millions(params: dict, name: str) -> str:
    return f"{params[name] / 1e6:.1f}" if name in params else "-"


def table(rows: list[dict]) -> str:
    header = ("model", "init", "bits", "size", "UNet params M", "text enc params M",
              "autoencoder params M", "UNet FP32 MB", "UNet IR MB", "export MB",
              "UNet step ms (batch)", "cosine vs torch (first / mid / last step)")
    lines = [(r["model"], r["init"], r["bits"], r["size"], millions(r["params"], "unet"),
              millions(r["params"], "text_encoder"), millions(r["params"], "vae"),
              r["unet_fp32_mb"], r["unet_ir_mb"],
              r["export_mb"], f"{r['step_ms_median']} ({r['unet_batch']})",
              " / ".join(f"{c:.4f}" for c in r["cosine_vs_torch"])) for r in rows]
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DURATION)
    p.add_argument("exports", nargs="+", type=Path, help="export folders, one per model")
    p.add_argument("--calls", type=int, default=5, help="timed UNet calls after a warm-up")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/model-zoo"))
    args = p.parse_args(argv)
    try:
        if args.calls < 1:
            raise UserError(f"--calls must be at least 1, got {args.calls}")
        rows = []
        for export in args.exports:
            print(f"{export} ...", file=sys.stderr, flush=True)
            rows.append(measure(export, args.calls))
    except UserError as e:
        print(f"model_zoo: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/model_zoo.py", *(argv or sys.argv[1:])])
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine(), "rows": rows, "command": command}, indent=1) + "\n")
    print(table(rows))
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
