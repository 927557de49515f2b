"""Score an export of tiny-sd with the judge: does "a handwritten digit D" draw a D?

    python -m dq_export.evaluation.reference.evaluate EXPORT_DIR --seeds 10 --steps 20 \
        --grid benchmarks/results/reference_samples.png

Generates every digit for each seed through the OpenVINO pipeline (deploy.Pipeline), then
reports the judge's accuracy on them and the digits FID against the held-out real digits.
The grid has one row per seed, digits 0-9 left to right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dq_export.evaluation.reference import judge
from dq_export.evaluation.reference.digits import CANONICAL, load_split


def generate_digits(pipeline, seeds, steps: int = 20, scheduler: str = "pndm",
                    guidance: float = 7.5) -> tuple[list, np.ndarray]:
    """One image of each digit per seed (one batch of ten prompts per seed)."""
    prompts = [CANONICAL.format(d=d) for d in range(10)]
    images = []
    for seed in seeds:
        images += pipeline.generate(prompts, steps=steps, scheduler=scheduler,
                                    guidance=guidance, seed=seed).images
    return images, np.tile(np.arange(10), len(seeds))


def generate_digits_on_ray(export_dir: Path, seeds, steps: int = 20, scheduler: str = "pndm",
                           guidance: float = 7.5, address: str = "auto",
                           ov_config: dict | None = None) -> tuple[list, np.ndarray]:
    """``generate_digits`` with the seeds split into contiguous shards, one Ray task (one CPU)
    per shard, each loading the export itself. Each seed's images depend on that seed alone,
    so they are the ones a single process draws, in the same order, given the same
    ``ov_config`` (pass the driver's Pipeline's) on the same kind of CPU."""
    from PIL import Image

    from dq_export.ray_cluster import connect

    ray = connect(address)
    seeds = list(seeds)
    shards = np.array_split(seeds, min(len(seeds), int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(num_cpus=1)(_digits_task)
    refs = [task.remote(str(export_dir), shard.tolist(), steps, scheduler, guidance, ov_config)
            for shard in shards]
    images = [Image.fromarray(array) for arrays in ray.get(refs) for array in arrays]
    return images, np.tile(np.arange(10), len(seeds))


def _digits_task(export_dir: str, seeds: list[int], steps: int, scheduler: str,
                 guidance: float, ov_config: dict | None) -> list[np.ndarray]:
    from deploy import Pipeline

    pipe = Pipeline.load(export_dir, batch_size=10, verify=False, ov_config=ov_config)
    images, _ = generate_digits(pipe, seeds, steps, scheduler, guidance)
    return [np.asarray(image) for image in images]


def score(images, labels) -> dict:
    """Judge accuracy (overall and per digit) and digits FID against the held-out digits."""
    predicted, _ = judge.classify(images)
    real = judge.features(load_split().test_images)
    per_digit = [float(np.mean(predicted[labels == d] == d)) for d in range(10)]
    return {"accuracy": float(np.mean(predicted == labels)), "per_digit": per_digit,
            "digits_fid": judge.digits_fid(judge.features(images), real),
            "predicted": predicted.tolist()}


def grid(images, columns: int = 10):
    """Images (PIL, all one size) tiled row by row."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * w, (i // columns) * h))
    return canvas


def main(argv=None) -> None:
    from deploy import Pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", type=Path)
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1, ten digits each")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="pndm")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--grid", type=Path, help="write the samples as a PNG grid here")
    args = p.parse_args(argv)
    images, labels = generate_digits(Pipeline.load(args.export_dir), range(args.seeds),
                                     args.steps, args.scheduler, args.guidance)
    result = score(images, labels)
    if args.grid:
        grid(images).save(args.grid)
    settings = {k: getattr(args, k) for k in ("seeds", "steps", "scheduler", "guidance")}
    print(json.dumps({**settings, **{k: v for k, v in result.items() if k != "predicted"}}))


if __name__ == "__main__":
    main()
