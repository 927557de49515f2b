"""optimum-intel's folder layout inside a text-to-image export, for OpenVINO GenAI and OVMS.

``openvino_genai.Text2ImagePipeline(export_dir, "CPU")`` (and OpenVINO Model Server's image
endpoint, which runs it) reads what optimum-intel writes: ``model_index.json``,
``scheduler/scheduler_config.json``, ``tokenizer/openvino_tokenizer.xml`` (+ detokenizer),
and ``text_encoder/``, ``unet/``, ``vae_decoder/``, each an ``openvino_model.xml/.bin`` with
its ``config.json``. The export's own IR already lives in those folders; this module adds
what GenAI needs besides:

- the UNet as GenAI feeds it: ``timestep`` int64 of shape [1] (converted to float inside),
  one output ``out_sample``. It is a second ``openvino_model.xml`` over the *same*
  ``openvino_model.bin`` as the export's own UNet graph (``dq_model.xml``: float timesteps,
  which fractional-timestep samplers need, and the feature cache's extra output), so the
  weights are on disk once;
- the configs, the model index and the tokenizer converted by openvino-tokenizers.

The VAE decoder reads unscaled latents (GenAI divides by ``scaling_factor`` itself, as
diffusers does), and every quantized UNet graph selects its step from ``timestep`` (no
``step_index`` input), so GenAI's C++ loop runs the timestep-aware quantized UNet unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dq_export.errors import UserError
from dq_export.openvino_ir.ir_weights import share_weights

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
OWN_UNET_XML = "dq_model.xml"  # the export's own UNet graph, over MODEL_BIN
GENAI_UNET_OUTPUT = "out_sample"


def check_requested(genai: bool | None, conditional: bool, model: str) -> bool:
    """Whether to write the layout: by default for every text-to-image export; asked for an
    unconditional one, a one-line error."""
    if genai and not conditional:
        raise UserError(f"{model} is unconditional: OpenVINO GenAI's Text2ImagePipeline runs "
                        "text-to-image models only; drop --genai (dq-generate runs this export)")
    return conditional if genai is None else genai


def ir_path(root: Path, component: str) -> Path:
    """Where a component's OpenVINO IR is written: its optimum-intel folder."""
    return root / component / MODEL_XML


def write_layout(root: Path, components, spec_scheduler: str | None = None) -> dict[str, str]:
    """Everything GenAI reads besides the IR files; returns {what: relative path} for the
    manifest. The UNet's own graph must be at ``unet/openvino_model.xml`` when called: it
    moves to ``unet/dq_model.xml`` and the GenAI form takes its place."""
    import diffusers

    genai_unet = write_genai_unet(root / "unet")
    components.unet.save_config(root / "unet")
    components.vae.save_config(root / "vae_decoder")
    components.text_encoder.config.to_json_file(root / "text_encoder" / "config.json")
    scheduler = dict(components.scheduler_config)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline",
             "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", scheduler.get("_class_name", "PNDMScheduler")],
             "text_encoder": ["transformers", type(components.text_encoder).__name__],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", type(components.unet).__name__],
             "vae": ["diffusers", type(components.vae).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    tokenizer = write_openvino_tokenizer(root / "tokenizer")
    return {"model_index": "model_index.json", "unet": genai_unet, **tokenizer}


def write_genai_unet(folder: Path) -> str:
    """Add GenAI's form of the UNet beside the export's own, over the same weights."""
    import openvino as ov

    own = folder / OWN_UNET_XML
    (folder / MODEL_XML).rename(own)
    core = ov.Core()
    model = core.read_model(own, folder / MODEL_BIN)
    timestep = next(p for p in model.get_parameters() if "timestep" in p.output(0).get_names())
    integer = ov.opset13.parameter(timestep.get_partial_shape(), ov.Type.i64, name="timestep")
    integer.output(0).set_names({"timestep"})
    as_float = ov.opset13.convert(integer, ov.Type.f32)
    for target in list(timestep.output(0).get_target_inputs()):
        target.replace_source_output(as_float.output(0))
    model.replace_parameter(model.get_parameters().index(timestep), integer)
    for result in model.get_results()[1:]:  # the feature cache's feature: GenAI reads one output
        model.remove_result(result)
    model.output(0).get_tensor().set_names({GENAI_UNET_OUTPUT})
    model.validate_nodes_and_infer_types()
    scratch = folder / ".genai"
    scratch.mkdir()
    try:
        ov.save_model(model, scratch / MODEL_XML, compress_to_fp16=False)
        share_weights(scratch / MODEL_XML, own, folder / MODEL_BIN)
        (scratch / MODEL_XML).rename(folder / MODEL_XML)
    finally:
        shutil.rmtree(scratch)
    return (folder / MODEL_XML).relative_to(folder.parent).as_posix()


def write_openvino_tokenizer(folder: Path) -> dict[str, str]:
    """The CLIP tokenizer saved in ``folder`` as OpenVINO models (openvino-tokenizers)."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import CLIPTokenizerFast

    tokenizer, detokenizer = convert_tokenizer(CLIPTokenizerFast.from_pretrained(folder),
                                               with_detokenizer=True)
    ov.save_model(tokenizer, folder / "openvino_tokenizer.xml")
    ov.save_model(detokenizer, folder / "openvino_detokenizer.xml")
    return {"tokenizer": "tokenizer/openvino_tokenizer.xml",
            "detokenizer": "tokenizer/openvino_detokenizer.xml"}
