"""The export recipe: every setting of an export, frozen, versioned and serialisable.

The command line only turns flags into a Recipe; the manifest stores ``recipe.to_dict()`` and
``Recipe.from_dict`` reads it back through an allowlist of fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from dq_export.errors import UserError

RECIPE_VERSION = 1

BITS = ("fp32", "fp16", "w8a8", "w8a16", "w4a16", "w4a8")
# Settings this version can export; the others parse (they are valid recipes) but are
# refused by the exporter with a message saying so.
EXPORTABLE_BITS = ("fp32", "fp16")


@dataclass(frozen=True)
class Recipe:
    bits: str = "fp32"
    image_size: int | None = None  # None: the model's native size
    seed: int = 0  # seeds random initialisation (``--init random``)
    opset: int = 17
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise UserError(f"recipe has unknown fields {sorted(unknown)}: written by a newer "
                            "dq-export? upgrade dq-export or re-export")
        if data.get("version", RECIPE_VERSION) > RECIPE_VERSION:
            raise UserError(f"recipe version {data['version']} is newer than this dq-export "
                            f"understands ({RECIPE_VERSION}): upgrade dq-export")
        return cls(**data)


def parse_bits(text: str) -> str:
    """Normalise and validate ``--bits``; explain what OpenVINO on CPU cannot execute."""
    bits = text.strip().lower()
    if bits in BITS:
        return bits
    if bits.startswith("w") and "a" in bits and bits.split("a")[-1] in ("2", "3", "4"):
        raise UserError(f"--bits {text}: OpenVINO on CPU has no kernels for activations below "
                        f"8 bits; use w4a8 or w4a16 (valid: {', '.join(BITS)})")
    raise UserError(f"--bits {text!r} is not supported: use one of {', '.join(BITS)}")


def check_image_size(size: int) -> int:
    if size <= 0 or size % 8:
        raise UserError(f"image size {size} is not a positive multiple of 8 "
                        f"(latents are 1/8 or 1/4 of the image): try {max(8, round(size / 8) * 8)}")
    return size
