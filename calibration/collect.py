"""Calibration set and statistics along the FP32 sampler trajectory (Q-Diffusion, Alg. 1).

For each batch of prompts the FP32 torch pipeline runs the deployed sampler; at every c-th
step the UNet inputs (x_t, t, [uncond; cond] text embeddings) are saved, and hooks add every
quantized layer's input to per-step histograms in the same forward pass. An unconditional
model samples batches of images instead, from x_T alone: the inputs are (x_t, t). Both are cached:
after each batch the running statistics are checkpointed with the number of batches done,
so an interrupted collection resumes where it stopped. Batches are independent (each has its
own seed) and their statistics add, so they may also run as Ray tasks
(``calibration.ray_batches``) with the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from calibration.statistics import StepStatistics, recording, statistic_keys
from dq_export.errors import UserError, first_line
from dq_export.filesystem import (bytes_under, disk_full_error, is_disk_full, make_folder,
                                  replacing)
from dq_export.lock import exclusive

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).parent / "prompts.txt"
CACHE_ENV = "DQ_EXPORT_CACHE"
FINAL_LATENTS = "final_latents"  # the sampler's output, one row per image of the batch
PER_ROW = ("encoder_hidden_states", FINAL_LATENTS)  # cached per batch row, not per step


@dataclass(frozen=True)
class CalibrationSettings:
    scheduler: str = "pndm"
    steps: int = 50  # sampler steps of the deployment being calibrated
    num_prompts: int = 16  # n: prompts, each giving a cond and an uncond sample per step
    every: int = 1  # c: record every c-th distinct timestep
    batch_size: int = 4  # prompts per FP32 pipeline run
    guidance: float = 7.5
    seed: int = 0
    eta: float = 0.0  # DDIM's stochastic term along the trajectories


def read_prompts(path: Path | None) -> list[str]:
    path = Path(path) if path else PROMPTS_FILE
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist: give a text file, one prompt a line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts: write one prompt a line")
    return prompts


def choose_prompts(prompts: list[str], settings: CalibrationSettings) -> list[str]:
    """A seeded sample of ``num_prompts`` prompts (all of them, cycled, if fewer)."""
    order = list(range(len(prompts)))
    random.Random(settings.seed).shuffle(order)
    return [prompts[order[i % len(order)]] for i in range(settings.num_prompts)]


def calibrated_timesteps(scheduler_config: dict, settings: CalibrationSettings) -> list[int]:
    """Distinct timesteps of the sampler trajectory, every c-th, in sampling order."""
    from deploy.schedulers import make_scheduler

    sampler = make_scheduler(settings.scheduler, scheduler_config)
    sampler.set_timesteps(settings.steps)
    distinct = list(dict.fromkeys(int(round(float(t))) for t in sampler.timesteps))
    return distinct[::settings.every]


def cache_identity(components, settings: CalibrationSettings, prompts: list[str] | None,
                   image_size: int) -> dict:
    """Everything the cached data depends on; a cache is reused only when all of it matches.

    eta 0 is left out, so caches made before eta was a setting (all eta 0) stay valid."""
    architecture = {k: v for k, v in components.unet.config.items() if not k.startswith("_")}
    recorded = {k: v for k, v in asdict(settings).items() if not (k == "eta" and v == 0)}
    return {"model": components.source, "unet_config": architecture,
            "settings": recorded, "image_size": image_size,
            "prompts_sha256": None if prompts is None
            else hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def default_cache_dir(identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dq-export"))
    return root / "calibration" / digest.hexdigest()[:16]


def open_cache(cache_dir: Path, identity: dict) -> None:
    """Start the cache, or check that an existing one was made for the same job."""
    meta = cache_dir / "meta.json"
    expected = json.loads(json.dumps(identity, default=str))
    if meta.is_file():
        found = read_cached(meta, lambda path: json.loads(path.read_text()))
        differs = [k for k in expected if not isinstance(found, dict)
                   or found.get(k) != expected[k]]
        if differs:
            raise UserError(f"calibration cache {cache_dir} was made for a different model or "
                            f"recipe ({', '.join(differs)} differ): delete it or use another "
                            "--calibration-dir")
        return
    with replacing(meta) as tmp:
        tmp.write_text(json.dumps(expected, indent=2) + "\n")


def read_cached(path: Path, load):
    """``load(path)`` for a file of the calibration cache; a file that cannot be read
    (truncated by a full disk, edited by hand) is a one-line UserError that names it."""
    try:
        return load(path)
    except Exception as e:  # safetensors, json and numpy each raise their own kind
        cache = path.parent.parent if path.parent.name == "inputs" else path.parent
        raise UserError(f"calibration cache file {path} is truncated or corrupt "
                        f"({first_line(e, 120)}): delete {cache} to calibrate again") from None


@dataclass(frozen=True)
class BatchJob:
    """What every batch of one collection shares; batch ``b`` uses seed ``settings.seed + b``."""

    settings: CalibrationSettings
    prompts: list[str] | None  # the chosen prompts; None for an unconditional model
    timesteps: list[int]  # the calibrated ones, in sampling order
    sizes: list[int]  # prompts (or images) per batch
    latent: int  # the latent's side in pixels


def collect(components, settings: CalibrationSettings, prompts: list[str] | None,
            image_size: int, cache_dir: Path | None = None, progress: bool = True,
            ray: str | None = None) -> tuple[StepStatistics, dict]:
    """Run (or resume) collection; return the statistics and a summary for the manifest.
    ``prompts`` is None for an unconditional model: ``num_prompts`` images are sampled.
    ``ray``: a Ray cluster address ("auto": see ``dq_export.ray_cluster.connect``) to run
    the batches on, as tasks; None runs them here, one after another.

    One export at a time fills a cache: a second one waits, then resumes from what the first
    wrote. A full disk is a one-line error that keeps the batches already checkpointed."""
    chosen = choose_prompts(prompts, settings) if components.conditional else None
    identity = cache_identity(components, settings, chosen, image_size)
    cache_dir = make_folder(cache_dir or default_cache_dir(identity), "--calibration-dir")

    def busy(holder: str) -> None:
        log.warning("waiting for another dq-export (pid %s) to finish with the calibration "
                    "cache %s", holder, cache_dir)

    with exclusive(cache_dir / ".lock", busy):
        try:
            return _collect(components, settings, chosen, identity, image_size, cache_dir,
                            progress, ray)
        except Exception as e:
            if not is_disk_full(e, cache_dir):
                raise
            raise disk_full_error(cache_dir, bytes_under(cache_dir), "calibration cache",
                                  "--calibration-dir", "the batches done are kept: the next "
                                  "run resumes from them") from e


def _collect(components, settings: CalibrationSettings, chosen: list[str] | None,
             identity: dict, image_size: int, cache_dir: Path, progress: bool,
             ray: str | None) -> tuple[StepStatistics, dict]:
    """``collect`` into a cache folder that exists and is held, for the ``chosen`` prompts
    (None: an unconditional model) and the cache ``identity`` they make."""
    from tqdm.auto import tqdm

    open_cache(cache_dir, identity)
    timesteps = calibrated_timesteps(components.scheduler_config, settings)
    checkpoint = cache_dir / "stats.safetensors"
    stats, done, seconds = StepStatistics(statistic_keys(components.unet), len(timesteps)), 0, 0.0
    if checkpoint.is_file():
        stats, done, seconds = read_cached(checkpoint, _load_checkpoint)
        if stats.keys != statistic_keys(components.unet):  # made by an older dq-export
            stats = replay_statistics(components.unet, cache_dir, timesteps, done, progress)
            stats.save(checkpoint, {"batches_done": str(done), "seconds": f"{seconds:.2f}"})
    sizes = [min(settings.batch_size, settings.num_prompts - i)
             for i in range(0, settings.num_prompts, settings.batch_size)]
    job = BatchJob(settings, chosen, timesteps, sizes, image_size // components.vae_factor)
    pending = list(range(done, len(sizes)))
    if ray is None:
        batches = ((b, run_batch(components, job, b, stats, progress)) for b in pending)
    else:
        from calibration.ray_batches import batches_on_ray

        batches = batches_on_ray(components, job, pending, stats, ray)
    bar = tqdm(total=len(sizes), initial=done, desc="calibration batches", disable=not progress)
    last = time.perf_counter()
    for b, inputs in batches:  # in batch order, so the checkpoint always holds a prefix
        _save_inputs(cache_dir / "inputs" / f"batch-{b:04d}.safetensors", inputs)
        seconds += time.perf_counter() - last
        last = time.perf_counter()
        stats.save(checkpoint, {"batches_done": str(b + 1), "seconds": f"{seconds:.2f}"})
        bar.update(1)
    bar.close()
    summary = {"calibrated_timesteps": timesteps, "scheduler": settings.scheduler,
               "steps": settings.steps, "every": settings.every, "eta": settings.eta,
               "seconds": round(seconds, 1), "cache_dir": str(cache_dir)}
    if chosen is not None:
        summary.update(prompts=len(chosen), samples_per_step=2 * len(chosen),
                       guidance=settings.guidance)
    else:
        summary.update(images=settings.num_prompts, samples_per_step=settings.num_prompts)
    return stats, summary


def _load_checkpoint(path: Path) -> tuple[StepStatistics, int, float]:
    stats, meta = StepStatistics.load(path)
    return stats, int(meta["batches_done"]), float(meta["seconds"])


def run_batch(components, job: BatchJob, b: int, stats: StepStatistics,
              progress: bool = False) -> dict[str, np.ndarray]:
    """Batch ``b`` along the FP32 sampler: its statistics are added to ``stats``; returns
    its UNet inputs (and FP32 outputs) at the calibrated steps, to cache."""
    import torch

    from deploy.sampler import run_sampler

    settings, size = job.settings, job.sizes[b]
    recorder = TrajectoryRecorder(components.unet, {t: k for k, t in enumerate(job.timesteps)})
    embeddings = None
    with recording(components.unet, stats, lambda: recorder.step), torch.no_grad():
        if job.prompts is not None:
            batch = job.prompts[b * settings.batch_size:][:size]
            embeddings = np.concatenate([_encode(components, [""] * size),
                                         _encode(components, batch)])
        final, _ = run_sampler(recorder, embeddings, settings.scheduler,
                               components.scheduler_config, settings.steps,
                               (size, components.latent_channels, job.latent, job.latent),
                               settings.seed + b,
                               settings.guidance if job.prompts is not None else None,
                               settings.eta, progress=progress)
    return _inputs(recorder, embeddings, final)


def replay_statistics(unet, cache_dir: Path, timesteps: list[int], batches: int,
                      progress: bool = True) -> StepStatistics:
    """Statistics recomputed from the cached UNet inputs, one UNet call each: for a cache
    whose statistics lack quantizers that this version fits. No sampler runs again."""
    import torch
    from tqdm.auto import tqdm

    step_of = {t: k for k, t in enumerate(timesteps)}
    stats = StepStatistics(statistic_keys(unet), len(timesteps))
    calls = load_inputs(cache_dir, batches)
    state = {"step": None}
    with recording(unet, stats, lambda: state["step"]), torch.no_grad():
        for call in tqdm(calls, desc="statistics from cached inputs", disable=not progress):
            state["step"] = step_of[int(round(float(call["timestep"][0])))]
            text = [torch.from_numpy(call["encoder_hidden_states"])] \
                if "encoder_hidden_states" in call else []
            unet(torch.from_numpy(call["sample"]), torch.from_numpy(call["timestep"]), *text)
    return stats


class TrajectoryRecorder:
    """The FP32 torch UNet as a ``denoise`` callable that marks calibrated steps for the hooks
    and keeps the inputs it saw at them."""

    def __init__(self, unet, step_of: dict[int, int]):
        self.unet, self.step_of = unet, step_of
        self.step: int | None = None
        self.samples: list[np.ndarray] = []
        self.timesteps: list[float] = []
        self.outputs: list[np.ndarray] = []

    def __call__(self, sample: np.ndarray, t: float, embeddings: np.ndarray | None) -> np.ndarray:
        import torch

        self.step = self.step_of.get(int(round(t)))
        text = () if embeddings is None else (torch.from_numpy(embeddings),)
        out = self.unet(torch.from_numpy(sample), torch.tensor(t), *text).sample.numpy()
        if self.step is not None:
            self.samples.append(sample)
            self.timesteps.append(t)
            self.outputs.append(out)
        self.step = None
        return out


def _encode(components, prompts: list[str]) -> np.ndarray:
    import torch

    tok = components.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return components.text_encoder(ids)[0].numpy()


def _inputs(recorder: TrajectoryRecorder, embeddings: np.ndarray | None,
            final: np.ndarray) -> dict:
    """The UNet inputs of one batch at its calibrated steps (for NNCF and fidelity checks),
    the FP32 UNet's outputs on them (what the feature cache's schedule is measured
    against), and the sampler's final latents (what the VAE decoder is calibrated on)."""
    tensors = {"sample": np.stack(recorder.samples).astype(np.float32),
               "timestep": np.asarray(recorder.timesteps, dtype=np.float32),
               "noise_pred": np.stack(recorder.outputs).astype(np.float32),
               FINAL_LATENTS: np.asarray(final, np.float32)}
    if embeddings is not None:
        tensors["encoder_hidden_states"] = embeddings.astype(np.float32)
    return tensors


