"""The feature cache (DeepCache) on tiny models: the split against the deepcache package, the
OpenVINO pipeline against diffusers' torch pipeline under DeepCacheSDHelper, the quantized
pair's shared scales, the schedule's DP and its mapping onto any sampler, and bad input."""

from __future__ import annotations

import itertools
import json
import types

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from onnx import numpy_helper
from test_cli import assert_one_line_error, run
from test_pipeline import PROMPT, torch_reference

from calibration.cache_schedule import dp_full_steps, schedule_error, uniform_full_steps
from deploy import Pipeline
from deploy.feature_cache import interval_plan, schedule_plan
from deploy.schedulers import make_scheduler
from dq_export.graph.deep_cache import (FullUNetGraph, ShallowUNetGraph, feature_module,
                                        valid_branches)
from dq_export.errors import UserError
from dq_export.loading import load_components
from dq_export.manifest import ir_files
from dq_export.recipe import TINY_CALIBRATION, Recipe


@pytest.fixture(scope="module")
def cached_fp32(tmp_path_factory):
    """tiny-sd (seed 0) FP32 with the feature cache at branch 0, every 3rd step in full."""
    from dq_export.export import export

    out = tmp_path_factory.mktemp("cache") / "tiny-sd-fp32-cache"
    export("tiny-sd", out, Recipe(bits="fp32", seed=0, cache=True, cache_interval=3),
           init="random")
    return out


@pytest.fixture(scope="module")
def cached_w8a8(tmp_path_factory):
    """tiny-sd (seed 0) W8A8, 4 groups, with the cache and the DP schedule (the default K)."""
    from dq_export.export import export

    root = tmp_path_factory.mktemp("cache-w8a8")
    out = root / "tiny-sd-w8a8-cache"
    export("tiny-sd", out, Recipe(bits="w8a8", seed=0, cache=True, **TINY_CALIBRATION),
           init="random", calibration_dir=root / "calibration")
    return out


def _inputs(components, batch=2, latent=8):
    torch.manual_seed(0)
    x = torch.randn(batch, components.unet.config.in_channels, latent, latent)
    text = ()
    if components.conditional:
        cfg = components.text_encoder.config
        text = (torch.randn(batch, cfg.max_position_embeddings, cfg.hidden_size),)
    return x, x + 0.1 * torch.randn_like(x), text


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-ddpm"])
def test_full_and_shallow_pass_are_deepcache_helpers_steps(model):
    """Every cache point of a UNet2DConditionModel and a UNet2DModel: the full pass and the
    shallow pass on its feature give exactly what DeepCacheSDHelper's full and cached steps
    give."""
    from DeepCache import DeepCacheSDHelper

    components = load_components(model, "random", 0)
    unet = components.unet.eval()
    x0, x1, text = _inputs(components)
    timesteps = torch.tensor([999, 979])
    for branch in valid_branches(unet):
        pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=timesteps))
        helper = DeepCacheSDHelper(pipe)
        helper.set_params(cache_interval=2, cache_branch_id=branch)
        helper.enable()
        with torch.no_grad():
            expected = [unet(x, t, *text, return_dict=False)[0]
                        for x, t in ((x0, timesteps[0]), (x1, timesteps[1]))]
        helper.disable()
        with torch.no_grad():
            full, feature = FullUNetGraph(unet, branch)(x0, timesteps[0], *text)
            cached = ShallowUNetGraph(unet, branch, (x1, timesteps[1], *text))(
                x1, timesteps[1], *text, feature)
            fresh = unet(x1, timesteps[1], *text, return_dict=False)[0]
        assert torch.equal(full, expected[0]) and torch.equal(cached, expected[1]), branch
        assert not torch.allclose(cached, fresh, atol=1e-3), branch  # the reuse is real


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler"])
def test_openvino_cached_pipeline_matches_deepcache_torch(cached_fp32, scheduler):
    """The reference oracle: our OpenVINO cached pipeline against diffusers' torch pipeline
    under the deepcache package's DeepCacheSDHelper, same interval (3) and branch (0): every
    pixel within one 8-bit level; and both differ from the uncached image."""
    from DeepCache import DeepCacheSDHelper
    from diffusers import StableDiffusionPipeline

    pipe = Pipeline.load(cached_fp32)
    ours = pipe.generate(PROMPT, steps=10, scheduler=scheduler, seed=1, cache=3)
    uncached = pipe.generate(PROMPT, steps=10, scheduler=scheduler, seed=1, cache="off")
    components = load_components("tiny-sd", "random", seed=0)
    reference_pipe = types.SimpleNamespace(unet=components.unet, scheduler=None)
    helper = DeepCacheSDHelper(reference_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)

    original = StableDiffusionPipeline.__call__

    def cached_call(self, *args, **kwargs):  # enable once the pipeline's scheduler is made
        reference_pipe.scheduler = self.scheduler
        helper.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            helper.disable()

    StableDiffusionPipeline.__call__ = cached_call
    try:
        reference = torch_reference(scheduler, 10, seed=1, components=components)[0]
    finally:
        StableDiffusionPipeline.__call__ = original
    pixels = np.asarray(ours.images[0]).astype(np.int16)
    assert np.abs(pixels - reference).max() <= 1
    assert np.abs(pixels - np.asarray(uncached.images[0]).astype(np.int16)).max() > 4
    calls = len(make_timesteps(scheduler, pipe.manifest["scheduler"], 10))
    assert ours.unet_calls == {"full": sum(interval_plan(
        make_timesteps(scheduler, pipe.manifest["scheduler"], 10), 3)),
        "cached": calls - ours.unet_calls["full"]}
    assert uncached.unet_calls == {"full": calls, "cached": 0}


