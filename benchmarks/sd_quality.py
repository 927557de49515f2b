"""Image quality of several exports of one Stable Diffusion model: FID, CLIP score, PSNR/SSIM.

Q-Diffusion's evaluation (supplement, section C): generate one image per caption (MS-COCO
2017 val in the paper, 10k of them, PNDM 50 steps, guidance 7.5, 512x512), then FID against
real images and CLIP score against the captions; here also PSNR and SSIM of each export's
image against the FP32 export's image of the same prompt and seed.

    python benchmarks/sd_quality.py fp32=exports/sd14-fp32 nncf=exports/sd14-nncf \\
        ours=exports/sd14-w8a8 --prompts captions.txt --limit 1000 \\
        --reference-images coco/val2017-512 --clip models/clip-vit-base-patch16 \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out results/sd14-quality

Prompt i is drawn with seed --seed + i by every export. Images go to OUT/LABEL/00000.png, ...
with their settings in the PNG, so a rerun keeps those already made with the same settings.
Nothing is downloaded but torch-fidelity's InceptionV3 weights when --inception-weights is
not given. Prints a table; writes results.json and grid.png (a row per export) to --out.

Time on 2 cores at 512: an sd14 image takes about 8 minutes in FP32 and 4 in W8A8 (PNDM 50),
so 100 captions through FP32, NNCF and ours take about a day.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

from common import parse_exports
from dq_export.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what torch-fidelity reads from a folder
PNG_KEY = "dq-sd-quality"  # the PNG text chunk holding an image's generation settings
INCEPTION_FEATURES = "2048"  # the pool features FID is defined on
BATCH = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("exports", nargs="+", metavar="LABEL=EXPORT_DIR",
                   help="exports of one model at one size; PSNR/SSIM are against the first "
                        "whose manifest says bits fp32")
    p.add_argument("--prompts", type=Path, required=True, help="captions, one a line")
    p.add_argument("--limit", type=int, default=None, help="only the first N captions")
    p.add_argument("--reference-images", type=Path, required=True,
                   help="folder of real images for FID (.png/.jpg; e.g. COCO val2017 resized "
                        "to the export's size)")
    p.add_argument("--clip", required=True,
                   help="CLIP folder in Hugging Face format (save_pretrained), or a hub id "
                        "already in the Hugging Face cache; Q-Diffusion used ViT-B/16")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="torch-fidelity's InceptionV3 weights "
                        "(weights-inception-2015-12-05-6726825d.pth); default: torch's hub "
                        "cache, downloaded there when missing")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--scheduler", default="pndm", help="pndm (default), ddim, dpm++, euler")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    p.add_argument("--grid-columns", type=int, default=8,
                   help="prompts shown in grid.png (default 8)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sd-quality"),
                   help="output folder (default benchmarks/results/sd-quality)")
    return p


def read_exports(items: list[str]) -> dict[str, tuple[Path, dict]]:
    """LABEL=DIR -> (DIR, manifest), all of one model at one image size."""
    from dq_export.manifest import read_manifest

    return {label: (path, read_manifest(path, verify=False))
            for label, path in parse_exports(items).items()}


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"--reference-images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise UserError(f"--reference-images {folder} holds {len(files)} images "
                        f"({', '.join(IMAGE_SUFFIXES)}): FID needs at least 2")
    return files


def load_clip_processor(name: str):
    """The CLIP processor of --clip, from a folder or the Hugging Face cache, offline."""
    from transformers import CLIPConfig, CLIPProcessor

    try:
        CLIPConfig.from_pretrained(name, local_files_only=True)
        return CLIPProcessor.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):  # missing files; a path that is no hub id either
        raise UserError(f"--clip {name}: no CLIP model and processor there or in the Hugging "
                        "Face cache (nothing is downloaded): save one with CLIPModel and "
                        "CLIPProcessor .save_pretrained(DIR) and pass DIR") from None


def inception_module():
    """torch-fidelity's InceptionV3 module (the TensorFlow FID network), imported on its own.

    torch_fidelity/__init__ imports torchvision for datasets and extractors FID does not
    use, and PyPI's torchvision wheels are CUDA builds that fail to load beside a CPU torch
    (and then break transformers too); so the package is registered without running its
    __init__, and only the extractor's module (torch-only) is imported.
    """
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise UserError("FID needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0")
        sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)
    import torch_fidelity.feature_extractor_inceptionv3 as module

    return module


def load_inception(weights: Path | None):
    """The FID feature extractor with its weights: --inception-weights, or the copy in torch's
    hub cache (downloaded there, as torch-fidelity does, when missing)."""
    import torch.hub

    module = inception_module()
    url = module.URL_INCEPTION_V3
    if weights is None:
        weights = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        if not weights.is_file():
            weights.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, str(weights))
            except OSError as e:  # URLError is an OSError
                raise UserError(f"cannot download torch-fidelity's InceptionV3 weights ({e}): "
                                f"fetch {url} elsewhere and pass --inception-weights FILE, or "
                                f"put it at {weights}") from None
    elif not weights.is_file():
        raise UserError(f"--inception-weights {weights}: no such file (it is {url})")
    try:
        return module.FeatureExtractorInceptionV3(
            "inception-v3-compat", [INCEPTION_FEATURES], feature_extractor_weights_path=str(weights))
    except Exception as e:  # noqa: BLE001 (unpickling an arbitrary file raises any kind)
        raise UserError(f"{weights} is not torch-fidelity's InceptionV3 weights "
                        f"({type(e).__name__}): the file is {url}") from None


def generate(label: str, export_dir: Path, manifest: dict, prompts: list[str],
             settings: dict, folder: Path) -> list[Path]:
    """One PNG per prompt (prompt i with seed + i); images already there with the same
    settings, export and prompt are kept, so an interrupted run resumes."""
    from PIL import Image, PngImagePlugin
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(prompts))]
    wanted = [json.dumps({**settings, "prompt": prompt, "seed": settings["seed"] + i,
                          "export": str(export_dir.resolve()), "created": manifest["created"]},
                         sort_keys=True) for i, prompt in enumerate(prompts)]
    todo = [i for i, path in enumerate(paths)
            if not path.is_file() or Image.open(path).text.get(PNG_KEY) != wanted[i]]
    if todo:
        from deploy import Pipeline

        pipe = Pipeline.load(export_dir, verify=False)
        for i in tqdm(todo, desc=f"generating {label}", unit="image"):
            image = pipe.generate(prompts[i], steps=settings["steps"],
                                  scheduler=settings["scheduler"], guidance=settings["guidance"],
                                  seed=settings["seed"] + i).images[0]
            info = PngImagePlugin.PngInfo()
            info.add_text(PNG_KEY, wanted[i])
            partial = paths[i].with_suffix(".part")
            image.save(partial, format="PNG", pnginfo=info)
            partial.replace(paths[i])  # never a half-written PNG under the real name
    return paths


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def inception_features(extractor, paths: list[Path], desc: str) -> np.ndarray:
    """2048-d pool features of each image, fed as torch-fidelity feeds a folder (uint8 RGB,
    any size: the network resizes to 299); consecutive images of one size share a batch."""
    import torch
    from tqdm import tqdm

    features, batch = [], []
    bar = tqdm(total=len(paths), desc=desc, unit="image")

    def flush():
        with torch.no_grad():
            features.append(extractor(torch.stack(batch))[0].double().numpy())
        bar.update(len(batch))
        batch.clear()

    for path in paths:
        image = torch.from_numpy(_pixels(path).copy()).permute(2, 0, 1)
        if batch and (len(batch) == BATCH or batch[0].shape != image.shape):
            flush()
        batch.append(image)
    flush()
    bar.close()
    return np.concatenate(features)


def clip_scores(model, processor, prompts: list[str], paths: list[Path],
                desc: str) -> np.ndarray:
    """CLIP score of each image against its own prompt."""
    import torch
    from tqdm import tqdm

    from dq_export.evaluation.image_metrics import clip_score

    max_length = model.config.text_config.max_position_embeddings
    scores = []
    for start in tqdm(range(0, len(paths), BATCH), desc=desc, unit="batch"):
        images = [_pixels(p) for p in paths[start:start + BATCH]]
        inputs = processor(text=prompts[start:start + BATCH], images=images, return_tensors="pt",
                           padding=True, truncation=True, max_length=max_length)
        with torch.no_grad():
            out = model(**inputs)
        scores.append(clip_score(out.image_embeds.numpy(), out.text_embeds.numpy()))
    return np.concatenate(scores)


def _number(x: float, digits: int = 4) -> float | None:
    """JSON has no inf/nan: a PSNR of identical images is written as null."""
    return round(float(x), digits) if math.isfinite(x) else None


def evaluate(args, exports: dict, prompts: list[str], reference_files: list[Path],
             processor, inception) -> tuple[dict, dict[str, list[Path]]]:
    """Generate, then score every export; returns results.json's content and the images."""
    from transformers import CLIPModel

    from dq_export.evaluation.image_metrics import fid, psnr, ssim

    settings = {"steps": args.steps, "scheduler": args.scheduler, "guidance": args.guidance,
                "seed": args.seed}
    images = {label: generate(label, path, manifest, prompts, settings, args.out / label)
              for label, (path, manifest) in exports.items()}
    reference = next((label for label, (_, m) in exports.items()
                      if m["recipe"]["bits"] == "fp32"), None)
    real = inception_features(inception, reference_files, "inception: reference images")
    clip = CLIPModel.from_pretrained(args.clip, local_files_only=True).eval()
    results = {}
    for label, paths in images.items():
        path, manifest = exports[label]
        scores = clip_scores(clip, processor, prompts, paths, f"CLIP: {label}")
        entry = {"dir": str(path), "bits": manifest["recipe"]["bits"],
                 "method": manifest["recipe"]["method"],
                 "fid": _number(fid(inception_features(inception, paths, f"inception: {label}"),
                                    real)),
                 "clip_score": _number(scores.mean()), "psnr_db": None, "ssim": None,
                 "per_image": {"clip_score": [_number(c) for c in scores]}}
        if reference is not None and label != reference:
            psnrs, ssims = [], []
            for a, b in zip(paths, images[reference]):
                a, b = _pixels(a), _pixels(b)
                psnrs.append(psnr(a, b))
                ssims.append(ssim(a, b))
            entry.update(psnr_db=_number(np.mean(psnrs)), ssim=_number(np.mean(ssims)))
            entry["per_image"].update(psnr_db=[_number(x) for x in psnrs],
                                      ssim=[_number(x) for x in ssims])
        results[label] = entry
    return {"settings": {**settings, "prompts_file": str(args.prompts), "prompts": len(prompts),
                         "reference_images": str(args.reference_images),
                         "reference_count": len(reference_files), "clip": args.clip,
                         "inception_weights": str(args.inception_weights or "torch hub cache")},
            "reference": reference, "exports": results, "grid": "grid.png",
            "grid_rows": list(images), "prompts": prompts}, images


