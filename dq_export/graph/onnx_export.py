"""torch -> ONNX for the exported components, with names the runtime relies on.

Each component gets a thin wrapper whose inputs and outputs are plain tensors, so the graph
interface is fixed here and nowhere else:

- text_encoder (text-to-image only): ``input_ids`` int64 [batch, tokens] -> ``last_hidden_state``
- unet: ``sample`` [batch, C, h, w], ``timestep`` float32 [batch] and, text-to-image only,
  ``encoder_hidden_states`` [batch, tokens, dim] -> ``noise_pred`` (the model output: epsilon
  or v); with a feature cache (``--cache``) also -> ``deep_feature``, the feature at the
  cache point (dq_export.graph.deep_cache)
- unet_shallow (``--cache`` only): the UNet's inputs and ``deep_feature`` -> ``noise_pred``
- vae_decoder (latent diffusion only): ``latent_sample`` (the scheduler's latents divided by
  the latent scaling, as diffusers and OpenVINO GenAI divide them) -> ``sample``, the image
  in [-1, 1] (optimum-intel's names); a VQ autoencoder's decoder snaps them to its codebook
  first, as LDMPipeline's ``vqvae.decode`` does
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

TWO_GB = 2 * 1024**3


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, *encoder_hidden_states):
        return self.unet(sample, timestep, *encoder_hidden_states, return_dict=False)[0]


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """The decoder on unscaled latents (the runtime divides by the latent scaling, which the
    manifest and ``vae_decoder/config.json`` carry)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def unet_input_names(components) -> list[str]:
    return ["sample", "timestep"] + (["encoder_hidden_states"] if components.conditional else [])


def unet_example(components, latent_size: int, batch: int | None = None) -> tuple:
    """Example UNet inputs: by default one sampler step of one image, which is batch 2 for a
    text-to-image model (classifier-free guidance) and batch 1 for an unconditional one."""
    batch = batch or (2 if components.conditional else 1)
    inputs = (torch.randn(batch, components.latent_channels, latent_size, latent_size),
              torch.full((batch,), 999.0))
    if components.conditional:
        cfg = components.text_encoder.config
        inputs += (torch.randn(batch, cfg.max_position_embeddings, cfg.hidden_size),)
    return inputs


def export_onnx(module: torch.nn.Module, example: tuple, path: Path, input_names: list[str],
                output_names: list[str], opset: int) -> None:
    """Trace ``module`` to ``path`` with a dynamic batch axis.

    Graphs over 2 GB go to one external data file ``<name>.data`` beside the graph (ONNX's
    protobuf limit); smaller ones stay a single file.
    """
    dynamic = {name: {0: "batch"} for name in input_names + output_names}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as scratch:
        traced = Path(scratch) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow
            torch.onnx.export(module.eval(), example, str(traced), dynamo=False,
                              opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic,
                              do_constant_folding=True)
        scattered = sum(f.stat().st_size for f in Path(scratch).iterdir())
        if scattered > TWO_GB or len(list(Path(scratch).iterdir())) > 1:
            _save_with_one_data_file(traced, path)
        else:
            shutil.move(traced, path)


def _save_with_one_data_file(traced: Path, path: Path) -> None:
    import onnx

    save_with_external_data(onnx.load(str(traced), load_external_data=True), path,
                            path.name + ".data")


def save_with_external_data(model, path: Path, location: str) -> None:
    """Save ``model`` with every tensor over 1 KB in one file ``location`` beside it.

    onnx creates that file readable by its owner only; an export is meant to be shared
    (a server often runs as another user), so it gets the usual 0644.
    """
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    (path.parent / location).chmod(0o644)


def export_components(components, out_dir: Path, latent_size: int, opset: int, stage,
                      cache_branch: int | None = None) -> dict:
    """Export the components the model has; return {component: onnx path}. With a
    ``cache_branch`` the UNet is DeepCache's pair: the full UNet, which also returns the
    feature at that branch, and the shallow ``unet_shallow``, which reads it."""
    unet, vae = components.unet, components.vae
    jobs = {}
    if components.conditional:
        tokens = components.text_encoder.config.max_position_embeddings
        jobs["text_encoder"] = (TextEncoderGraph(components.text_encoder),
                                (torch.zeros(1, tokens, dtype=torch.int64),), ["input_ids"],
                                ["last_hidden_state"])
    example, names = unet_example(components, latent_size), unet_input_names(components)
    if cache_branch is None:
        jobs["unet"] = (UNetGraph(unet), example, names, ["noise_pred"])
    else:
        from dq_export.graph.deep_cache import FEATURE, FullUNetGraph, ShallowUNetGraph

        full = FullUNetGraph(unet, cache_branch)
        with torch.no_grad():
            feature = full(*example)[1]
        jobs["unet"] = (full, example, names, ["noise_pred", FEATURE])
        jobs["unet_shallow"] = (ShallowUNetGraph(unet, cache_branch, example),
                                (*example, feature), names + [FEATURE], ["noise_pred"])
    if vae is not None:
        jobs["vae_decoder"] = (VaeDecoderGraph(vae),
                               (torch.randn(1, components.latent_channels, latent_size,
                                            latent_size),), ["latent_sample"], ["sample"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (module, example, inputs, outputs) in jobs.items():
        with stage(f"ONNX export: {name}"):
            paths[name] = out_dir / f"{name}.onnx"
            export_onnx(module, example, paths[name], inputs, outputs, opset)
    return paths
