"""Named models: their architecture configs (kept in this repo) and their usual hub ids.

A registry entry never downloads anything: weights come from a local diffusers folder, the
Hugging Face cache in offline mode, or the files embedded in this repo (tiny-sd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dq_export.errors import UserError
from dq_export.layout import read_layout

MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_ids: tuple[str, ...]  # the first is the one to quote; others are known mirrors
    image_size: int
    description: str
    embedded: bool = False  # weights (if any) live in the repo beside the configs
    # calibration prompts (text-to-image: cond + uncond, 2 samples a step each), or sampled
    # images for an unconditional model
    calib_prompts: int = 2
    # the papers' sampling for this model: the defaults of dq-generate and of calibration
    sampler: str = "pndm"
    steps: int = 50
    eta: float = 0.0
    calib_every: int = 1  # c: calibrate every c-th step (Q-Diffusion's interval)

    @property
    def config_dir(self) -> Path:
        return MODELS_DIR / self.name


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tiny-sd", (), 64, "embedded Stable-Diffusion-structured model (default)",
                  embedded=True, calib_prompts=16),
        ModelSpec("sd14", ("CompVis/stable-diffusion-v1-4",), 512, "Stable Diffusion v1.4"),
        ModelSpec("sd15", ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                           "runwayml/stable-diffusion-v1-5"), 512, "Stable Diffusion v1.5"),
        ModelSpec("sd21-base", ("stabilityai/stable-diffusion-2-1-base",), 512,
                  "Stable Diffusion v2.1-base"),
        ModelSpec("sd21", ("stabilityai/stable-diffusion-2-1",), 768,
                  "Stable Diffusion v2.1 (v-prediction, 768x768)"),
        # Q-Diffusion's and TFMQ-DM's unconditional models: DDIM, 100 steps on CIFAR-10 and
        # 200 on the 256x256 LDMs, calibrated every 5th / 10th step (Q-Diffusion, Table 4)
        ModelSpec("ddpm-cifar10", ("google/ddpm-cifar10-32",), 32,
                  "DDPM on CIFAR-10, pixel space (DDIM 100 steps)", calib_prompts=16,
                  sampler="ddim", steps=100, calib_every=5),
        ModelSpec("ldm-celebahq-256", ("CompVis/ldm-celebahq-256",), 256,
                  "LDM-4 on CelebA-HQ, VQ-f4 latents (DDIM 200 steps)", calib_prompts=2,
                  sampler="ddim", steps=200, calib_every=10),
        ModelSpec("tiny-ddpm", (), 16, "embedded configs, pixel-space UNet2DModel (tests)",
                  embedded=True, calib_prompts=8, sampler="ddim", steps=20),
        ModelSpec("tiny-ldm", (), 32, "embedded configs, UNet2DModel on VQ latents (tests)",
                  embedded=True, calib_prompts=8, sampler="ddim", steps=20),
    )
}

EXPECTED_LAYOUT = (
    "text-to-image: unet/ text_encoder/ tokenizer/ (vocab.json, merges.txt) vae/ "
    "scheduler/scheduler_config.json; unconditional: unet/ scheduler/ (+ vqvae/ or vae/ for "
    "latent diffusion), or config.json + scheduler_config.json at the top; every model "
    "folder a config.json + *.safetensors or *.bin"
)

# A local folder: SD's sampling (PNDM 50), calibrated at every step
FOLDER_DEFAULTS = ModelSpec("folder", (), 0, "a local diffusers folder")


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise unknown_model_error(name) from None


def unknown_model_error(name: str) -> UserError:
    return UserError(f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, "
                     "or the path of a local diffusers folder")


def model_defaults(model: str) -> ModelSpec:
    """Sampling and calibration defaults: the registry entry's, or FOLDER_DEFAULTS."""
    return REGISTRY.get(model, FOLDER_DEFAULTS)


def check_diffusers_folder(folder: Path) -> None:
    """Raise a UserError naming what is missing from a local diffusers folder."""
    layout = read_layout(folder)
    if layout.missing():
        raise UserError(f"{folder} is not a diffusers folder: missing "
                        f"{', '.join(layout.missing())} (expected layout: {EXPECTED_LAYOUT})")
    if not layout.has_weights():
        raise UserError(f"{folder} has no weights for one of "
                        f"{', '.join(n or 'the UNet' for n in layout.weight_folders)} "
                        f"(expected layout: {EXPECTED_LAYOUT}); "
                        "or pass --init random for seeded random weights")


def find_in_hf_cache(spec: ModelSpec) -> Path | None:
    """The cached snapshot of one of the spec's hub ids, looked up offline; None if absent.

    ``HF_HUB_CACHE`` is read here, not at import, so a cache set after start-up counts.
    """
    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE")  # None: huggingface_hub's own default
    for hub_id in spec.hub_ids:
        try:
            path = Path(snapshot_download(hub_id, local_files_only=True, cache_dir=cache_dir))
        except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError
            continue
        if read_layout(path).has_weights():
            return path
    return None


def missing_weights_error(spec: ModelSpec) -> UserError:
    return UserError(
        f"no weights found for {spec.name} ({spec.hub_ids[0]}): nothing is downloaded; "
        f"put its diffusers folder in the Hugging Face cache or pass the folder as --model DIR "
        f"(layout: {EXPECTED_LAYOUT}), or use --init random for its architecture with seeded "
        f"random weights"
    )
