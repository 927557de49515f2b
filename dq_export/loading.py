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
from dq_export.layout import Layout, read_layout
from dq_export.registry import REGISTRY, check_diffusers_folder, find_in_hf_cache, get_spec, \
    missing_weights_error, unknown_model_error

log = logging.getLogger(__name__)

TINY_TOKENIZER = REGISTRY["tiny-sd"].config_dir / "tokenizer"
INITS = ("pretrained", "random")


@dataclass
class Components:
    """The FP32 torch modules of one pipeline, plus where they came from. Unconditional models
    have no text encoder or tokenizer; pixel-space ones have no autoencoder either."""

    unet: Any
    scheduler_config: dict
    text_encoder: Any = None
    tokenizer: Any = None
    vae: Any = None  # AutoencoderKL, or VQModel (LDMPipeline's vqvae)
    latent_scaling: float = 1.0  # the UNet's latents = latent_scaling x the autoencoder's
    source: dict = field(default_factory=dict)  # written into the manifest
    image_size: int = 512

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def modules(self) -> dict:
        """The torch modules this pipeline has, by role."""
        return {name: getattr(self, name) for name in ("unet", "text_encoder", "vae")
                if getattr(self, name) is not None}


def check_model_arg(model: str) -> None:
    """Fail fast, before any heavy work, on a name that is neither registered nor a folder."""
    if model not in REGISTRY and not Path(model).is_dir():
        raise unknown_model_error(model)


def model_layout(model: str) -> Layout:
    """Which components ``model`` has, from its configs alone (no weights are read)."""
    check_model_arg(model)
    return read_layout(get_spec(model).config_dir if model in REGISTRY else Path(model))


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
            weights = folder if read_layout(folder).has_weights() else None
            if weights is None:
                log.warning("%s has no trained weights in this checkout: using seeded random "
                            "weights (seed %d)", spec.name, seed)
        else:
            weights = find_in_hf_cache(spec)
            if weights is None:
                raise missing_weights_error(spec)
            folder = weights
    elif Path(model).is_dir():
        folder = Path(model).resolve()
        source = {"kind": "folder", "name": folder.name, "path": str(folder)}
        if init == "pretrained":
            check_diffusers_folder(folder)
        weights = folder if init == "pretrained" else None
    else:
        raise unknown_model_error(model)
    source.update(init="pretrained" if weights else "random", seed=None if weights else seed)
    layout = read_layout(weights or folder)
    image_size = get_spec(model).image_size if model in REGISTRY else layout.image_size()
    parts = _load_weights(layout) if weights else _build_random(layout, seed)
    return Components(**parts, scheduler_config=json.loads(layout.scheduler_file.read_text()),
                      latent_scaling=_latent_scaling(layout, parts.get("vae")), source=source,
                      image_size=image_size)


def _classes(layout: Layout) -> dict:
    """role -> (diffusers/transformers class, subfolder) for every model of the layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel
    from transformers import CLIPTextModel

    classes = {"unet": (UNet2DConditionModel if layout.conditional else UNet2DModel, layout.unet)}
    if layout.conditional:
        classes["text_encoder"] = (CLIPTextModel, "text_encoder")
    if layout.decoder:
        classes["vae"] = (VQModel if layout.decoder == "vqvae" else AutoencoderKL, layout.decoder)
    return classes


def _load_weights(layout: Layout) -> dict:
    from transformers import CLIPTokenizer

    parts = {role: cls.from_pretrained(layout.root, subfolder=sub or None,
                                       local_files_only=True).eval()
             for role, (cls, sub) in _classes(layout).items()}
    if layout.conditional:
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(layout.root, subfolder="tokenizer",
                                                           local_files_only=True)
    return parts


def _build_random(layout: Layout, seed: int) -> dict:
    """The exact architecture in the layout's configs, with weights drawn from ``seed`` (in
    the order unet, text encoder, autoencoder, as every earlier export drew them)."""
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    parts = {}
    for role, (cls, sub) in _classes(layout).items():
        if role == "text_encoder":
            parts[role] = cls(CLIPTextConfig.from_pretrained(layout.root / sub)).eval()
        else:
            parts[role] = cls.from_config(cls.load_config(layout.root / sub)).eval()
    if layout.conditional:
        parts["tokenizer"] = _load_tokenizer(layout.root,
                                             parts["text_encoder"].config.max_position_embeddings)
    return parts


def _latent_scaling(layout: Layout, vae) -> float:
    """The factor between the autoencoder's latents and the UNet's. A KL autoencoder's config
    carries it (SD: 0.18215). LDM trained its VQ models' UNets on unscaled latents, and
    CompVis/ldm-celebahq-256's vqvae config names no factor: diffusers' VQModel default
    (0.18215), which its LDMPipeline divides by, garbles that model's images (diffusers
    issue #6725). So a VQ config without the key means 1."""
    if vae is None:
        return 1.0
    if layout.decoder == "vqvae":
        config = json.loads((layout.root / layout.decoder / "config.json").read_text())
        return float(config.get("scaling_factor", 1.0))
    return float(vae.config.scaling_factor)


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