def _save_inputs(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        save_file(tensors, str(tmp))


def load_trajectories(cache_dir: Path) -> list[dict[str, np.ndarray]]:
    """Every cached batch as arrays over its calibrated steps: ``sample`` [steps, rows, ...],
    ``timestep`` [steps], ``noise_pred`` (the FP32 output, absent in caches made before it
    was recorded) and, for a text-to-image model, ``encoder_hidden_states`` [rows, ...];
    and ``final_latents`` [images, ...] (absent in caches made before it was recorded)."""
    from safetensors.numpy import load_file

    return [read_cached(path, lambda p: load_file(str(p)))
            for path in sorted((Path(cache_dir) / "inputs").glob("batch-*.safetensors"))]


def load_inputs(cache_dir: Path, batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """Every cached UNet input (of the first ``batches`` batches) as one dict per call:
    sample, timestep and, for a text-to-image model, encoder_hidden_states (the graph's
    input names)."""
    from safetensors.numpy import load_file

    calls = []
    for path in sorted((Path(cache_dir) / "inputs").glob("batch-*.safetensors"))[:batches]:
        data = read_cached(path, lambda p: load_file(str(p)))
        text = {k: v for k, v in data.items() if k == "encoder_hidden_states"}
        for sample, t in zip(data["sample"], data["timestep"]):
            calls.append({"sample": sample, "timestep": np.full(len(sample), t, np.float32),
                          **text})
    return calls


def load_final_latents(cache_dir: Path) -> np.ndarray:
    """The final latents of every cached trajectory, [images, C, h, w] (the scheduler's
    latents, before the decoder's scaling). A cache made before they were recorded is a
    one-line error: its trajectories would have to be sampled again anyway."""
    batches = load_trajectories(cache_dir)
    if not batches or any(FINAL_LATENTS not in batch for batch in batches):
        raise UserError(f"calibration cache {cache_dir} has no final latents (made by an older "
                        f"dq-export): delete it to calibrate again, or export with --vae fp32")
    return np.concatenate([batch[FINAL_LATENTS] for batch in batches])
