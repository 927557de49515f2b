"""The denoising loop shared by the OpenVINO pipeline and calibration (which runs torch).

``unet(sample, timestep, embeddings)`` is any callable on numpy arrays: an OpenVINO request
in deployment, the FP32 torch UNet with statistics hooks in calibration.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

import numpy as np

UNetFn = Callable[[np.ndarray, float, np.ndarray], np.ndarray]


def step_kwargs(sampler, eta: float, generator) -> dict:
    """Pass eta and the generator only to schedulers whose step() takes them (DDIM does)."""
    accepted = inspect.signature(sampler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def initial_latents(shape: tuple, sampler, generator):
    """x_T ~ N(0, sigma_T^2 I), drawn exactly as diffusers draws it for the same generator."""
    import torch

    return torch.randn(shape, generator=generator) * sampler.init_noise_sigma


def denoise(unet: UNetFn, embeddings: np.ndarray, sampler, latents, guidance: float,
            kwargs: dict, progress: bool = False) -> tuple:
    """Run every timestep of ``sampler``; return the final latents and each step's seconds.

    ``embeddings`` is [uncond; cond] (2B rows), so each UNet call is one guided batch.
    """
    import torch
    from tqdm.auto import tqdm

    step_seconds = []
    for t in tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False):
        start = time.perf_counter()
        model_in = sampler.scale_model_input(torch.cat([latents] * 2), t)
        noise = unet(model_in.numpy(), float(t), embeddings)
        uncond, cond = np.split(noise, 2)
        # eps = eps(x_t, empty) + w * (eps(x_t, c) - eps(x_t, empty))  (Ho & Salimans, eq. 6)
        guided = torch.from_numpy(uncond + guidance * (cond - uncond))
        latents = sampler.step(guided, t, latents, **kwargs).prev_sample
        step_seconds.append(time.perf_counter() - start)
    return latents, step_seconds
