"""The numpy samplers and noise against diffusers' schedulers and torch.randn."""

import json

import numpy as np
import pytest
import torch

from conftest import diffusers_scheduler
from deploy.noise import Generator
from deploy.sampler import denoise
from deploy.schedulers import SCHEDULERS, make_scheduler
from dq_export.errors import UserError
from dq_export.registry import MODELS_DIR

# Stable Diffusion's scheduler config, as exported
SD = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
      "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# the registry's pixel-space DDPM (google/ddpm-cifar10-32: linear betas, no offset, sample
# clipping on, DDPM's fixed_large variance, which the other samplers ignore) and LDM
# (CompVis/ldm-celebahq-256: scaled-linear betas 0.0015..0.0195)
DDPM = json.loads((MODELS_DIR / "ddpm-cifar10" / "scheduler_config.json").read_text())
LDM = json.loads((MODELS_DIR / "ldm-celebahq-256" / "scheduler" /
                  "scheduler_config.json").read_text())
CONFIGS = {
    "sd": SD,
    "ddpm": DDPM,
    "ldm": LDM,
    "sd-v": {**SD, "prediction_type": "v_prediction"},
    "sd-trailing": {**SD, "timestep_spacing": "trailing"},
    "cosine": {**DDPM, "beta_schedule": "squaredcos_cap_v2"},
}
SHAPE = (1, 4, 8, 8)


def fake_unet(sample, t, _embeddings):
    """A smooth, timestep-dependent stand-in for a noise prediction (batch [uncond; cond])."""
    half = len(sample) // 2
    out = np.tanh(0.7 * sample + 0.3 * np.sin(t / 97.0)).astype(np.float32)
    out[half:] += 0.05  # the conditional half differs, so guidance matters
    return out


def diffusers_trajectory(name, config, steps, seed, eta):
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    kwargs = {"eta": eta, "generator": generator} if name == "ddim" else {}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = fake_unet(model_in.numpy(), float(t), None)
        uncond, cond = np.split(noise, 2)
        guided = torch.from_numpy(uncond + np.float32(7.5) * (cond - uncond))
        latents = scheduler.step(guided, t, latents, **kwargs).prev_sample
    return scheduler.timesteps.numpy(), latents.numpy()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [50, 20, 7])
def test_samplers_follow_diffusers_step_for_step(name, config, steps):
    eta = 1.0 if name == "ddim" else 0.0  # DDIM's stochastic term draws from the same seed
    expected_t, expected = diffusers_trajectory(name, CONFIGS[config], steps, 3, eta)
    sampler = make_scheduler(name, CONFIGS[config])
    sampler.set_timesteps(steps)
    np.testing.assert_array_equal(sampler.timesteps, expected_t)
    generator = Generator(3)
    latents = generator.randn(SHAPE) * np.float32(sampler.init_noise_sigma)
    latents, _ = denoise(fake_unet, None, sampler, latents, 7.5, eta, generator)
    assert latents.dtype == np.float32
    scale = np.abs(expected).max()
    np.testing.assert_allclose(latents, expected, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 8, 8), (3, 17), (1, 3, 31, 31)])
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**64 - 1])
def test_noise_equals_torch_randn_for_the_same_seed(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    ours = Generator(seed)
    for _ in range(2):  # and the stream continues alike
        expected = torch.randn(shape, generator=generator).numpy()
        np.testing.assert_allclose(ours.randn(shape), expected, rtol=0, atol=1e-5)


def test_unsupported_scheduler_settings_are_one_line_errors():
    with pytest.raises(UserError, match="use_karras_sigmas"):
        make_scheduler("euler", {**SD, "use_karras_sigmas": True})
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        make_scheduler("ddim", {**SD, "prediction_type": "sample"})
    with pytest.raises(UserError, match="variance_type='learned_range'"):
        make_scheduler("dpm++", {**DDPM, "variance_type": "learned_range"})
    with pytest.raises(UserError, match="beta_schedule"):
        make_scheduler("pndm", {**SD, "beta_schedule": "sigmoid"})
    with pytest.raises(UserError, match="unknown scheduler"):
        make_scheduler("lms", SD)
    with pytest.raises(ValueError, match="seed"):
        Generator(-1)