def make_timesteps(scheduler: str, config: dict, steps: int) -> list[float]:
    sampler = make_scheduler(scheduler, config)
    sampler.set_timesteps(steps)
    return [float(t) for t in sampler.timesteps]


def test_quantized_pair_shares_groups_scales_and_tables(cached_w8a8):
    """The shallow UNet's quantizers are a subset of the full UNet's, with the same scale in
    every group and the same per-step tables; the IR has the standard inputs plus the
    feature; both graphs are listed, hashed and loaded."""
    manifest = json.loads((cached_w8a8 / "manifest.json").read_text())
    full_groups = manifest["components"]["unet"]["groups"]
    shallow_groups = manifest["components"]["unet_shallow"]["groups"]
    assert len(full_groups) == len(shallow_groups) == 4
    for full_entry, shallow_entry in zip(full_groups, shallow_groups):
        full = _initializers(cached_w8a8 / full_entry["onnx"])
        shallow = _initializers(cached_w8a8 / shallow_entry["onnx"])
        scales = [k for k in shallow if k.endswith(".y_scale") or k.endswith("y_scale_table")]
        assert scales and set(scales) <= set(full)
        assert len(scales) < len([k for k in full if k.endswith(".y_scale")])
        for key in scales + [k for k in shallow if k.endswith("weight_quantized")]:
            np.testing.assert_array_equal(shallow[key], full[key])
    assert "onnx/unet_shallow_weights.data" in manifest["files"]

    core = ov.Core()
    full_ir = core.read_model(*ir_files(cached_w8a8, manifest["components"]["unet"]))
    shallow_ir = core.read_model(*ir_files(cached_w8a8, manifest["components"]["unet_shallow"]))
    shared = manifest["cache"]["weights"]  # its weights are the full UNet's, in one file
    assert shared["appended_bytes"] < 0.01 * shared["shared_bytes"]
    assert not list((cached_w8a8 / "unet_shallow").glob("*.bin"))
    assert [o.get_any_name() for o in full_ir.outputs] == ["noise_pred", "deep_feature"]
    assert {i.get_any_name() for i in shallow_ir.inputs} == {
        "sample", "timestep", "encoder_hidden_states", "deep_feature"}