def write_outputs(out: Path, results: dict, images: dict[str, list[Path]], columns: int) -> None:
    from PIL import Image

    from dq_export.evaluation.reference.evaluate import grid

    columns = min(columns, len(results["prompts"]))
    rows = [Image.open(p).convert("RGB") for paths in images.values() for p in paths[:columns]]
    grid(rows, columns).save(out / "grid.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    reference = results["reference"]
    print("| export | bits | FID | CLIP score | PSNR dB vs FP32 | SSIM vs FP32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in results["exports"].items():
        cells = [r["fid"], r["clip_score"], r["psnr_db"], r["ssim"]]
        if label == reference:
            cells[2:] = ["(reference)", "(reference)"]
        elif r["ssim"] is not None and r["psnr_db"] is None:
            cells[2] = "inf"  # identical images
        print(f"| {label} | {r['bits']} | " + " | ".join("-" if c is None else str(c)
                                                         for c in cells) + " |")
    print(f"{results['settings']['prompts']} prompts; FP32 reference: {reference or 'none'}; wrote {out / 'results.json'} and "
          f"grid.png (rows: {', '.join(results['grid_rows'])})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.grid_columns < 1:
        parser.error("--limit and --grid-columns must be at least 1")
    try:
        from calibration.collect import read_prompts
        from deploy.schedulers import scheduler_name

        # every input is checked before the hours of generation start
        exports = read_exports(args.exports)
        scheduler_name(args.scheduler)
        prompts = read_prompts(args.prompts)[:args.limit]
        if len(prompts) < 2:
            raise UserError(f"{len(prompts)} prompt(s): FID needs at least 2 images an export")
        reference_files = image_files(args.reference_images)
        processor = load_clip_processor(args.clip)
        inception = load_inception(args.inception_weights)
        results, images = evaluate(args, exports, prompts, reference_files, processor,
                                   inception)
    except UserError as e:
        print(f"sd_quality: error: {e}", file=sys.stderr)
        return e.exit_code
    write_outputs(args.out, results, images, args.grid_columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
