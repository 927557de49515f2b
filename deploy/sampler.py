"""The denoising loop shared by the OpenVINO pipeline and calibration (which runs torch).

``unet(sample, timestep, embeddings)`` is any callable on numpy arrays: an OpenVINO request
in deployment, the FP32 torch UNet with statistics hooks in calibration. Everything here is
numpy: a seed gives the noise ``torch.randn`` gives (deploy.noise), without torch. A
text-to-image model is guided (``guidance`` a number); an unconditional one takes
``guidance=None`` and ``embeddings=None``: one UNet call on the batch itself, as diffusers'
DDPM, DDIM and LDM pipelines make it.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from deploy.noise import Generator
from deploy.schedulers import make_scheduler

UNetFn = Callable[[np.ndarray, float, np.ndarray | None], np.ndarray]


def run_sampler(unet: UNetFn, embeddings: np.ndarray | None, scheduler: str,
                scheduler_config: dict, steps: int, latent_shape: tuple, seed: int,
                guidance: float | None, eta: float = 0.0,
                progress: bool = False) -> tuple[np.ndarray, list[float]]:
    """Sample one batch from x_T ~ N(0, sigma_T^2 I), drawn from ``seed`` exactly as diffusers
    draws it; return the final latents and each step's seconds."""
    sampler = make_scheduler(scheduler, scheduler_config)
    sampler.set_timesteps(steps)
    generator = Generator(seed)
    latents = generator.randn(latent_shape) * np.float32(sampler.init_noise_sigma)
    return denoise(unet, embeddings, sampler, latents, guidance, eta, generator, progress)


def denoise(unet: UNetFn, embeddings: np.ndarray | None, sampler, latents: np.ndarray,
            guidance: float | None, eta: float, generator: Generator,
            progress: bool = False) -> tuple:
    """Run every timestep of ``sampler``; return the final latents and each step's seconds.

    Guided: ``embeddings`` is [uncond; cond] (2B rows), so each UNet call is one guided
    batch. Unconditional (``guidance`` None): the UNet sees the B latents alone.
    """
    from tqdm.auto import tqdm

    step_seconds = []
    for t in tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False):
        start = time.perf_counter()
        if guidance is None:
            output = unet(sampler.scale_model_input(latents, t), float(t), None)
        else:
            model_in = sampler.scale_model_input(np.concatenate([latents] * 2), t)
            uncond, cond = np.split(unet(model_in, float(t), embeddings), 2)
            # eps = eps(x_t, empty) + w * (eps(x_t, c) - eps(x_t, empty))  (Ho & Salimans, eq. 6)
            output = uncond + np.float32(guidance) * (cond - uncond)
        latents = sampler.step(output, t, latents, eta=eta, generator=generator)
        step_seconds.append(time.perf_counter() - start)
    return latents, step_seconds
