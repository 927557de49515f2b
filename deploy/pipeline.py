"""deploy.Pipeline: an export folder -> images, with OpenVINO on the CPU.

Text-to-image exports (text encoder, UNet, VAE decoder) take prompts; unconditional ones
(pixel-space DDPM/DDIM: the UNet alone; latent diffusion: UNet and VQ or KL decoder) take
none and draw ``num_images`` images.

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

from deploy.feature_cache import FEATURE, CachedUNet, UncachedUNet, interval_plan, \
    parse_cache, schedule_plan
from deploy.sampler import run_sampler
from deploy.schedulers import make_scheduler, scheduler_name
from dq_export.errors import UserError, first_line
from dq_export.manifest import ir_files, read_manifest

log = logging.getLogger(__name__)

DEFAULT_OV_CONFIG = {
    # bf16-capable Xeons would otherwise silently run in bf16
    "INFERENCE_PRECISION_HINT": "f32",
    "PERFORMANCE_HINT": "LATENCY",
}
MAX_GUIDANCE = 50.0
DEFAULT_GUIDANCE = 7.5
DEFAULT_SAMPLING = {"scheduler": "pndm", "steps": 50, "eta": 0.0}


@dataclass
class GenerationResult:
    images: list  # PIL images, one per prompt (unconditional: num_images of them)
    step_seconds: list[float]  # wall time of each sampler step (UNet call + scheduler update)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per component and total
    seed: int = 0
    scheduler: str = "pndm"
    steps: int = 0
    unet_calls: dict = field(default_factory=dict)  # {"full": F, "cached": C}


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
    """The components of one export (text encoder, UNet, decoder: those it has), compiled
    with static shapes."""

    def __init__(self, root: Path, manifest: dict, device: str, ov_config: dict,
                 batch_size: int):
        self.root, self.manifest, self.device = root, manifest, device
        self.ov_config = ov_config
        self.conditional = "text_encoder" in manifest["components"]
        self.tokenizer = _load_tokenizer(root / manifest["tokenizer"]) if self.conditional \
            else None
        # generate()'s defaults: the sampling the export's model is meant for (exports made
        # before the manifest recorded it are Stable Diffusion's: PNDM, 50 steps)
        self.defaults = {**DEFAULT_SAMPLING, **manifest.get("sampling", {})}
        self._lock = threading.Lock()
        quantization = manifest.get("quantization", {})
        self.steps = StepTable.from_manifest(quantization) if "timesteps" in quantization else None
        self.cache = manifest.get("cache")  # the feature cache's schedule, if exported with one
        _warn_if_int8_saturates(manifest)
        self.batch_size = 0
        self._compiled: dict = {}
        self._requests: dict = {}
        self._family = {"siblings": 0}  # shared with every sibling (copy.copy keeps it)
        self._compile(batch_size)

    @classmethod
    def load(cls, export_dir: str | Path, *, batch_size: int = 1, verify: bool = True,
             device: str = "CPU", ov_config: dict | None = None,
             image_size: tuple[int, int] | None = None) -> Pipeline:
        """Check the manifest (and file hashes unless ``verify=False``) and compile, for the
        export's image size or ``image_size`` (height, width): the graphs take any size the
        UNet's levels divide, though calibration saw only the export's."""
        root = Path(export_dir)
        manifest = read_manifest(root, verify=verify)
        if image_size is not None:
            manifest = {**manifest, "image": resized_image(manifest["image"], image_size)}
        return cls(root, manifest, device, {**DEFAULT_OV_CONFIG, **(ov_config or {})},
                   batch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.manifest["image"]["height"], self.manifest["image"]["width"]

    def _compile(self, batch_size: int) -> None:
        """Compile every component for ``batch_size`` images (a guided UNet sees 2x)."""
        import openvino as ov

        shapes = component_shapes(self.manifest, batch_size)
        # pybind11 sets up its numpy API once per process, and two threads doing it at once
        # (two siblings' first infer) can deadlock (pybind11#4877's call_once): do it here
        ov.Tensor(np.zeros(1, np.float32)).data  # noqa: B018
        core = ov.Core()
        self._compiled = {}  # a new dict: siblings keep the models they were made with
        for name, shape in shapes.items():
            files = ir_files(self.root, self.manifest["components"][name])
            if name == "unet_shallow":  # the feature's shape, as the full UNet returns it
                shape[FEATURE] = list(self._compiled["unet"].output(FEATURE).get_shape())
            try:  # a graph edited by hand (or not verified) fails here, not mid-image
                model = core.read_model(*files)
                model.reshape({k: ov.PartialShape(v) for k, v in shape.items()})
                self._compiled[name] = core.compile_model(model, self.device, self.ov_config)
            except RuntimeError as e:
                raise UserError(f"{files[0]} could not be loaded by OpenVINO "
                                f"({first_line(e)}): re-export or restore it") from None
        self._requests = self._new_requests()
        self.batch_size = batch_size
        self.latent_shape = (batch_size, *shapes["unet"]["sample"][1:])  # x_T of one batch

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
        twin.tokenizer = copy.deepcopy(self.tokenizer)  # None for an unconditional export
        twin._lock = threading.Lock()
        twin._requests = twin._new_requests()
        return twin

    def _new_requests(self) -> dict:
        return {name: c.create_infer_request() for name, c in self._compiled.items()}

    def _run(self, name: str, inputs: dict) -> np.ndarray:
        return self._requests[name].infer(inputs)[0]

    def _run_all(self, name: str, inputs: dict) -> list[np.ndarray]:
        outputs = self._requests[name].infer(inputs)
        return [outputs[i] for i in range(len(outputs))]

    def _release(self, name: str) -> None:
        """Free a component's activation buffers once its part of the image is done: at
        512x512 the UNet holds about 0.35 GB and the VAE decoder 0.8 GB, and neither needs
        them while the other runs. Not done once siblings share the compiled models: their
        calls in flight would wait for it and then allocate again."""
        if not self._family["siblings"] and name in self._compiled:
            self._compiled[name].release_memory()

    def predict_noise(self, sample: np.ndarray, timestep: float,
                      embeddings: np.ndarray | None = None) -> np.ndarray:
        """One UNet call (the sampler's and the benchmarks'); ``embeddings`` only for a
        text-to-image export. A quantized UNet finds its calibrated step, and so its group's
        scales, from the timestep itself: one compiled graph serves every group (an export
        made before that reads the step's index as an input, fed here). Not locked: use
        ``generate`` from several threads."""
        return self._run("unet", self._unet_inputs(sample, timestep, embeddings))

    def _unet_inputs(self, sample: np.ndarray, timestep: float,
                     embeddings: np.ndarray | None) -> dict:
        inputs = {"sample": sample, "timestep": np.full(len(sample), timestep, dtype=np.float32)}
        if embeddings is not None:
            inputs["encoder_hidden_states"] = embeddings
        if self.steps is not None and self.steps.step_input:
            step_index, _ = self.steps.lookup(timestep)
            inputs[self.steps.step_input] = np.asarray(step_index, dtype=np.int64)
        return inputs

    def predict_noise_and_feature(self, sample: np.ndarray, timestep: float,
                                  embeddings: np.ndarray | None = None) -> tuple:
        """A full UNet call of a cached export: the output and the feature to reuse."""
        output, feature = self._run_all("unet", self._unet_inputs(sample, timestep, embeddings))
        return output, feature

    def predict_noise_cached(self, sample: np.ndarray, timestep: float,
                             embeddings: np.ndarray | None, feature: np.ndarray) -> np.ndarray:
        """A shallow UNet call that reuses ``feature`` from an earlier full call."""
        inputs = self._unet_inputs(sample, timestep, embeddings)
        return self._run("unet_shallow", {**inputs, FEATURE: feature})

    def denoiser(self, scheduler: str, steps: int, cache=None):
        """The UNet callable of one sampling run (``deploy.sampler.denoise``'s ``unet``),
        which counts its full and cached calls. ``cache``: None, the export's schedule if it
        has one; "auto", the export's schedule; "off", every call full; N, a full call every
        N timesteps (DeepCache's uniform interval)."""
        cache = parse_cache(cache)
        if cache is not None and cache != "off" and self.cache is None:
            raise UserError(f"cache={cache}: this export has no cache graphs; export it with "
                            "dq-export --cache, or use cache=off")
        if cache == "off" or self.cache is None:
            return UncachedUNet(self.predict_noise)
        sampler = make_scheduler(scheduler, self.manifest["scheduler"])
        sampler.set_timesteps(steps)
        if cache in (None, "auto"):
            schedule = self.cache["schedule"]
            plan = schedule_plan(sampler.timesteps, self.cache["timesteps"],
                                 schedule["full_steps"])
        else:
            plan = interval_plan(sampler.timesteps, cache)
        return CachedUNet(self.predict_noise_and_feature, self.predict_noise_cached, plan)

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

    def generate(self, prompt: str | list[str] | None = None, *,
                 negative_prompt: str | list[str] | None = None, steps: int | None = None,
                 scheduler: str | None = None, guidance: float | None = None, seed: int = 0,
                 eta: float | None = None, num_images: int = 1, cache=None,
                 progress: bool = False) -> GenerationResult:
        """Images for ``prompt`` (one per prompt), or ``num_images`` unconditional images.
        ``steps``, ``scheduler`` and ``eta`` default to the export's model's (the manifest's
        ``sampling``); ``guidance`` to 7.5 for text-to-image. ``cache`` (auto, off, or an
        interval N) defaults to the export's feature-cache schedule where it has one."""
        steps = self.defaults["steps"] if steps is None else steps
        scheduler = scheduler_name(scheduler or self.defaults["scheduler"])
        eta = self.defaults["eta"] if eta is None else eta
        if self.conditional:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            negatives = _negatives(negative_prompt, len(prompts))
            guidance = DEFAULT_GUIDANCE if guidance is None else guidance
            _check_text_settings(prompts, guidance, num_images)
            batch = len(prompts)
        else:
            _check_unconditional_settings(self.manifest["model"]["name"], prompt,
                                          negative_prompt, guidance, num_images)
            prompts = negatives = None
            batch = num_images
        _check_settings(steps, eta, self.manifest["scheduler"])
        unet = self.denoiser(scheduler, steps, cache)
        with self._lock:
            if batch != self.batch_size:
                self._compile(batch)
            return self._sample(unet, prompts, negatives, steps, scheduler, guidance, seed, eta,
                                progress)

    def _sample(self, unet, prompts, negatives, steps, scheduler, guidance, seed, eta,
                progress):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        embeddings = None
        if prompts is not None:
            # 1. Text embeddings, unconditional first: [uncond; cond] for classifier-free guidance.
            embeddings = np.concatenate([self.encode_prompts(negatives),
                                         self.encode_prompts(prompts)])
            timings["text_encoder"] = time.perf_counter() - start

        # 2. Initial noise x_T from the seed, then one UNet call per sampler step (guided for
        #    text-to-image): full, or shallow on the cached deep feature (DeepCache).
        latents, step_seconds = run_sampler(unet, embeddings, scheduler,
                                            self.manifest["scheduler"], steps, self.latent_shape,
                                            seed, guidance, eta, progress)
        timings["unet_loop"] = sum(step_seconds)
        self._release("unet")
        self._release("unet_shallow")

        # 3. Decode latents to pixels in [-1, 1] (a pixel-space model has sampled pixels
        #    already), then to 8-bit images.
        pixels = latents
        if "vae_decoder" in self._compiled:
            decode_start = time.perf_counter()
            # z = latents / scaling (exports before dq-export 0.2 folded it into the decoder)
            scaling = np.float32(self.manifest["image"].get("latent_scaling", 1.0))
            pixels = self._run("vae_decoder", {0: (latents / scaling).astype(np.float32)})
            timings["vae_decoder"] = time.perf_counter() - decode_start
            self._release("vae_decoder")
        timings["total"] = time.perf_counter() - start
        return GenerationResult(to_pil(pixels), step_seconds, timings, seed, scheduler, steps,
                                dict(unet.calls))


def component_shapes(manifest: dict, batch_size: int) -> dict[str, dict]:
    """Each component's input shapes for ``batch_size`` images at the manifest's image size
    (a guided UNet sees 2x: the unconditional and the conditional half)."""
    image, components = manifest["image"], manifest["components"]
    latent = (image["latent_channels"], image["height"] // image["vae_scale_factor"],
              image["width"] // image["vae_scale_factor"])
    conditional = "text_encoder" in components
    rows = 2 * batch_size if conditional else batch_size
    shapes = {"unet": {"sample": [rows, *latent], "timestep": [rows]}}
    if conditional:
        text = manifest["text"]
        shapes = {"text_encoder": {"input_ids": [batch_size, text["max_length"]]}, **shapes}
        shapes["unet"]["encoder_hidden_states"] = [rows, text["max_length"], text["hidden_size"]]
    if "vae_decoder" in components:
        shapes["vae_decoder"] = {0: [batch_size, *latent]}  # latent_sample (once latents)
    if "unet_shallow" in components:
        shapes["unet_shallow"] = dict(shapes["unet"])
    return shapes


def resized_image(image: dict, size: tuple[int, int]) -> dict:
    """The manifest's image entry at another (height, width): multiples of the VAE's factor
    times 8, the three halvings of Stable Diffusion's UNet."""
    step = image["vae_scale_factor"] * 8
    if any(side < step or side % step for side in size):
        raise UserError(f"image size {size[0]}x{size[1]}: height and width must be positive "
                        f"multiples of {step} for this model")
    return {**image, "height": size[0], "width": size[1]}


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise UserError(f"{folder} is missing from the export: re-export or restore it")
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{folder} holds no readable tokenizer ({first_line(e)}): re-export "
                        "or restore it") from None


def _warn_if_int8_saturates(manifest: dict) -> None:
    """An export with full-range int8 weights and int8 activations loses accuracy on a CPU
    without VNNI (dq_export.openvino_ir.cpu_isa): say so once, with the fix."""
    from dq_export.openvino_ir.cpu_isa import has_vnni

    recipe = manifest.get("recipe", {})
    int8_kernels = recipe.get("method") == "dq" and str(recipe.get("bits", "")).endswith("a8")
    if int8_kernels and recipe.get("weight_range", "full") == "full" and not has_vnni():
        log.warning("this CPU has no VNNI, so int8 kernels saturate on this export's 8-bit "
                    "weights and lose accuracy: re-export with dq-export --weight-range half "
                    "(the default on such a CPU)")


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


def _check_text_settings(prompts: list[str], guidance: float, num_images: int) -> None:
    if not prompts:
        raise UserError("no prompt given: pass at least one prompt")
    if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise UserError(f"guidance must be in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
    if num_images != 1:
        raise UserError("num_images is for unconditional exports: give one prompt per image")


def _check_unconditional_settings(model: str, prompt, negative_prompt, guidance,
                                  num_images) -> None:
    given = [name for name, value in (("the prompt", prompt),
                                      ("the negative prompt", negative_prompt),
                                      ("guidance", guidance)) if value is not None]
    if given:
        raise UserError(f"this export of {model} is unconditional and takes no prompt: drop "
                        f"{' and '.join(given)}")
    if not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"num_images must be a positive integer, got {num_images!r}")


def _check_settings(steps: int, eta: float, scheduler_config: dict) -> None:
    train_steps = scheduler_config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or not 1 <= steps <= train_steps:
        raise UserError(f"steps must be an integer in [1, {train_steps}], got {steps!r}")
    if not 0 <= eta <= 1:  # above 1 the square root in DDIM's direction term can go negative
        raise UserError(f"eta must be in [0, 1] (DDIM: 0 deterministic, 1 DDPM-like), "
                        f"got {eta!r}")
