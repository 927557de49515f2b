"""Unconditional models end to end on the tiny registry entries (seeded random weights):
pixel space (tiny-ddpm: UNet2DModel alone) and VQ latents (tiny-ldm: UNet2DModel + VQModel),
against diffusers' DDIM and LDM pipelines, then W8A8."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import diffusers_scheduler
from deploy import Pipeline
from deploy.schedulers import SCHEDULERS
from dq_export.errors import UserError
from dq_export.loading import load_components
from dq_export.recipe import TINY_CALIBRATION, Recipe

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def export_tiny(model, root, **recipe):
    from dq_export.export import export

    out = root / model
    export(model, out, Recipe(seed=0, **recipe), init="random",
           calibration_dir=root / "calibration" if recipe.get("bits") == "w8a8" else None)
    return out


@pytest.fixture(scope="module")
def ddpm_fp32(tmp_path_factory):
    return export_tiny("tiny-ddpm", tmp_path_factory.mktemp("ddpm"), bits="fp32")


@pytest.fixture(scope="module")
def ldm_fp32(tmp_path_factory):
    return export_tiny("tiny-ldm", tmp_path_factory.mktemp("ldm"), bits="fp32")


@pytest.fixture(scope="module")
def ldm_w8a8(tmp_path_factory):
    """tiny-ldm at W8A8: 4 auto groups, calibrated on 4 images x 10 DDIM steps."""
    return export_tiny("tiny-ldm", tmp_path_factory.mktemp("ldm-w8a8"), bits="w8a8",
                       **TINY_CALIBRATION)


def diffusers_images(model, pipeline_cls, scheduler, steps, seed, eta, batch=2):
    """diffusers' own pipeline on the weights the export was made from, in 8-bit levels."""
    c = load_components(model, "random", seed=0)
    kwargs = {"unet": c.unet, "scheduler": diffusers_scheduler(scheduler, c.scheduler_config)}
    if c.vae is not None:
        # the scaling the hub's fix for CompVis/ldm-celebahq-256 states (diffusers #6725): 1
        c.vae.register_to_config(scaling_factor=1.0)
        kwargs["vqvae"] = c.vae
    pipe = pipeline_cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=batch, num_inference_steps=steps, eta=eta, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images
    return (images * 255).round().astype(np.int16)


def pixels(result):
    return np.stack([np.asarray(image) for image in result.images]).astype(np.int16)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pixel_space_export_matches_diffusers_ddim_pipeline(ddpm_fp32, eta):
    """DDIMPipeline draws x_T and, with eta 1, every step's noise from the generator: the
    same seed gives the same two images, within one 8-bit level."""
    from diffusers import DDIMPipeline

    ours = Pipeline.load(ddpm_fp32).generate(steps=10, seed=3, eta=eta, num_images=2)
    reference = diffusers_images("tiny-ddpm", DDIMPipeline, "ddim", 10, 3, eta)
    assert reference.shape == (2, 16, 16, 3) and reference.std() > 10
    assert np.abs(pixels(ours) - reference).max() <= 1


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_vq_latent_export_matches_diffusers_ldm_pipeline(ldm_fp32, scheduler):
    """LDMPipeline: x_T, every sampler's steps and vqvae.decode (the codebook lookup
    included) against our graphs (LDMPipeline passes no generator to the step, so eta 0)."""
    from diffusers import LDMPipeline

    ours = Pipeline.load(ldm_fp32).generate(steps=8, scheduler=scheduler, seed=5, num_images=2)
    reference = diffusers_images("tiny-ldm", LDMPipeline, scheduler, 8, 5, 0.0)
    assert reference.shape == (2, 32, 32, 3) and reference.std() > 10
    assert np.abs(pixels(ours) - reference).max() <= 1


