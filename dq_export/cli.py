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
    d = Recipe()
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
    p.add_argument("--genai", action=argparse.BooleanOptionalAction, default=None,
                   help="also lay the export out as optimum-intel does, for OpenVINO GenAI's "
                        "Text2ImagePipeline and OVMS (default: for every text-to-image model)")
    q = p.add_argument_group("quantization (w8a8 and other integer recipes)")
    q.add_argument("--method", default=d.method,
                   help="dq: timestep-aware (this project); nncf: OpenVINO's own W8A8 baseline")
    q.add_argument("--groups", type=int, default=d.groups,
                   help=f"timestep groups with their own activation scales (default {d.groups})")
    q.add_argument("--group-split", default=d.group_split,
                   help="uniform, or auto: boundaries from per-step statistics (default auto)")
    q.add_argument("--estimator", default=d.estimator,
                   help="activation range estimator: minmax, percentile, mse (default mse)")
    q.add_argument("--no-time-tables", dest="time_tables", action="store_false",
                   help="one scale per group on the time-embedding path, not one per step")
    q.add_argument("--no-split-shortcut", dest="split_shortcut", action="store_false",
                   help="one scale for each skip concatenation instead of one per half")
    q.add_argument("--symmetric-activations", dest="asymmetric_activations",
                   action="store_false",
                   help="symmetric int8 for signed layer inputs (default: uint8 with a zero "
                        "point, all 256 levels on lopsided inputs such as SiLU's)")
    q.add_argument("--attention", default=d.attention,
                   help="what of attention's Q.K^T and A.V runs in int8: float (none of it; "
                        "OpenVINO then fuses them with the softmax into one kernel, the fastest "
                        "form measured here), qkv (q, k, v; softmax output float, as "
                        "Q-Diffusion), int8 (also the softmax output, uint8) "
                        f"(default {d.attention})")
    q.add_argument("--target-cpu", default=d.target_cpu,
                   help="auto: profile every layer on this CPU with OpenVINO and keep the "
                        "input in float where int8 is not faster; none: int8 everywhere "
                        "(default none)")
    q.add_argument("--form", default=d.form,
                   help="auto: time the UNet with each other attention form, zero points off "
                        "and the split shortcut off, each alone, on this CPU at the export's "
                        "size, and keep the fastest whose error on calibration inputs is within 10%% of "
                        "the flags' form (minutes at 512); flags: the form the flags give "
                        "(default flags)")
    q.add_argument("--budget", action="append", default=None,
                   help="mixed precision by rate-distortion allocation: size=700MB (UNet "
                        "weights), latency=0.8x (step time vs all-int8 on this CPU), or both; "
                        "needs --bits w8a8")
    q.add_argument("--weight-range", default=d.weight_range,
                   help="int8 weights in full (8 bits) or half (7 bits: exact on CPUs without "
                        "VNNI, whose int8 kernels saturate); auto: half where the exporting CPU "
                        "lacks VNNI (default auto)")
    q.add_argument("--vae", default=d.vae,
                   help="int8: the VAE decoder in W8A8 (int8 weights and activations), "
                        "calibrated on the final latents of the calibration trajectories; "
                        "needs --bits w8a8 or w4a8. fp32: as the model (default: int8 for "
                        "text-to-image models at w8a8 or w4a8 with --method dq, else fp32)")
    q.add_argument("--text-encoder-weights", default=None,
                   help="int8: weight-only int8 text encoder (OpenVINO IR); fp32: as the model "
                        "(default: int8 for integer --bits, fp32 otherwise)")
    k = p.add_argument_group("feature cache (DeepCache: reuse deep UNet features between steps)")
    k.add_argument("--cache", action="store_true",
                   help="also export a shallow UNet that reuses the full UNet's deep feature, "
                        "and a schedule of the steps that run in full")
    k.add_argument("--cache-steps", type=int, default=None,
                   help="K: calibrated steps that run the full UNet, chosen by dynamic "
                        "programming on the calibration trajectories (implies --cache; "
                        "default: about a third of the steps)")
    k.add_argument("--cache-interval", type=int, default=None,
                   help="N: run every N-th calibrated step in full instead (DeepCache's "
                        "uniform schedule; implies --cache)")
    k.add_argument("--cache-branch", type=int, default=None,
                   help="DeepCache's branch id: the cache point, 0 the shallowest and the "
                        f"fastest (implies --cache; default {d.cache_branch})")
    c = p.add_argument_group("calibration (the deployment the scales are fitted for)")
    c.add_argument("--prompts", type=Path, default=None,
                   help="prompt file, one a line (default: calibration/prompts.txt; "
                        "text-to-image models only)")
    c.add_argument("--calib-scheduler", default=d.calib_scheduler,
                   help="sampler to calibrate for: pndm, ddim, dpm++, euler (default: the "
                        "model's, pndm for SD, ddim for the unconditional models)")
    c.add_argument("--calib-steps", type=int, default=d.calib_steps,
                   help="sampler steps to calibrate for (default: the model's: 50 for SD, "
                        "100 for ddpm-cifar10, 200 for ldm-celebahq-256)")
    c.add_argument("--calib-eta", type=float, default=d.calib_eta,
                   help="DDIM eta of the calibration trajectories (default: the model's, 0)")
    c.add_argument("--calib-prompts", type=int, default=d.calib_prompts,
                   help="n: prompts used, or sampled images for an unconditional model "
                        "(default: the model's: 16 for tiny-sd, 2 for the SD models, 16 "
                        "images for ddpm-cifar10, 2 for ldm-celebahq-256)")
    c.add_argument("--calib-every", type=int, default=d.calib_every,
                   help="c: record every c-th step (default: the model's: 1 for SD, 5 for "
                        "ddpm-cifar10, 10 for ldm-celebahq-256)")
    c.add_argument("--calib-batch", type=int, default=d.calib_batch,
                   help="prompts per FP32 pipeline run")
    c.add_argument("--calibration-dir", type=Path, default=None,
                   help="cache folder (default: ~/.cache/dq-export/calibration/<hash>)")
    c.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run the calibration batches as Ray tasks, one CPU each: auto joins "
                        "the cluster `ray start` runs on this machine (or $RAY_ADDRESS), else "
                        "starts a local one; ADDRESS joins that cluster. Statistics add up to "
                        "the sequential run's, bit for bit (needs pip install -e '.[ray]')")
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(bits=parse_bits(args.bits), method=args.method, image_size=args.size,
                  seed=args.seed, groups=args.groups, group_split=args.group_split,
                  estimator=args.estimator, time_tables=args.time_tables,
                  split_shortcut=args.split_shortcut, attention=args.attention,
                  asymmetric_activations=args.asymmetric_activations,
                  target_cpu=args.target_cpu, form=args.form,
                  text_encoder_weights=args.text_encoder_weights, vae=args.vae,
                  budget=_budget(args.budget),
                  weight_range=args.weight_range,
                  calib_scheduler=args.calib_scheduler,
                  calib_steps=args.calib_steps, calib_eta=args.calib_eta,
                  calib_prompts=args.calib_prompts,
                  calib_every=args.calib_every, calib_batch=args.calib_batch,
                  cache=args.cache or any(v is not None for v in (
                      args.cache_steps, args.cache_interval, args.cache_branch)),
                  cache_branch=args.cache_branch or 0, cache_steps=args.cache_steps,
                  cache_interval=args.cache_interval).check()


def _budget(items: list[str] | None) -> str | None:
    """Repeated or comma-joined ``--budget`` items as one canonical text."""
    if not items:
        return None
    from calibration.allocation import parse_budget

    return parse_budget(",".join(items)).text()


def _check_ray(recipe: Recipe) -> None:
    """--ray parallelises calibration: fail now if Ray is missing or nothing calibrates."""
    from dq_export.ray_cluster import require_ray

    require_ray()
    if not recipe.needs_trajectories:
        raise UserError(f"--ray runs the calibration batches, and this recipe ({recipe.bits}, "
                        "no feature cache to schedule) does not calibrate: drop --ray")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dq-export: %(levelname)s: %(message)s")
    try:
        recipe = recipe_from_args(args)
        if args.ray is not None:
            _check_ray(recipe)
        out = args.out or Path("exports") / f"{Path(args.model).name}-{recipe.bits}"
        from dq_export.export import export

        manifest = export(args.model, out, recipe, init=args.init, force=args.force,
                          prompts=args.prompts, calibration_dir=args.calibration_dir,
                          genai=args.genai, ray=args.ray)
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
