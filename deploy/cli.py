"""``dq-generate DIR [--prompt ...]``: images from an export folder, with OpenVINO on the CPU.

Text-to-image exports need ``--prompt``; unconditional ones (DDPM/DDIM, LDM) take none and
draw ``--num-images``. Steps, sampler and eta default to the export's model's."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deploy.schedulers import SCHEDULERS
from dq_export.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dq-generate",
                                description="Generate images from a dq-export folder.")
    p.add_argument("export_dir", type=Path, help="folder written by dq-export")
    p.add_argument("--prompt", action="append", default=None,
                   help="text prompt; repeat for a batch of prompts (text-to-image exports)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=int, default=1,
                   help="images to draw from an unconditional export (one batch)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's: 50 for SD, 100 for ddpm-cifar10, "
                        "200 for ldm-celebahq-256)")
    p.add_argument("--scheduler", default=None,
                   help=f"one of {', '.join(SCHEDULERS)} (default: the model's, pndm for SD, "
                        "ddim for the unconditional models)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (text-to-image; default 7.5)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta: 0 deterministic, 1 as DDPM (default: the model's, 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None,
                   help="feature cache of an export made with dq-export --cache: auto (its "
                        "schedule, the default for such an export), off, or N (a full UNet "
                        "call every N steps, DeepCache's uniform interval)")
    p.add_argument("--out", type=Path, default=Path("outputs/image.png"),
                   help="PNG path; a batch writes NAME-0.png, NAME-1.png, ...")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking file hashes against the manifest (faster start)")
    return p


def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def write_outputs(result, out: Path) -> list[Path]:
    """The PNGs and their JSON summary, each written whole (a reader never finds half a PNG)."""
    from dq_export.filesystem import replacing

    paths = output_paths(out, len(result.images))
    summary = {"images": [str(p) for p in paths], "seed": result.seed,
               "scheduler": result.scheduler, "steps": result.steps,
               "unet_calls": result.unet_calls,
               "seconds": {k: round(v, 3) for k, v in result.timings.items()}}
    try:
        for image, path in zip(result.images, paths):
            with replacing(path) as tmp:
                image.save(tmp, format="PNG")
        with replacing(out.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}): choose another --out") from None
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dq-generate: %(levelname)s: %(message)s")
    if args.out.suffix.lower() != ".png":
        print(f"dq-generate: error: --out {args.out} must end in .png", file=sys.stderr)
        return 2
    try:
        from deploy.feature_cache import parse_cache
        from deploy.pipeline import Pipeline
        from dq_export.filesystem import make_folder

        parse_cache(args.cache)  # a bad value or an unwritable --out fails before the export
        make_folder(args.out.parent, "--out")  # is loaded

        batch = len(args.prompt) if args.prompt else args.num_images
        pipeline = Pipeline.load(args.export_dir, batch_size=max(batch, 1),
                                 verify=not args.no_verify)
        result = pipeline.generate(args.prompt, negative_prompt=args.negative_prompt,
                                   steps=args.steps, scheduler=args.scheduler,
                                   guidance=args.guidance, seed=args.seed, eta=args.eta,
                                   num_images=args.num_images, cache=args.cache, progress=True)
        paths = write_outputs(result, args.out)
    except UserError as e:
        print(f"dq-generate: error: {e}", file=sys.stderr)
        return e.exit_code
    cached = result.unet_calls.get("cached", 0)
    reuse = f", {cached} of them on cached features" if cached else ""
    print(f"wrote {', '.join(map(str, paths))} in {result.timings['total']:.2f} s "
          f"({result.steps} {result.scheduler} steps{reuse})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
