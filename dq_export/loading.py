"""Turn ``--model`` and ``--init`` into torch components, without ever downloading.

Sources, in the order tried: a registry name with ``--init random`` (its repo configs,
seeded weights); a registry name's embedded or cached weights; a local diffusers folder.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dq_export.errors import UserError
from dq_export.registry import REGISTRY, check_diffusers_folder, find_in_hf_cache, get_spec, \
    has_weights, missing_weights_error, unknown_model_error

log = logging.getLogger(__name__)

TINY_TOKENIZER = REGISTRY["tiny-sd"].config_dir / "tokenizer"
INITS = ("pretrained", "random")


@dataclass
class Components:
    """The FP32 torch modules of a Stable-Diffusion-structured pipeline, plus where they came from."""

    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler_config: dict
    source: dict = field(default_factory=dict)  # written into the manifest
    image_size: int = 512


def check_model_arg(model: str) -> None:
    """Fail fast, before any heavy work, on a name that is neither registered nor a folder."""
    if model not in REGISTRY and not Path(model).is_dir():
        raise unknown_model_error(model)


def load_components(model: str, init: str = "pretrained", seed: int = 0) -> Components:
    """Load (or build with seeded random weights) the components named by ``model``."""
    if init not in INITS:
        raise UserError(f"unknown --init {init!r}: use one of {', '.join(INITS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach a hub
    if model in REGISTRY:
        spec = get_spec(model)
        source = {"kind": "registry", "name": spec.name, "hub_id": spec.hub_ids[0] if spec.hub_ids
                  else None}
        if init == "random":
            folder, weights = spec.config_dir, None
        elif spec.embedded:
            folder = spec.config_dir
            weights = folder if has_weights(folder) else None
            if weights is None:
                log.warning("%s has no trained weights in this checkout: using seeded random "
                            "weights (seed %d)", spec.name, seed)
        else:
            weights = find_in_hf_cache(spec)
            if weights is None:
                raise missing_weights_error(spec)
            folder = weights
        image_size = spec.image_size
    elif Path(model).is_dir():
        folder = Path(model).resolve()
        source = {"kind": "folder", "name": folder.name, "path": str(folder)}
        if init == "pretrained":
            check_diffusers_folder(folder)
        weights = folder if init == "pretrained" else None
        image_size = _folder_image_size(folder)
    else:
        raise unknown_model_error(model)
    source.update(init="pretrained" if weights else "random", seed=None if weights else seed)
    parts = _load_weights(weights) if weights else _build_random(folder, seed)
    return Components(*parts, scheduler_config=_scheduler_config(folder), source=source,
                      image_size=image_size)


def _load_weights(folder: Path) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kwargs)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kwargs)
    return tuple(m.eval() for m in (unet, text_encoder, vae)) + (tokenizer,)


def _build_random(folder: Path, seed: int) -> tuple:
    """The exact architecture in ``folder``'s configs, with weights drawn from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    tokenizer = _load_tokenizer(folder, text_encoder.config.max_position_embeddings)
    return tuple(m.eval() for m in (unet, text_encoder, vae)) + (tokenizer,)


def _load_tokenizer(folder: Path, max_length: int):
    """The folder's own tokenizer, or tiny-sd's vocabulary when the folder ships none.

    Real CLIP vocabularies cannot be downloaded here; for random weights any tokenizer that
    yields ids inside the text encoder's vocabulary is as good as the real one.
    """
    from transformers import CLIPTokenizer

    own = folder / "tokenizer"
    if (own / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(own)
    log.warning("%s ships no vocabulary: using tiny-sd's (fine for random weights)", folder.name)
    return CLIPTokenizer.from_pretrained(TINY_TOKENIZER, model_max_length=max_length)


def _scheduler_config(folder: Path) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def _folder_image_size(folder: Path) -> int:
    """Image size a diffusers folder was trained at: UNet sample size times the VAE factor."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
