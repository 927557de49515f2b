"""deploy.Pipeline: an export folder -> images, with OpenVINO on the CPU.

Load once, generate many. ``generate`` holds a lock, so one Pipeline may be shared between
threads; calls run one at a time. For parallel requests give each worker thread a
``sibling()``: the same compiled models (one copy of the weights), its own infer requests.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploy.sampler import run_sampler
from deploy.schedulers import scheduler_name
from dq_export.errors import UserError
from dq_export.manifest import read_manifest

log = logging.getLogger(__name__)

DEFAULT_OV_CONFIG = {
    # bf16-capable Xeons would otherwise silently run in bf16
    "INFERENCE_PRECISION_HINT": "f32",
    "PERFORMANCE_HINT": "LATENCY",
}
MAX_GUIDANCE = 50.0


@dataclass
class GenerationResult:
    images: list  # PIL images, one per prompt
    step_seconds: list[float]  # wall time of each sampler step (UNet call + scheduler update)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per component and total
    seed: int = 0
    scheduler: str = "pndm"
    steps: int = 0


@dataclass
class StepTable:
    """Timestep -> (calibrated step index, group): the nearest calibrated timestep decides,
    so any step count or sampler maps onto the calibration without failing."""

    timesteps: np.ndarray
    step_to_group: list[int]
    step_input: str | None

    @classmethod
    def from_manifest(cls, quantization: dict) -> StepTable:
        return cls(np.asarray(quantization["timesteps"], dtype=np.float64),
                   quantization["step_to_group"], quantization.get("step_index_input"))

    def lookup(self, timestep: float) -> tuple[int, int]:
        step = int(np.argmin(np.abs(self.timesteps - timestep)))
        return step, self.step_to_group[step]


class Pipeline:
    """Text encoder, UNet and VAE decoder of one export, compiled with static shapes."""

    def __init__(self, root: Path, manifest: dict, device: str, ov_config: dict,
                 batch_size: int):
        from transformers import CLIPTokenizer

        self.root, self.manifest, self.device = root, manifest, device
        self.ov_config = ov_config
        self.tokenizer = CLIPTokenizer.from_pretrained(root / manifest["tokenizer"])
        self._lock = threading.Lock()
        quantization = manifest.get("quantization", {})
        self.steps = StepTable.from_manifest(quantization) if "timesteps" in quantization else None
        self.batch_size = 0
        self._compiled: dict = {}
        self._requests: dict = {}
        self._family = {"siblings": 0}  # shared with every sibling (copy.copy keeps it)
        self._compile(batch_size)

    @classmethod
    def load(cls, export_dir: str | Path, *, batch_size: int = 1, verify: bool = True,
             device: str = "CPU", ov_config: dict | None = None) -> Pipeline:
        """Check the manifest (and file hashes unless ``verify=False``) and compile."""
        root = Path(export_dir)
        manifest = read_manifest(root, verify=verify)
        return cls(root, manifest, device, {**DEFAULT_OV_CONFIG, **(ov_config or {})},
                   batch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.manifest["image"]["height"], self.manifest["image"]["width"]

    def _compile(self, batch_size: int) -> None:
        """Compile every component for ``batch_size`` prompts (the UNet sees 2x: guidance)."""
        import openvino as ov

        image, text = self.manifest["image"], self.manifest["text"]
        latent = (image["latent_channels"], image["height"] // image["vae_scale_factor"],
                  image["width"] // image["vae_scale_factor"])
        tokens = text["max_length"]
        shapes = {
            "text_encoder": {"input_ids": [batch_size, tokens]},
            "unet": {"sample": [2 * batch_size, *latent], "timestep": [2 * batch_size],
                     "encoder_hidden_states": [2 * batch_size, tokens, text["hidden_size"]]},
            "vae_decoder": {"latents": [batch_size, *latent]},
        }
        core = ov.Core()
        self._compiled = {}  # a new dict: siblings keep the models they were made with
        for name, shape in shapes.items():
            model = core.read_model(self.root / self.manifest["components"][name]["openvino"])
            model.reshape({k: ov.PartialShape(v) for k, v in shape.items()})
            self._compiled[name] = core.compile_model(model, self.device, self.ov_config)
        self._requests = self._new_requests()
        self.batch_size = batch_size
        self.latent_shape = (batch_size, *latent)  # x_T of one batch of prompts

    @property
    def optimal_requests(self) -> int:
        """How many infer requests the compiled UNet wants in flight to be kept busy
        (OpenVINO's OPTIMAL_NUMBER_OF_INFER_REQUESTS): 1 under the LATENCY hint, about one
        per stream under ``PERFORMANCE_HINT: THROUGHPUT``."""
        return int(self._compiled["unet"].get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def sibling(self) -> Pipeline:
        """A Pipeline on these compiled models with its own infer requests, lock and
        tokenizer (fast tokenizers are not thread-safe: transformers#47085). A compiled
        model runs concurrent requests on its streams and shares its weights between them,
        so ``optimal_requests`` siblings, one per thread, give the THROUGHPUT hint its
        parallelism for the memory of one. A sibling asked for another batch size compiles
        models of its own."""
        self._family["siblings"] += 1
        twin = copy.copy(self)
        twin.tokenizer = copy.deepcopy(self.tokenizer)
        twin._lock = threading.Lock()
        twin._requests = twin._new_requests()
        return twin

    def _new_requests(self) -> dict:
        return {name: c.create_infer_request() for name, c in self._compiled.items()}

    def _run(self, name: str, inputs: dict) -> np.ndarray:
        return self._requests[name].infer(inputs)[0]

    def _release(self, name: str) -> None:
        """Free a component's activation buffers once its part of the image is done: at
        512x512 the UNet holds about 0.35 GB and the VAE decoder 0.8 GB, and neither needs
        them while the other runs. Not done once siblings share the compiled models: their
        calls in flight would wait for it and then allocate again."""
        if not self._family["siblings"]:
            self._compiled[name].release_memory()

    def predict_noise(self, sample: np.ndarray, timestep: float,
                      embeddings: np.ndarray) -> np.ndarray:
        """One UNet call (the sampler's and the benchmarks'). A quantized UNet also reads the
        calibrated step's index, which selects its group's scales: one compiled graph
        serves every group. Not locked: use ``generate`` from several threads."""
        inputs = {"sample": sample, "timestep": np.full(len(sample), timestep, dtype=np.float32),
                  "encoder_hidden_states": embeddings}
        if self.steps is not None and self.steps.step_input:
            step_index, _ = self.steps.lookup(timestep)
            inputs[self.steps.step_input] = np.asarray(step_index, dtype=np.int64)
        return self._run("unet", inputs)

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Token ids -> text embeddings; prompts over the window are cut, with a warning."""
        max_length = self.tokenizer.model_max_length
        for prompt in prompts:
            n = len(self.tokenizer(prompt).input_ids)
            if n > max_length:
                log.warning("prompt is %d tokens, the text encoder reads %d: truncated (%r)",
                            n, max_length, prompt[:60])
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length,
                             truncation=True, return_tensors="np").input_ids
        return self._run("text_encoder", {"input_ids": ids.astype(np.int64)})

    def generate(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 steps: int = 50, scheduler: str = "pndm", guidance: float = 7.5, seed: int = 0,
                 eta: float = 0.0, progress: bool = False) -> GenerationResult:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        _check_settings(prompts, steps, guidance, self.manifest["scheduler"])
        with self._lock:
            if len(prompts) != self.batch_size:
                self._compile(len(prompts))
            return self._sample(prompts, negatives, steps, scheduler_name(scheduler),
                                guidance, seed, eta, progress)

    def _sample(self, prompts, negatives, steps, scheduler, guidance, seed, eta, progress):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        # 1. Text embeddings, unconditional first: [uncond; cond] as in classifier-free guidance.
        embeddings = np.concatenate([self.encode_prompts(negatives), self.encode_prompts(prompts)])
        timings["text_encoder"] = time.perf_counter() - start

        # 2. Initial noise x_T from the seed, then one guided UNet call per sampler step.
        latents, step_seconds = run_sampler(self.predict_noise, embeddings, scheduler,
                                            self.manifest["scheduler"], steps, self.latent_shape,
                                            seed, guidance, eta, progress)
        timings["unet_loop"] = sum(step_seconds)
        self._release("unet")

        # 3. Decode latents to pixels in [-1, 1], then to 8-bit images.
        decode_start = time.perf_counter()
        pixels = self._run("vae_decoder", {"latents": latents.astype(np.float32)})
        timings["vae_decoder"] = time.perf_counter() - decode_start
        self._release("vae_decoder")
        timings["total"] = time.perf_counter() - start
        return GenerationResult(to_pil(pixels), step_seconds, timings, seed, scheduler, steps)


def to_pil(pixels: np.ndarray) -> list:
    """[-1, 1] NCHW floats -> PIL images, rounding as diffusers' image processor does."""
    from PIL import Image

    images = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]


def _negatives(negative_prompt, batch: int) -> list[str]:
    if negative_prompt is None:
        return [""] * batch
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    if len(negative_prompt) != batch:
        raise UserError(f"{len(negative_prompt)} negative prompts for {batch} prompts: "
                        "give one, or one per prompt")
    return list(negative_prompt)


def _check_settings(prompts: list[str], steps: int, guidance: float, scheduler_config: dict):
    if not prompts:
        raise UserError("no prompt given: pass at least one prompt")
    train_steps = scheduler_config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or not 1 <= steps <= train_steps:
        raise UserError(f"steps must be an integer in [1, {train_steps}], got {steps!r}")
    if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise UserError(f"guidance must be in [0, {MAX_GUIDANCE:g}], got {guidance!r}")


