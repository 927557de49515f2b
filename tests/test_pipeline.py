"""The OpenVINO pipeline against diffusers' torch pipeline on tiny-sd, and its input checks."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from conftest import diffusers_scheduler
from deploy import Pipeline
from deploy.schedulers import SCHEDULERS
from dq_export.errors import UserError
from dq_export.loading import load_components

PROMPT = "a handwritten digit 7"


def torch_reference(scheduler: str, steps: int, seed: int, prompt=PROMPT, eta=0.0,
                    components=None) -> np.ndarray:
    """diffusers' StableDiffusionPipeline on the weights the export was made from (by default
    tiny-sd's seeded random ones)."""
    from diffusers import StableDiffusionPipeline

    c = components or load_components("tiny-sd", "random", seed=0)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                   unet=c.unet, scheduler=diffusers_scheduler(scheduler,
                                                                              c.scheduler_config),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, eta=eta,
                  generator=torch.Generator().manual_seed(seed), output_type="np",
                  height=64, width=64).images
    return (images * 255).round().astype(np.int16)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_openvino_matches_diffusers_torch(tiny_pipeline, scheduler):
    """Same seed, same sampler: every pixel within one 8-bit level of diffusers' image."""
    eta = 1.0 if scheduler == "ddim" else 0.0  # DDIM with eta > 0 also checks the noise draws
    ours = tiny_pipeline.generate(PROMPT, steps=10, scheduler=scheduler, seed=1, eta=eta)
    reference = torch_reference(scheduler, 10, seed=1, eta=eta)
    pixels = np.asarray(ours.images[0]).astype(np.int16)
    assert reference[0].std() > 10  # the images are not flat: the comparison means something
    assert np.abs(pixels - reference[0]).max() <= 1


def test_v_prediction_model_matches_diffusers_torch(tmp_path):
    """A v-prediction model (as sd21): tiny-sd's folder with its scheduler config switched to
    v_prediction, exported from the folder. Each sampler turns the UNet's v into its update
    as diffusers does, or the images would part."""
    from dq_export.export import export
    from dq_export.recipe import Recipe
    from dq_export.registry import MODELS_DIR

    folder = tmp_path / "tiny-v"
    shutil.copytree(MODELS_DIR / "tiny-sd", folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    export(str(folder), tmp_path / "export", Recipe(bits="fp32"))
    pipe = Pipeline.load(tmp_path / "export")
    components = load_components(str(folder), "pretrained")
    assert components.scheduler_config["prediction_type"] == "v_prediction"
    as_eps = load_components("tiny-sd", "pretrained")  # the same weights, read as epsilon
    for scheduler in SCHEDULERS:
        ours = np.asarray(pipe.generate(PROMPT, steps=8, scheduler=scheduler, seed=2).images[0])
        reference = torch_reference(scheduler, 8, seed=2, components=components)[0]
        v_as_eps = torch_reference(scheduler, 8, seed=2, components=as_eps)[0]
        assert reference.std() > 10 and np.abs(reference - v_as_eps).mean() > 10
        assert np.abs(ours.astype(np.int16) - reference).max() <= 1, scheduler


def test_same_seed_same_image_other_seed_other_image(tiny_pipeline):
    a, b, c = (np.asarray(tiny_pipeline.generate(PROMPT, steps=5, seed=s).images[0])
               for s in (3, 3, 4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_of_prompts_with_negative_prompt(tiny_pipeline):
    result = tiny_pipeline.generate(["a digit 1", "a digit 2"], negative_prompt="blurry",
                                    steps=4, seed=0)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert set(result.timings) == {"text_encoder", "unet_loop", "vae_decoder", "total"}
    single = tiny_pipeline.generate("a digit 1", negative_prompt="blurry", steps=4, seed=0)
    assert tiny_pipeline.batch_size == 1
    assert single.images[0].size == (64, 64)


def test_step_timings_are_one_per_unet_call(tiny_pipeline):
    result = tiny_pipeline.generate(PROMPT, steps=6, scheduler="ddim")
    assert len(result.step_seconds) == 6 and all(s > 0 for s in result.step_seconds)


def test_long_prompt_is_truncated_with_a_warning(tiny_pipeline, caplog):
    with caplog.at_level(logging.WARNING):
        tiny_pipeline.generate("digit " * 40, steps=2)
    assert "truncated" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"), ({"steps": 5000}, "steps"), ({"guidance": float("nan")}, "guidance"),
    ({"guidance": -1.0}, "guidance"), ({"scheduler": "heun"}, "unknown scheduler"),
    ({"prompt": []}, "no prompt"),
])
def test_bad_generation_settings_are_user_errors(tiny_pipeline, kwargs, message):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(UserError, match=message):
        tiny_pipeline.generate(kwargs.pop("prompt"), **kwargs)


def test_another_image_size_compiles_or_is_a_user_error(tiny_export):
    """An export runs at other sizes its UNet's levels divide (speed comparisons)."""
    image = Pipeline.load(tiny_export, verify=False).manifest["image"]
    step = 8 * image["vae_scale_factor"]
    size = 2 * image["height"]
    result = Pipeline.load(tiny_export, verify=False, image_size=(size, size)).generate(
        PROMPT, steps=2, seed=0)
    assert result.images[0].size == (size, size)
    with pytest.raises(UserError, match=f"multiples of {step}"):
        Pipeline.load(tiny_export, verify=False, image_size=(step + 1, step))


def test_missing_manifest_and_tampered_files_are_detected(tiny_export, tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        Pipeline.load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    with open(copy / "unet" / "openvino_model.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match="openvino_model.bin does not match its manifest hash"):
        Pipeline.load(copy)
    (copy / "unet" / "openvino_model.bin").unlink()
    with pytest.raises(UserError, match="openvino_model.bin is missing"):
        Pipeline.load(copy)


def test_siblings_share_compiled_models_and_generate_concurrently(tiny_export):
    """Throughput serving: siblings in threads draw what one Pipeline draws in turn."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = Pipeline.load(tiny_export, batch_size=2, verify=False,
                         ov_config={"PERFORMANCE_HINT": "THROUGHPUT"})
    assert pipe.optimal_requests >= 1
    twins = [pipe, pipe.sibling(), pipe.sibling()]
    assert all(t._compiled is pipe._compiled for t in twins)  # one copy of the weights
    assert len({id(t._requests["unet"]) for t in twins}) == 3

    def draw(twin, seed):
        return np.asarray(twin.generate(["a digit 1", "a digit 2"], steps=3, seed=seed,
                                        scheduler="dpm++").images[1])

    in_turn = [draw(pipe, seed) for seed in range(3)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(draw, twins, range(3)))
    assert all(np.array_equal(a, b) for a, b in zip(in_turn, together))
    twins[2].generate("a digit 3", steps=1)  # another batch size: models of its own
    assert twins[2]._compiled is not pipe._compiled and pipe.batch_size == 2
