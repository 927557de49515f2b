"""Noise-prediction fidelity of fitted W8A8 parameters, in the torch simulation.

For each setting (range estimator, groups, per-step time tables, split shortcut) this fits
parameters from one cached calibration and measures, on every cached UNet input, the
relative error ||eps_q - eps_fp|| / ||eps_fp|| of the fake-quantized UNet against FP32:
the per-step error the rate-distortion paper plots. No export needed, so settings are cheap
to compare; the exported graphs compute the same thing (tests/test_quantized_export.py).

    python benchmarks/fidelity_ablation.py --model tiny-sd --init random --out results/ablation

Prints a table; writes JSON (and the per-step curves) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = [  # (label, estimator, groups, time_tables, split_shortcut)
    ("mse, G=4, tables, split", "mse", 4, True, True),
    ("percentile, G=4, tables, split", "percentile", 4, True, True),
    ("minmax, G=4, tables, split", "minmax", 4, True, True),
    ("mse, G=1, tables, split", "mse", 1, True, True),
    ("mse, G=4, no tables, split", "mse", 4, False, True),
    ("mse, G=4, tables, no split", "mse", 4, True, False),
]


def relative_errors(components, params, calls, splits) -> list[float]:
    """Per-call relative error of the fake-quantized UNet (step index from the timestep)."""
    import torch

    from calibration.fakequant import fake_quantized

    step_of = {t: k for k, t in enumerate(params.timesteps)}
    group_of = params.group_of()
    errors = []
    for call in calls:
        k = step_of[int(round(float(call["timestep"][0])))]
        inputs = [torch.from_numpy(call[n]) for n in ("sample", "timestep",
                                                      "encoder_hidden_states")]
        with torch.no_grad():
            fp = components.unet(*inputs).sample.numpy()
            with fake_quantized(components.unet, params, group_of[k], k, splits):
                q = components.unet(*inputs).sample.numpy()
        errors.append(float(np.linalg.norm(q - fp) / np.linalg.norm(fp)))
    return errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--init", default="random", choices=("pretrained", "random"))
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--calib-prompts", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("results/fidelity_ablation"))
    args = p.parse_args(argv)

    from calibration.collect import CalibrationSettings, collect, load_inputs, read_prompts
    from calibration.fit import fit
    from calibration.layers import shortcut_splits
    from dq_export.loading import load_components

    components = load_components(args.model, args.init, seed=0)
    size = args.size or components.image_size
    settings = CalibrationSettings(steps=args.calib_steps, num_prompts=args.calib_prompts,
                                   batch_size=4)
    stats, summary = collect(components, settings, read_prompts(None), size)
    calls = load_inputs(summary["cache_dir"])
    rows = []
    for label, estimator, groups, tables, split in SETTINGS:
        start = time.perf_counter()
        params = fit(stats, summary["calibrated_timesteps"], groups, "auto", estimator, tables,
                     split)
        errors = relative_errors(components, params, calls,
                                 shortcut_splits(components.unet) if split else {})
        rows.append({"setting": label, "mean_rel_error": float(np.mean(errors)),
                     "max_rel_error": float(np.max(errors)), "per_call": errors,
                     "timesteps": [float(c["timestep"][0]) for c in calls],
                     "seconds": round(time.perf_counter() - start, 1)})
    print(f"{args.model} ({args.init}), {len(calls)} calibration calls, "
          f"{args.calib_steps} PNDM steps, {args.calib_prompts} prompts")
    print(f"{'setting':34s} {'mean rel err':>12s} {'max rel err':>12s}")
    for row in rows:
        print(f"{row['setting']:34s} {row['mean_rel_error']:12.4f} {row['max_rel_error']:12.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity_ablation.json").write_text(json.dumps(
        {"model": args.model, "init": args.init, "calibration": summary, "rows": rows},
        indent=1) + "\n")
    print(f"wrote {args.out / 'fidelity_ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
