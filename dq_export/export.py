"""The export job: model -> ONNX -> OpenVINO IR -> manifest, written atomically.

Everything is written into a hidden sibling folder that is renamed to ``--out`` only after
the manifest is written (``dq_export.staging``), so an interrupted or failed export never
leaves a folder that looks valid.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from datetime import datetime, timezone
from pathlib import Path

from calibration.collect import calibrated_timesteps, read_prompts
from dq_export import __version__
from dq_export.errors import UserError
from dq_export.filesystem import make_folder
from dq_export.layout import Layout
from dq_export.loading import model_layout
from dq_export.recipe import Recipe
from dq_export.registry import model_defaults
from dq_export.staging import staged

TARGET_CPU_FILE = "target_cpu.json"


class StageLog:
    """Prints ``[i/n] stage`` lines with their wall time, and keeps the times for the manifest."""

    def __init__(self, total: int, stream=None):
        # sys.stderr as it is now, not at import: a caller (a test) may have replaced it since
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        self.done += 1
        print(f"[{self.done}/{self.total}] {name} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        print(f"[{self.done}/{self.total}] {name}: {self.seconds[name]:.1f} s", file=self.stream,
              flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB of 2**20 bytes.

    Linux's VmHWM where there is one: ``ru_maxrss`` of a process started by another also
    counts the parent's resident memory at the start (it survives fork and exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    unit = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit, 1)


def versions() -> dict[str, str]:
    import diffusers
    import onnx
    import openvino
    import torch
    import transformers

    return {"dq_export": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__,
            "openvino": openvino.get_version(), "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def export(model: str, out: Path, recipe: Recipe, init: str = "pretrained",
           force: bool = False, prompts: Path | None = None,
           calibration_dir: Path | None = None, genai: bool | None = None,
           ray: str | None = None) -> dict:
    """Run the whole export and return the manifest written to ``out``. ``genai``: lay it
    out for OpenVINO GenAI too (None: for every text-to-image model). ``ray``: the Ray
    cluster to run the calibration batches on ("auto" or an address; None: here)."""
    from dq_export.openvino_ir.genai_layout import check_requested

    recipe.check()
    layout = model_layout(model)  # an unknown model fails here, before any heavy work
    genai = check_requested(genai, layout.conditional, model)
    if recipe.vae == "int8" and layout.decoder is None:
        raise UserError(f"{model} samples pixels and has no VAE decoder: drop --vae int8")
    if prompts is not None:
        if not layout.conditional:
            raise UserError(f"{model} is an unconditional model: it takes no --prompts")
        read_prompts(prompts)  # fail now, not after loading the model
    recipe = with_model_defaults(recipe, model, layout.conditional)
    if calibration_dir is not None and recipe.needs_trajectories:
        make_folder(calibration_dir, "--calibration-dir")
    with staged(Path(out), force) as root:
        return _export_into(model, layout, root, recipe, init, prompts, calibration_dir, genai,
                            ray)


def with_model_defaults(recipe: Recipe, model: str, conditional: bool) -> Recipe:
    """The recipe with what it leaves open filled in from the model: the papers' sampler,
    steps and eta to calibrate for, the calibration size, the text encoder's weights, the VAE
    decoder's form; and from this CPU, the int8 weights' range (``--weight-range auto``)."""
    from dq_export.openvino_ir.cpu_isa import weight_range_for_this_cpu

    spec = model_defaults(model)
    if not conditional and recipe.text_encoder_weights is not None:
        raise UserError(f"{model} has no text encoder: drop --text-encoder-weights")
    weight_range = recipe.weight_range
    if weight_range == "auto":  # int8 kernels run on int8 weights only with int8 activations
        weight_range = weight_range_for_this_cpu() if recipe.activations_quantized else "full"
    return replace(recipe, calib_prompts=recipe.calib_prompts or spec.calib_prompts,
                   weight_range=weight_range,
                   calib_scheduler=recipe.calib_scheduler or spec.sampler,
                   calib_steps=recipe.calib_steps or spec.steps,
                   calib_every=recipe.calib_every or spec.calib_every,
                   calib_eta=spec.eta if recipe.calib_eta is None else recipe.calib_eta,
                   text_encoder_weights=(("int8" if recipe.text_encoder_int8 else "fp32")
                                         if conditional else None),
                   vae=recipe.vae or default_vae(recipe, conditional))


def default_vae(recipe: Recipe, conditional: bool) -> str:
    """int8 for this project's int8-activation recipes of text-to-image models: on sd14 at
    512 the W8A8 decoder decodes in about half the FP32 decoder's time, and on the trained
    tiny-sd it costs the W8A8 pipeline about 0.1 dB (docs/method.md). fp32 otherwise: NNCF's
    baseline quantizes the UNet only, as optimum-intel does, and the unconditional models'
    decoders were not measured."""
    return "int8" if (recipe.activations_quantized and recipe.method == "dq"
                      and conditional) else "fp32"


def check_groups(recipe: Recipe, steps: int) -> None:
    """Each timestep group needs a calibrated step of its own: more groups than steps would
    silently become one group per step."""
    if recipe.groups > steps:
        every = f", --calib-every {recipe.calib_every}" if recipe.calib_every > 1 else ""
        raise UserError(f"--groups {recipe.groups} is more than the {steps} calibrated steps "
                        f"({recipe.calib_scheduler} {recipe.calib_steps} steps{every}): use "
                        f"--groups {steps} or fewer, or calibrate more steps with --calib-steps")


def _export_into(model: str, layout: Layout, root: Path, recipe: Recipe, init: str,
                 prompts: Path | None, calibration_dir: Path | None, genai: bool,
                 ray: str | None) -> dict:
    from calibration.collect import collect, load_inputs
    from dq_export.openvino_ir.genai_layout import MODEL_BIN, OWN_UNET_XML, ir_path, write_layout
    from dq_export.openvino_ir.ir_weights import share_weights
    from dq_export.loading import load_components
    from dq_export.manifest import write_manifest
    from dq_export.openvino_ir.nncf_baseline import quantize_unet_ir
    from dq_export.graph.onnx_export import export_components
    from dq_export.openvino_ir.openvino_convert import INT8_WEIGHTS, convert_to_ir
    from dq_export.graph.quantize_unet import (calibration_settings, fit_params,
                                               quantization_manifest,
                                               write_group_graphs, write_params,
                                               write_shared_graph)

    calibrates = recipe.needs_trajectories
    fits = recipe.activations_quantized and recipe.method == "dq"
    parts = 1 + layout.conditional + (layout.decoder is not None) + recipe.cache
    stage = StageLog(total=2 + 2 * parts + calibrates + fits + recipe.quantized + recipe.cache
                     + (recipe.target_cpu == "auto") + (recipe.budget is not None)
                     + (recipe.vae == "int8") + (recipe.form == "auto"))
    with stage("load model"):
        components = load_components(model, init, recipe.seed)
    if recipe.budget is not None:  # a size no allocation reaches fails before calibration
        from dq_export.mixed_export import check_reachable

        check_reachable(components.unet, recipe)
    steps = len(calibrated_timesteps(components.scheduler_config, calibration_settings(recipe)))
    if fits:  # so do more groups than calibrated steps, and a schedule the model cannot have
        check_groups(recipe, steps)
    if recipe.cache:
        from dq_export.cache_export import check_schedule
        from dq_export.graph.deep_cache import check_branch

        check_branch(components.unet, recipe.cache_branch)
        check_schedule(recipe, steps)
    size = recipe.image_size or components.image_size
    vae_factor = components.vae_factor
    if size % vae_factor:
        raise UserError(f"image size {size} is not a multiple of the VAE factor {vae_factor}")
    params = summary = None
    if calibrates:
        with stage("calibration: FP32 trajectories and per-step statistics"):
            stats, summary = collect(components, calibration_settings(recipe),
                                     read_prompts(prompts) if components.conditional else None,
                                     size, calibration_dir, ray=ray)
    if fits:
        with stage("fit activation scales per group"):
            params = fit_params(stats, summary["calibrated_timesteps"], recipe)
    onnx_paths = export_components(components, root / "onnx", size // vae_factor, recipe.opset,
                                   stage, recipe.cache_branch if recipe.cache else None)
    decoder = None
    if recipe.vae == "int8":
        decoder = _quantize_decoder(components, onnx_paths, root, recipe, summary, stage)
    graphs = dict(onnx_paths)  # what becomes each component's IR
    unets = [name for name in onnx_paths if name.startswith("unet")]  # + unet_shallow (--cache)
    unet_onnx = {name: [onnx_paths[name]] for name in unets}
    form = None
    if recipe.form == "auto":
        from dq_export import form_search

        with stage("form search: candidate UNet forms timed on this CPU"):
            recipe, params, form = form_search.search(components, onnx_paths["unet"], recipe,
                                                      stats, summary, size // vae_factor)
    target = None
    if recipe.target_cpu == "auto":
        with stage("target CPU: int8 vs FP32 time of every layer"):
            target = _profile_target_cpu(components, onnx_paths["unet"], root, recipe, params,
                                         size // vae_factor)
            params = params.without(target["kept_float"])
    mixed = None
    if recipe.budget is not None:
        from dq_export import mixed_export

        with stage("rate-distortion curves and allocation under the budget"):
            mixed = mixed_export.choose(components, params, summary, recipe, onnx_paths["unet"],
                                        size // vae_factor)
    if recipe.quantized and recipe.method == "dq":
        with stage("QDQ graphs per timestep group"):
            for name in unets:
                fp32_unet = onnx_paths[name]
                if mixed is not None:  # per-layer weights, per-group inputs (--budget)
                    group_graphs, shared_graph, plan = mixed_export.writers(mixed.plan)
                else:  # the full UNet, or a feature cache's shallow UNet (its layers only)
                    group_graphs = partial(write_group_graphs, name=name)
                    shared_graph = partial(write_shared_graph, subset=name != "unet")
                    plan = params
                unet_onnx[name] = group_graphs(fp32_unet, root / "onnx", components.unet,
                                               recipe, plan)
                graphs[name] = unet_onnx[name][0]
                if params is not None:
                    graphs[name] = shared_graph(fp32_unet, root / f"{name}_shared.onnx",
                                                components.unet, recipe, plan)
                _remove_graph(fp32_unet)
    ir_paths = {}
    for name, path in graphs.items():
        with stage(f"OpenVINO IR: {name}"):
            ir_paths[name] = convert_to_ir(
                path, ir_path(root, name), compress_to_fp16=recipe.bits == "fp16",
                int8_weights=name == "text_encoder" and recipe.text_encoder_int8)
    for name in unets:
        if graphs[name] not in unet_onnx[name]:  # the shared-scale ONNX: only its IR is kept
            _remove_graph(graphs[name])
    nncf_settings = None
    if recipe.method == "nncf":
        with stage("NNCF quantize: UNet IR"):
            fp32_xml = ir_paths["unet"]
            nncf_xml = fp32_xml.with_name("nncf.xml")
            nncf_settings = quantize_unet_ir(fp32_xml, nncf_xml, load_inputs(summary["cache_dir"]))
            _remove_graph(fp32_xml)
            nncf_xml.rename(fp32_xml)  # the UNet's IR, in its layout's place
            nncf_xml.with_suffix(".bin").rename(fp32_xml.with_suffix(".bin"))
    cache = None
    if recipe.cache:
        from dq_export.cache_export import choose_schedule

        with stage("feature cache schedule: full steps on the calibration trajectories"):
            timesteps = (summary["calibrated_timesteps"] if summary is not None else
                         calibrated_timesteps(components.scheduler_config,
                                              calibration_settings(recipe)))
            cache = choose_schedule(root, recipe, timesteps, components.unet,
                                    summary and summary["cache_dir"], ir_paths)
    with stage("tokenizer, hashes and manifest"):
        spec = model_defaults(model)
        body = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": components.source,
            "task": "text-to-image" if components.conditional else "unconditional",
            "recipe": recipe.to_dict(),
            "image": {"height": size, "width": size, "vae_scale_factor": vae_factor,
                      "latent_channels": components.latent_channels,
                      # the decoder reads latents / latent_scaling (diffusers' and GenAI's rule)
                      "latent_scaling": components.latent_scaling},
            "scheduler": components.scheduler_config,
            # dq-generate's defaults: the sampling the model's papers use
            "sampling": {"scheduler": spec.sampler, "steps": spec.steps, "eta": spec.eta},
            "components": {name: _component_entry(unet_onnx.get(name, [onnx_paths[name]]),
                                                   ir_paths[name], root)
                           for name in onnx_paths},
            "versions": versions(),
            "export_stats": {"stage_seconds": stage.seconds, "peak_rss_mb": peak_rss_mb(),
                             "machine": platform.machine(), "cpu_count": os.cpu_count()},
        }
        if components.conditional:
            components.tokenizer.save_pretrained(root / "tokenizer")
            body.update(tokenizer="tokenizer", text={
                "max_length": components.tokenizer.model_max_length,
                "hidden_size": components.text_encoder.config.hidden_size})
        if recipe.cache:  # the shallow UNet's weights are the full UNet's: one file
            shared = share_weights(ir_paths["unet_shallow"], ir_paths["unet"],
                                   ir_paths["unet"].with_suffix(".bin"))
            body["components"]["unet_shallow"]["weights"] = f"unet/{MODEL_BIN}"
            cache["weights"] = shared
        if genai:  # GenAI's UNet graph takes unet/openvino_model.xml; ours reads its weights
            body["genai"] = write_layout(root, components)
            body["components"]["unet"].update(
                openvino=f"unet/{OWN_UNET_XML}", weights=f"unet/{MODEL_BIN}")
        if components.vae is not None:
            from dq_export.graph.quantize_vae import decoder_form

            body["components"]["vae_decoder"].update(
                autoencoder=type(components.vae).__name__,
                **(decoder or {"form": decoder_form(recipe)}))
        if recipe.text_encoder_int8 and components.conditional:  # the IR's weights only
            body["components"]["text_encoder"]["openvino_weights"] = INT8_WEIGHTS
        if recipe.quantized:
            body["quantization"] = quantization_manifest(recipe, params, summary, nncf_settings)
            if mixed is not None:
                entry = mixed_export.manifest_entry(mixed, recipe, params, root, components.unet)
                body["quantization"].update(mixed_export.describe(entry), allocation=entry)
            if params is not None:
                write_params(root, params)
            if form is not None:
                body["quantization"]["form_search"] = form
            if target is not None:
                (root / TARGET_CPU_FILE).write_text(json.dumps(target, indent=1) + "\n")
                body["quantization"]["target_cpu"] = {
                    "file": TARGET_CPU_FILE, "cpu": target["cpu"],
                    "kept_float": target["kept_float"]}
        if recipe.cache:
            body["cache"] = cache
        return write_manifest(root, body)


def _profile_target_cpu(components, fp32_unet: Path, root: Path, recipe: Recipe, params,
                        latent_size: int) -> dict:
    """``--target-cpu auto``: time every layer in int8 and in FP32 on this machine, then the
    graph that choice makes against the all-int8 one."""
    from calibration.layers import attention_modules, quantized_layers
    from dq_export.openvino_ir import target_cpu
    from dq_export.graph.quantize_unet import write_shared_graph

    shapes = target_cpu.profile_shapes(components, latent_size)
    int8_unet = write_shared_graph(fp32_unet, root / "unet_profile.onnx", components.unet,
                                   recipe, params)
    chosen_unet = root / "unet_profile_chosen.onnx"
    try:
        units = set(quantized_layers(components.unet))
        if recipe.attention != "float":
            units |= set(attention_modules(components.unet))
        choice = target_cpu.choose_float_layers(fp32_unet, int8_unet, shapes, units)
        if not choice["kept_float"]:
            return choice
        write_shared_graph(fp32_unet, chosen_unet, components.unet, recipe,
                           params.without(choice["kept_float"]))
        all_int8, chosen = target_cpu.whole_call_seconds([int8_unet, chosen_unet], shapes)
        return target_cpu.confirmed(choice, all_int8, chosen)
    finally:
        _remove_graph(int8_unet)
        _remove_graph(chosen_unet)


def _quantize_decoder(components, onnx_paths: dict, root: Path, recipe: Recipe,
                      summary: dict, stage: StageLog) -> dict:
    """``--vae int8``: the QDQ decoder graph replaces the FP32 one in ``onnx_paths``;
    returns the manifest's account of it."""
    from calibration.collect import load_final_latents
    from dq_export.graph.quantize_vae import quantize_decoder

    with stage("VAE decoder: int8 scales from the final latents, QDQ graph"):
        fp32 = onnx_paths["vae_decoder"]
        onnx_paths["vae_decoder"], entry = quantize_decoder(
            components, fp32, root, recipe, load_final_latents(summary["cache_dir"]))
        _remove_graph(fp32)
    return entry


def _remove_graph(path: Path) -> None:
    """Delete an intermediate graph and its weights (.onnx + .onnx.data, or .xml + .bin)."""
    for leftover in (path, path.with_name(path.name + ".data"), path.with_suffix(".bin")):
        leftover.unlink(missing_ok=True)


def _component_entry(onnx_paths: list[Path], ir_path: Path, root: Path) -> dict:
    """{"onnx", "openvino"}; a UNet with one ONNX graph per timestep group lists them under
    "groups" beside its one OpenVINO graph."""
    if len(onnx_paths) == 1:
        return {"onnx": _rel(onnx_paths[0], root), "openvino": _rel(ir_path, root)}
    return {"groups": [{"onnx": _rel(p, root)} for p in onnx_paths],
            "openvino": _rel(ir_path, root)}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
