"""The export recipe: every setting of an export, frozen, versioned and serialisable.

The command line only turns flags into a Recipe; the manifest stores ``recipe.to_dict()`` and
``Recipe.from_dict`` reads it back through an allowlist of fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from calibration.estimators import ESTIMATORS
from calibration.groups import GROUP_SPLITS
from deploy.schedulers import SCHEDULERS
from dq_export.errors import UserError

RECIPE_VERSION = 5  # 5: form; 4: vae; 3: the feature cache; 2: attention, asymmetric_activations

BITS = ("fp32", "fp16", "w8a8", "w8a16", "w4a16", "w4a8")
METHODS = ("dq", "nncf")
TARGET_CPUS = ("none", "auto")
# flags: the UNet form the flags give; auto: the fastest candidate form on the exporting CPU
# whose fidelity holds (dq_export.form_search)
FORMS = ("flags", "auto")
# float: attention products in float, which OpenVINO's CPU plugin fuses with the softmax into
# one attention kernel (the default: faster than either int8 form on sd14 at 256 and 512);
# qkv: int8 q, k, v, float softmax output (Q-Diffusion); int8: q, k, v and a uint8 softmax
# output, attention fully in int8
ATTENTIONS = ("float", "qkv", "int8")
TEXT_ENCODER_WEIGHTS = ("fp32", "int8")
VAES = ("fp32", "int8")  # the VAE decoder: as the model, or W8A8 on the final latents
# int8 weights in 8 bits (full) or 7 (half: exact on CPUs without VNNI); auto: the exporting CPU's
WEIGHT_RANGES = ("auto", "full", "half")
# The smallest calibration that still fits 4 groups: the tests' and benchmarks' tiny-sd W8A8
TINY_CALIBRATION = dict(calib_steps=10, calib_prompts=4, calib_batch=2, groups=4)


@dataclass(frozen=True)
class Recipe:
    bits: str = "fp32"
    method: str = "dq"  # dq: this project's timestep-aware PTQ; nncf: OpenVINO's own
    image_size: int | None = None  # None: the model's native size
    seed: int = 0  # seeds random initialisation (``--init random``) and calibration noise
    opset: int = 17
    # timestep-aware quantization
    groups: int = 4  # timestep groups, each with its own activation scales
    group_split: str = "auto"  # boundaries: uniform along the trajectory, or from statistics
    estimator: str = "mse"  # activation range estimator
    time_tables: bool = True  # per-step scales on the time-embedding path (TFMQ-DM)
    split_shortcut: bool = True  # separate scales for the two halves of skip concats
    attention: str = "float"  # what of attention's Q.K^T and A.V is int8 (ATTENTIONS)
    asymmetric_activations: bool = True  # uint8 + zero point for signed layer inputs
    target_cpu: str = "none"  # auto: float inputs where int8 is not faster on this CPU
    form: str = "flags"  # auto: attention, zero points and split chosen by timing (FORMS)
    text_encoder_weights: str | None = None  # None: int8 for integer recipes, else fp32
    vae: str | None = None  # int8: the decoder in W8A8 (final latents); None: the default
    weight_range: str = "auto"  # int8 weights' range (WEIGHT_RANGES); the export resolves auto
    budget: str | None = None  # mixed precision under "size=...,latency=..." (rate-distortion)
    # deep-feature cache (DeepCache): a full and a shallow UNet, and which steps run in full
    cache: bool = False
    cache_branch: int = 0  # DeepCache's branch id: where the shallow branch reads the feature
    cache_steps: int | None = None  # K full steps chosen by DP; None: DEFAULT_CACHE_FRACTION
    cache_interval: int | None = None  # instead of the DP: every N-th calibrated step in full
    # calibration: the deployment the scales are fitted for; None: the model's default (the
    # registry's sampling and calibration size; PNDM 50 at every step for a folder)
    calib_scheduler: str | None = None
    calib_steps: int | None = None
    calib_prompts: int | None = None  # prompts, or sampled images for an unconditional model
    calib_every: int | None = None
    calib_eta: float | None = None  # DDIM's eta along the calibration trajectories
    calib_batch: int = 4
    version: int = RECIPE_VERSION

    @property
    def quantized(self) -> bool:
        return self.bits not in ("fp32", "fp16")

    @property
    def activations_quantized(self) -> bool:
        return self.bits.endswith("a8")

    @property
    def text_encoder_int8(self) -> bool:
        """Weight-only int8 for the text encoder's IR: the default of every integer recipe,
        as in optimum-intel's 8-bit exports. It is a quarter of the FP32 weights in memory,
        and the CPU plugin keeps the weights int8 (its FullyConnected decompresses them)."""
        return (self.text_encoder_weights or ("int8" if self.quantized else "fp32")) == "int8"

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
        if data.get("version", RECIPE_VERSION) < 2:  # (version 3 only added fields)
            data = {"attention": "float", "asymmetric_activations": False, **data}
        return cls(**data)

    def check(self) -> Recipe:
        """Validate every field; a UserError names the field and the valid values."""
        choices = {"bits": BITS, "method": METHODS, "estimator": ESTIMATORS,
                   "group_split": GROUP_SPLITS, "calib_scheduler": SCHEDULERS,
                   "target_cpu": TARGET_CPUS, "text_encoder_weights": TEXT_ENCODER_WEIGHTS,
                   "attention": ATTENTIONS, "weight_range": WEIGHT_RANGES, "vae": VAES,
                   "form": FORMS}
        for name, valid in choices.items():
            optional = name in ("calib_scheduler", "text_encoder_weights", "vae")
            if getattr(self, name) not in valid and not (optional and getattr(self, name) is None):
                raise UserError(f"{name} {getattr(self, name)!r} is not valid: use one of "
                                f"{', '.join(valid)}")
        for name in ("groups", "calib_steps", "calib_prompts", "calib_every", "calib_batch",
                     "cache_steps", "cache_interval"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.calib_eta is not None and not 0 <= self.calib_eta <= 1:
            raise UserError(f"calib_eta must be in [0, 1], got {self.calib_eta}")
        if self.method == "nncf" and self.bits != "w8a8":
            raise UserError("--method nncf exports W8A8 only (OpenVINO's own post-training "
                            "quantization): use --bits w8a8")
        if self.vae == "int8" and not self.activations_quantized:
            raise UserError(f"--vae int8 fits the decoder's activation scales on the "
                            f"calibration of an int8-activation recipe, and --bits {self.bits} "
                            "has none: use --bits w8a8 or w4a8, or --vae fp32")
        if self.target_cpu != "none" and not (self.activations_quantized
                                              and self.method == "dq"):
            raise UserError("--target-cpu chooses int8 activations per layer: it needs "
                            "--bits w8a8 or w4a8 with --method dq")
        if self.form == "auto" and not (self.activations_quantized and self.method == "dq"
                                        and self.budget is None):
            raise UserError("--form auto times the forms of the int8-activation UNet: it needs "
                            "--bits w8a8 or w4a8 with --method dq, without --budget")
        if self.budget is not None:
            from calibration.allocation import parse_budget

            parse_budget(self.budget)
            if self.bits != "w8a8" or self.method != "dq" or self.target_cpu != "none":
                raise UserError("--budget allocates precisions per layer and group from "
                                "W8A8's calibration: use --bits w8a8 --method dq, without "
                                "--target-cpu (a latency budget times this CPU itself)")
        if self.image_size is not None:
            check_image_size(self.image_size)
        if self.cache:
            self._check_cache()
        return self

    def _check_cache(self) -> None:
        if self.cache_branch < 0:
            raise UserError(f"--cache-branch must be at least 0 (0 is the shallowest), got "
                            f"{self.cache_branch}")
        if self.cache_steps is not None and self.cache_interval is not None:
            raise UserError("--cache-steps (K steps chosen by DP) and --cache-interval (every "
                            "N-th step) are two schedules: give one")
        if self.method == "nncf":
            raise UserError("--cache exports this project's quantized UNet pair; NNCF's "
                            "baseline has none: drop --cache or use --method dq")
        if self.budget is not None:
            raise UserError("--cache and --budget cannot be combined yet: the mixed-precision "
                            "graphs have no shallow UNet")

    @property
    def needs_trajectories(self) -> bool:
        """Whether the export runs the FP32 calibration trajectories: to fit activation
        scales, or to measure the errors the cache schedule's DP minimises."""
        return self.activations_quantized or (self.cache and self.cache_interval is None)


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
