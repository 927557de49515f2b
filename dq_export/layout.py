"""Which pipeline a diffusers folder holds, read from the folders it has, before any weights.

- text-to-image (Stable Diffusion): ``unet/`` (UNet2DConditionModel), ``text_encoder/`` and
  ``tokenizer/`` (CLIP), ``vae/`` (AutoencoderKL), ``scheduler/``;
- unconditional, latent space (LDMPipeline, CompVis/ldm-celebahq-256): ``unet/``
  (UNet2DModel), ``vqvae/`` (VQModel) or ``vae/`` (AutoencoderKL), ``scheduler/``;
- unconditional, pixel space (DDPMPipeline): ``unet/`` and ``scheduler/``, or the flat layout
  of google/ddpm-cifar10-32 (``config.json``, weights and ``scheduler_config.json`` at the
  top).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class Layout:
    root: Path
    unet: str  # the UNet's subfolder; "" in the flat single-UNet layout
    conditional: bool  # a text encoder and tokenizer (text-to-image)
    decoder: str | None  # "vae" or "vqvae" for latent diffusion; None in pixel space

    @property
    def folders(self) -> tuple[str, ...]:
        """The subfolders this layout needs."""
        names = [self.unet] if self.unet else []
        if self.conditional:
            names += ["text_encoder", "tokenizer"]
        if self.decoder:
            names.append(self.decoder)
        if self.unet:
            names.append("scheduler")
        return tuple(names)

    @property
    def weight_folders(self) -> tuple[str, ...]:
        """Where each model's weights are ("" is the top folder, in the flat layout)."""
        return (self.unet,) + (("text_encoder",) if self.conditional else ()) + (
            (self.decoder,) if self.decoder else ())

    @property
    def scheduler_file(self) -> Path:
        return self.root / ("scheduler/scheduler_config.json" if self.unet
                            else "scheduler_config.json")

    def missing(self) -> list[str]:
        return [f"{name}/" for name in self.folders if not (self.root / name).is_dir()]

    def has_weights(self) -> bool:
        """True when every weight-carrying component has a weight file (any variant)."""
        return all(any(any((self.root / name).glob(p)) for p in WEIGHT_PATTERNS)
                   for name in self.weight_folders)

    def vae_factor(self) -> int:
        """Pixels per latent pixel: 2 ** (autoencoder levels - 1); 1 in pixel space."""
        if self.decoder is None:
            return 1
        config = json.loads((self.root / self.decoder / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)

    def image_size(self) -> int:
        """The size the model was trained at: UNet sample size times the latent factor."""
        config = json.loads((self.root / self.unet / "config.json").read_text())
        return int(config["sample_size"]) * self.vae_factor()


def read_layout(root: Path) -> Layout:
    """The layout of ``root``, from which component folders exist (none need weights yet).

    A text encoder or tokenizer folder makes it text-to-image, whose decoder is always
    ``vae/``; otherwise the decoder is whichever of ``vqvae/`` and ``vae/`` exists.
    """
    root = Path(root)
    flat = not (root / "unet").is_dir() and (root / "config.json").is_file()
    conditional = any((root / name).is_dir() for name in ("text_encoder", "tokenizer"))
    decoder = "vae" if conditional else next(
        (name for name in ("vqvae", "vae") if (root / name).is_dir()), None)
    return Layout(root, "" if flat else "unet", conditional, decoder)