def test_manifest_holds_only_the_components_the_model_has(ddpm_fp32, ldm_fp32):
    ddpm = json.loads((ddpm_fp32 / "manifest.json").read_text())
    ldm = json.loads((ldm_fp32 / "manifest.json").read_text())
    assert ddpm["task"] == ldm["task"] == "unconditional"
    assert set(ddpm["components"]) == {"unet"} and ddpm["image"]["vae_scale_factor"] == 1
    assert set(ldm["components"]) == {"unet", "vae_decoder"}
    assert ldm["components"]["vae_decoder"]["autoencoder"] == "VQModel"
    assert ldm["sampling"] == {"scheduler": "ddim", "steps": 20, "eta": 0.0}
    assert "text" not in ldm and not (ldm_fp32 / "tokenizer").exists()
    assert ddpm["recipe"]["text_encoder_weights"] is None
    graph = onnx.load(str(ddpm_fp32 / "onnx" / "unet.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["sample", "timestep"]


def test_generation_defaults_and_input_checks(ldm_fp32):
    from deploy.server import create_app

    pipe = Pipeline.load(ldm_fp32)
    result = pipe.generate(num_images=3)  # the manifest's sampling: DDIM, 20 steps
    assert (result.scheduler, result.steps, len(result.images)) == ("ddim", 20, 3)
    assert set(result.timings) == {"unet_loop", "vae_decoder", "total"}
    for kwargs, message in (({"prompt": "a face"}, "unconditional and takes no prompt"),
                            ({"guidance": 3.0}, "drop guidance"),
                            ({"num_images": 0}, "num_images"), ({"eta": -1.0}, "eta"),
                            ({"eta": 1.5}, "eta")):
        with pytest.raises(UserError, match=message):
            pipe.generate(**kwargs)
    with pytest.raises(UserError, match="dq-serve serves text-to-image"):
        create_app(pipe)


def test_dq_generate_needs_no_prompt_and_refuses_one(ddpm_fp32, tmp_path):
    out = tmp_path / "cifar.png"
    done = subprocess.run([sys.executable, "-m", "deploy.cli", str(ddpm_fp32), "--num-images",
                           "2", "--eta", "1", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps"] == 20 and summary["scheduler"] == "ddim"
    assert len(summary["images"]) == 2
    refused = subprocess.run([sys.executable, "-m", "deploy.cli", str(ddpm_fp32), "--prompt",
                              "a cat", "--out", str(out)], capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "takes no prompt" in refused.stderr


def test_dq_serve_refuses_an_unconditional_export_at_start_up(ddpm_fp32):
    done = subprocess.run([sys.executable, "-m", "deploy.server_cli", str(ddpm_fp32),
                           "--port", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "dq-serve serves text-to-image" in done.stderr


def test_unconditional_export_refuses_text_settings(tmp_path):
    from dq_export.export import export

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(UserError, match="takes no --prompts"):
        export("tiny-ddpm", tmp_path / "a", Recipe(bits="w8a8"), init="random", prompts=prompts)
    with pytest.raises(UserError, match="no text encoder"):
        export("tiny-ldm", tmp_path / "b", Recipe(bits="w8a8", text_encoder_weights="int8"),
               init="random")
    assert not list(tmp_path.glob("*/"))  # nothing written


def test_w8a8_groups_time_tables_and_split_shortcut(ldm_w8a8):
    """Q-Diffusion's split shortcut and TFMQ-DM's per-step time-embedding scales on
    UNet2DModel's blocks; the deployed UNet close to torch (but quantized) at the first,
    middle and last calibrated step; a whole image through the W8A8 pipeline."""
    from calibration.collect import load_inputs
    from calibration.layers import shortcut_splits

    manifest = json.loads((ldm_w8a8 / "manifest.json").read_text())
    quantization = manifest["quantization"]
    calibration = quantization["calibration"]
    assert calibration["images"] == calibration["samples_per_step"] == 4
    assert "prompts" not in calibration and calibration["scheduler"] == "ddim"
    assert len(quantization["groups"]) == 4 and len(set(quantization["step_to_group"])) == 4
    activations = json.loads((ldm_w8a8 / "quant_params.json").read_text())["activations"]
    steps = len(quantization["timesteps"])
    tables = {k for k, q in activations.items() if q["step_scales"] is not None}
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= tables
    assert any(k.endswith("time_emb_proj") for k in tables)
    assert all(len(activations[k]["step_scales"]) == steps for k in tables)
    components = load_components("tiny-ldm", "random", seed=0)
    splits = shortcut_splits(components.unet)
    assert splits and all(f"{name}#{half}" in activations for name in splits for half in (0, 1))
    group0 = onnx.load(str(ldm_w8a8 / "onnx" / "unet_group0.onnx"), load_external_data=False)
    assert sum(n.name.endswith("/SplitAdd") for n in group0.graph.node) == len(splits)
    assert [i.name for i in group0.graph.input] == ["sample", "timestep"]  # step: in the graph
    assert any(n.op_type == "ArgMin" for n in group0.graph.node)

    pipe = Pipeline.load(ldm_w8a8)
    calls = {int(c["timestep"][0]): c for c in load_inputs(calibration["cache_dir"])}
    timesteps = quantization["timesteps"]
    for t in (timesteps[0], timesteps[steps // 2], timesteps[-1]):
        sample, timestep = calls[t]["sample"][:1], calls[t]["timestep"][:1]
        with torch.no_grad():
            expected = components.unet(torch.from_numpy(sample),
                                       torch.from_numpy(timestep)).sample.numpy().ravel()
        got = pipe.predict_noise(sample, float(timestep[0])).ravel()
        cosine = got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected))
        assert 0.99 < cosine < 0.99999, (timestep, cosine)
    assert pixels(pipe.generate(seed=1)).std() > 10


def test_model_zoo_rows_for_unconditional_exports(ddpm_fp32, ldm_w8a8, tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "model_zoo.py"), str(ddpm_fp32),
                           str(ldm_w8a8), "--calls", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fp32, w8a8 = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert set(fp32["params"]) == {"unet"} and set(w8a8["params"]) == {"unet", "vae"}
    assert fp32["unet_batch"] == w8a8["unet_batch"] == 1  # one image, no guidance
    assert min(fp32["cosine_vs_torch"]) > 0.99999
    assert len(w8a8["cosine_vs_torch"]) == 3 and 0.99 < min(w8a8["cosine_vs_torch"]) < 0.99999
    assert w8a8["timesteps"] == [900.0, 400.0, 0.0]  # first, middle, last of 10 calibrated
    assert "| tiny-ldm | random | w8a8 | 32 | 0.7 | - | 0.2 |" in done.stdout


def test_prompt_benchmarks_refuse_unconditional_exports(ddpm_fp32, tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "image_latency.py"),
                           f"fp32={ddpm_fp32}", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unconditional export" in done.stderr and "model_zoo.py" in done.stderr


def test_flat_folder_and_vq_scaling_factor(tmp_path):
    """google/ddpm-cifar10-32's flat layout loads from a local folder, bit-exactly; a VQ
    config's scaling_factor counts only when the file states it (LDM's latents are
    unscaled)."""
    flat = tmp_path / "flat"
    tiny = load_components("tiny-ddpm", "random", seed=4)
    tiny.unet.save_pretrained(flat)
    (flat / "scheduler_config.json").write_text(json.dumps(tiny.scheduler_config))
    loaded = load_components(str(flat))
    assert loaded.source["init"] == "pretrained" and loaded.image_size == 16
    assert loaded.vae is None and loaded.text_encoder is None
    for a, b in zip(tiny.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    ldm = load_components("tiny-ldm", "random", seed=0)
    assert ldm.latent_scaling == 1.0 and ldm.vae.config.scaling_factor == 0.18215
    folder = tmp_path / "ldm"
    for name, module in (("unet", ldm.unet), ("vqvae", ldm.vae)):
        module.save_pretrained(folder / name)  # save_pretrained writes every key: 0.18215
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(ldm.scheduler_config))
    assert load_components(str(folder)).latent_scaling == 0.18215
