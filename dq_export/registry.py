"""Named models: their architecture configs (kept in this repo) and their usual hub ids.

A registry entry never downloads anything: weights come from a local diffusers folder, the
Hugging Face cache in offline mode, or the files embedded in this repo (tiny-sd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dq_export.errors import UserError

MODELS_DIR = Path(__file__).parent / "models"
COMPONENT_FOLDERS = ("unet", "text_encoder", "vae", "tokenizer", "scheduler")
WEIGHT_FOLDERS = ("unet", "text_encoder", "vae")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_ids: tuple[str, ...]  # the first is the one to quote; others are known mirrors
    image_size: int
    description: str
    embedded: bool = False  # weights (if any) live in the repo beside the configs
    calib_prompts: int = 2  # default calibration prompts (cond + uncond: 4 samples a step)

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
    )
}

EXPECTED_LAYOUT = (
    "model_index.json, unet/ text_encoder/ vae/ (config.json + *.safetensors or *.bin), "
    "tokenizer/ (vocab.json, merges.txt), scheduler/scheduler_config.json"
)


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise unknown_model_error(name) from None


def unknown_model_error(name: str) -> UserError:
    return UserError(f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, "
                     "or the path of a local diffusers folder")


def default_calib_prompts(model: str) -> int:
    """Calibration prompts when the recipe leaves it open: the registry's, or 4 for a folder."""
    return REGISTRY[model].calib_prompts if model in REGISTRY else ModelSpec.calib_prompts


def has_weights(folder: Path) -> bool:
    """True when every weight-carrying component has a weight file (any diffusers variant)."""
    return all(
        any(any((folder / sub).glob(pattern)) for pattern in ("*.safetensors", "*.bin"))
        for sub in WEIGHT_FOLDERS
    )


def check_diffusers_folder(folder: Path) -> None:
    """Raise a UserError naming what is missing from a local diffusers folder."""
    missing = [sub for sub in COMPONENT_FOLDERS if not (folder / sub).is_dir()]
    if missing:
        raise UserError(f"{folder} is not a diffusers folder: missing {', '.join(missing)}/ "
                        f"(expected layout: {EXPECTED_LAYOUT})")
    if not has_weights(folder):
        raise UserError(f"{folder} has no weights for one of {', '.join(WEIGHT_FOLDERS)} "
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
        if has_weights(path):
            return path
    return None


def missing_weights_error(spec: ModelSpec) -> UserError:
    return UserError(
        f"no weights found for {spec.name} ({spec.hub_ids[0]}): nothing is downloaded; "
        f"put its diffusers folder in the Hugging Face cache or pass the folder as --model DIR "
        f"(layout: {EXPECTED_LAYOUT}), or use --init random for its architecture with seeded "
        f"random weights"
    )
