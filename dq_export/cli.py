"""``dq-export``: flags -> Recipe -> export. Heavy imports happen inside the command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dq_export.errors import UserError
from dq_export.recipe import BITS, Recipe, parse_bits
from dq_export.registry import REGISTRY


def build_parser() -> argparse.ArgumentParser:
    models = ", ".join(REGISTRY)
    p = argparse.ArgumentParser(
        prog="dq-export",
        description="Export a diffusion model to ONNX and OpenVINO IR, with an export manifest.",
    )
    p.add_argument("--model", default="tiny-sd",
                   help=f"registry name ({models}; default tiny-sd) or local diffusers folder")
    p.add_argument("--bits", default="fp32", help=f"precision recipe: {', '.join(BITS)}")
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="random: the exact architecture with seeded random weights "
                        "(for size, latency and memory work)")
    p.add_argument("--seed", type=int, default=0, help="seed for --init random")
    p.add_argument("--size", type=int, default=None,
                   help="image size in pixels (square, multiple of 8); default: the model's own")
    p.add_argument("--out", type=Path, default=None,
                   help="export folder (default: exports/<model>-<bits>)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(bits=parse_bits(args.bits), image_size=args.size, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dq-export: %(levelname)s: %(message)s")
    try:
        recipe = recipe_from_args(args)
        out = args.out or Path("exports") / f"{Path(args.model).name}-{recipe.bits}"
        from dq_export.export import export

        manifest = export(args.model, out, recipe, init=args.init, force=args.force)
    except UserError as e:
        print(f"dq-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dq-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"exported {args.model} ({recipe.bits}) to {out} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
