"""Per-step noise-prediction error of exported UNets against the FP32 export.

The FP32 export samples each prompt; at every step, each other export's UNet gets the very
same input (x_t, t, embeddings) and its prediction is compared with FP32's:
||eps_q - eps_fp|| / ||eps_fp|| (dq_export.evaluation.fidelity). benchmarks/quality.py adds the
relative MSE, the MSE+SSIM distortion and the image metrics.

    python benchmarks/noise_fidelity.py fp32=exports/tiny-fp32 nncf=exports/tiny-nncf \\
        ours-g4=exports/tiny-g4 --prompts 8 --steps 20 --out benchmarks/results/fidelity

Prints mean and max error per export; writes results.json and results.png (error per step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import machine, save_figure

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "calibration" / "prompts.txt"


def chart(errors: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, e in errors.items():
        ax.plot(e.mean(axis=0), label=f"{label} (mean {e.mean():.4f})")
    ax.set_xlabel("sampler step")
    ax.set_ylabel("relative noise-prediction error vs FP32")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="+",
                   help="LABEL=EXPORT_DIR; the first is the FP32 reference")
    p.add_argument("--prompts", type=int, default=8, help="prompts from --prompt-file (8)")
    p.add_argument("--prompt-file", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="pndm")
    p.add_argument("--seed", type=int, default=1234,
                   help="seeds the initial noise (default differs from calibration's 0)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/noise-fidelity"))
    args = p.parse_args(argv)
    if len(args.exports) < 2 or any("=" not in e for e in args.exports):
        p.error("give at least two exports as LABEL=DIR, the FP32 reference first")
    from calibration.collect import read_prompts
    from deploy import Pipeline
    from dq_export.errors import UserError
    from dq_export.evaluation.fidelity import trajectory_errors

    try:
        # prompts from the end of the file: calibration reads from its start
        prompts = read_prompts(args.prompt_file)[::-1][:args.prompts]
        pipes = {}
        for item in args.exports:
            label, path = item.split("=", 1)
            pipes[label] = Pipeline.load(path, verify=False)
    except UserError as error:
        print(f"noise_fidelity: error: {error}", file=sys.stderr)
        return error.exit_code
    (ref_label, reference), others = next(iter(pipes.items())), dict(list(pipes.items())[1:])
    errors = {label: e["relative_error"] for label, e in trajectory_errors(
        reference, others, prompts, args.steps, args.scheduler, args.seed).items()}
    results = {"machine": machine(), "reference": ref_label, "prompts": prompts,
               "steps": args.steps, "scheduler": args.scheduler, "seed": args.seed,
               "exports": {label: pipes[label].root.as_posix() for label in pipes},
               "mean": {k: round(float(e.mean()), 5) for k, e in errors.items()},
               "max": {k: round(float(e.max()), 5) for k, e in errors.items()},
               "per_step_mean": {k: np.round(e.mean(axis=0), 5).tolist()
                                 for k, e in errors.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(errors, args.out / "results.png", f"noise-prediction error vs {ref_label}, "
          f"{args.prompts} prompts x {args.steps} {args.scheduler} steps")
    print("| export | mean error | max error |\n| --- | --- | --- |")
    for label in others:
        print(f"| {label} | {results['mean'][label]} | {results['max'][label]} |")
    print(f"wrote {args.out / 'results.json'} and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