def _initializers(path) -> dict:
    model = onnx.load(str(path), load_external_data=True)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_dp_schedule_in_the_manifest_drives_generation(cached_w8a8, tmp_path):
    """The default schedule: a third of the calibrated steps in full (step 0 among them),
    chosen by DP on the measured errors; dq-generate follows it and reports the calls."""
    manifest = json.loads((cached_w8a8 / "manifest.json").read_text())
    cache = manifest["cache"]
    steps = len(cache["timesteps"])
    full_steps = cache["schedule"]["full_steps"]
    assert cache["schedule"]["kind"] == "dp" and cache["branch"] == 0
    assert full_steps[0] == 0 and len(full_steps) == -(-steps // 3)
    errors = json.loads((cached_w8a8 / cache["errors_file"]).read_text())
    full_error = np.asarray(errors["full_error"], float)
    cached_error = np.asarray([[np.nan if v is None else v for v in row]
                               for row in errors["cached_error"]])
    assert full_steps == dp_full_steps(full_error, cached_error, len(full_steps))
    out = tmp_path / "seven.png"
    proc = run("deploy.cli", str(cached_w8a8), "--prompt", PROMPT, "--steps", "10",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.with_suffix(".json").read_text())
    expected = schedule_plan(make_timesteps("pndm", manifest["scheduler"], 10),
                             cache["timesteps"], full_steps)
    assert summary["unet_calls"] == {"full": sum(expected), "cached": len(expected) - sum(expected)}
    assert "on cached features" in proc.stdout


def test_unconditional_model_exports_and_samples_with_the_cache(tmp_path):
    from dq_export.export import export

    out = tmp_path / "tiny-ddpm-cache"
    export("tiny-ddpm", out, Recipe(bits="fp32", cache=True, cache_interval=2), init="random")
    pipe = Pipeline.load(out)
    result = pipe.generate(num_images=2, steps=20)  # the steps calibrated for: every 2nd full
    assert result.unet_calls == {"full": 10, "cached": 10}
    assert len(result.images) == 2 and np.asarray(result.images[0]).std() > 0


@pytest.mark.parametrize("steps, k, gap", [(6, 2, 5), (7, 3, 3), (8, 4, 2), (5, 5, 4)])
def test_dp_schedule_is_the_best_subset(steps, k, gap):
    """Against brute force over every k-subset holding step 0 (gaps over ``gap`` unmeasured)."""
    rng = np.random.default_rng(steps * 10 + k)
    full_error = rng.uniform(0.01, 0.02, steps)
    cached_error = np.full((steps, steps), np.nan)
    for f in range(steps):
        for s in range(f + 1, min(steps, f + gap + 1)):
            cached_error[f, s] = full_error[s] + rng.uniform(0, 0.01) * (s - f)
    best = min((subset for rest in itertools.combinations(range(1, steps), k - 1)
                for subset in [[0, *rest]]
                if np.isfinite(schedule_error(full_error, cached_error, subset)).all()),
               key=lambda subset: schedule_error(full_error, cached_error, subset).sum())
    assert dp_full_steps(full_error, cached_error, k) == best
    assert uniform_full_steps(steps, 2) == list(range(0, steps, 2))


def test_plans_map_any_sampler_onto_the_schedule():
    calibrated = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    full = [0, 3, 6, 9]
    # the calibrated sampler itself: exactly the scheduled steps
    assert schedule_plan(calibrated, calibrated, full) == [s in full for s in range(10)]
    # fewer steps: a call is full when it passes a scheduled step since the last call
    assert schedule_plan([901, 601, 301, 1], calibrated, full) == [True, True, True, True]
    assert schedule_plan([901, 701, 501, 301, 101], calibrated, full) == \
        [True, False, True, True, False]
    # more steps: the first call at a scheduled step is full, the second reuses it
    assert schedule_plan([901, 851, 801, 751, 701, 651, 601], calibrated, full) == \
        [True, False, False, False, False, False, True]
    # DeepCacheSDHelper's count: PNDM's repeated timestep has its first occurrence's index
    assert interval_plan([951, 901, 901, 851, 801, 751], 3) == \
        [True, False, False, True, False, False]


def test_bad_cache_input_is_one_line_and_writes_nothing(tmp_path, tiny_export, cached_fp32):
    out = tmp_path / "x"
    cases = [
        (["--cache-steps", "0"], "cache_steps must be at least 1"),
        (["--cache-steps", "99", "--calib-steps", "10"], "--cache-steps 99 is outside [1, 10]"),
        (["--cache-interval", "11", "--calib-steps", "10"], "longer than the 10 calibrated"),
        (["--cache-steps", "3", "--cache-interval", "3"], "give one"),
        (["--cache-branch", "2"], "not a cache point of this UNet"),
        (["--cache", "--bits", "w8a8", "--method", "nncf"], "drop --cache"),
    ]
    for args, expected in cases:
        assert_one_line_error(run("dq_export.cli", "--init", "random", *args, "--out", str(out)),
                              expected)
        assert not out.exists() and not list(tmp_path.glob(".x.partial*"))
    png = tmp_path / "a.png"
    assert_one_line_error(run("deploy.cli", str(tiny_export), "--prompt", "x", "--cache", "auto",
                              "--out", str(png)), "this export has no cache graphs")
    assert_one_line_error(run("deploy.cli", str(cached_fp32), "--prompt", "x", "--cache", "0",
                              "--out", str(png)), "interval N >= 1")
    assert not png.exists()
    with pytest.raises(UserError, match="interval N >= 1"):
        Pipeline.load(cached_fp32, verify=False).generate("x", steps=2, cache=-1)


def test_feature_module_feeds_the_first_fresh_up_layer():
    unet = load_components("tiny-sd", "random", 0).unet
    assert feature_module(unet, 0) == "up_blocks.2.attentions.0"
    assert feature_module(unet, 1) == "up_blocks.1"  # the whole previous up block
    assert valid_branches(unet) == [0, 1, 3, 4, 6, 7]
