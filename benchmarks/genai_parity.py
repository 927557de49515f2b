"""GenAI's Text2ImagePipeline against dq-export's runtime on the trained tiny-sd: both draw
"a handwritten digit D" for D = 0..9 with the same scheduler, steps, guidance and seed; the
PSNR of each image pair, and the judge's accuracy on each runtime's digits.

One prompt per call in both runtimes (GenAI's TorchGenerator(seed) and ours draw the same
initial noise for one image), GenAI compiled as a user would (dynamic shapes), ours without
the feature cache, which GenAI does not run.

    python benchmarks/genai_parity.py fp32=exports/t-fp32 w8a8=exports/t-w8a8 \\
        --out benchmarks/results/tiny-sd-genai-parity

Writes results.json and results.png (one row of digits per runtime, export and scheduler) to
--out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from common import command_line, machine, markdown_table, parse_exports

from dq_export.errors import UserError

DIGITS = range(10)


def draw(export: Path, scheduler: str, steps: int, seed: int) -> tuple[list, list]:
    """(ours, GenAI's) images of every digit, uint8 HWC arrays."""
    import openvino_genai as og

    from deploy import Pipeline
    from deploy.genai import genai_pipeline
    from dq_export.evaluation.reference.digits import CANONICAL

    ours, genai = Pipeline.load(export, verify=False), genai_pipeline(export, scheduler)
    prompts = [CANONICAL.format(d=d) for d in DIGITS]
    a = [np.asarray(ours.generate(p, steps=steps, scheduler=scheduler, seed=seed,
                                  cache="off").images[0]) for p in prompts]
    # np.array copies: GenAI's result aliases its pipeline's output buffer, which the next
    # generate() overwrites
    b = [np.array(genai.generate(p, num_inference_steps=steps, guidance_scale=7.5,
                                 generator=og.TorchGenerator(seed)).data[0]) for p in prompts]
    return a, b


def compare(a: list, b: list) -> dict:
    from PIL import Image

    from dq_export.evaluation.image_metrics import psnr
    from dq_export.evaluation.reference import judge

    def accuracy(images):
        predicted, _ = judge.classify([Image.fromarray(x) for x in images])
        return float(np.mean(predicted == np.arange(10))), predicted.tolist()

    pair = [psnr(x, y) for x, y in zip(a, b)]
    (ours_acc, ours_pred), (genai_acc, genai_pred) = accuracy(a), accuracy(b)
    return {"psnr_median": round(statistics.median(pair), 2), "psnr_min": round(min(pair), 2),
            "max_abs_levels": int(max(np.abs(x.astype(int) - y).max() for x, y in zip(a, b))),
            "judge_accuracy": {"ours": ours_acc, "genai": genai_acc},
            "predicted": {"ours": ours_pred, "genai": genai_pred}}


def labelled(label: str, images: list, scale: int = 2):
    """One row of digits, enlarged, with ``label`` in a margin on its left."""
    from PIL import Image, ImageDraw

    from dq_export.evaluation.reference.evaluate import grid

    row = grid([Image.fromarray(x) for x in images])
    row = row.resize((row.width * scale, row.height * scale), Image.NEAREST)
    sheet = Image.new("RGB", (row.width + 150, row.height), "white")
    sheet.paste(row, (150, 0))
    ImageDraw.Draw(sheet).text((6, row.height // 2 - 6), label, fill="black")
    return sheet


def table(results: dict) -> str:
    head = ("export", "scheduler", "PSNR GenAI vs ours, dB (median)", "min", "max abs diff, levels",
            "judge accuracy ours", "judge accuracy GenAI")
    return markdown_table(head, [(r["export"], r["scheduler"], r["psnr_median"], r["psnr_min"],
                                  r["max_abs_levels"], r["judge_accuracy"]["ours"],
                                  r["judge_accuracy"]["genai"]) for r in results["rows"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="*", help="LABEL=EXPORT_DIR of trained tiny-sd exports")
    p.add_argument("--schedulers", default="pndm,ddim,euler",
                   help="samplers both runtimes have, comma-separated (pndm,ddim,euler)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tiny-sd-genai-parity"))
    args = p.parse_args(argv)
    try:
        from dq_export.evaluation.reference.evaluate import grid

        exports = parse_exports(args.exports)
        schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
        if args.steps < 1 or not schedulers:
            raise UserError("give --steps >= 1 and at least one scheduler")
        args.out.mkdir(parents=True, exist_ok=True)
        results = {"machine": machine(), "steps": args.steps, "seed": args.seed,
                   "guidance": 7.5, "rows": [],
                   "command": command_line("genai_parity.py", argv)}
        sheets = []
        for scheduler in schedulers:
            for label, export in exports.items():
                a, b = draw(export, scheduler, args.steps, args.seed)
                row = {"export": label, "scheduler": scheduler, **compare(a, b)}
                results["rows"].append(row)
                sheets += [labelled(f"{scheduler} {label} {runtime}", images)
                           for runtime, images in (("ours", a), ("GenAI", b))]
                print(f"{scheduler} {label}: {row['psnr_median']} dB, judge ours "
                      f"{row['judge_accuracy']['ours']} GenAI {row['judge_accuracy']['genai']}",
                      file=sys.stderr, flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    grid(sheets, columns=1).save(args.out / "results.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
