"""Full-size architecture checks (minutes to hours, several GB): run with ``pytest --run-slow``.

Set ``DQ_SD14_FP32_256`` to an existing ``dq-export --model sd14 --init random --size 256``
folder to skip re-exporting sd14. ``DQ_SLOW_EXPORTS=DIR`` keeps the W8A8 exports as
``DIR/<model>-w8a8`` (an existing one is reused) and their model_zoo rows as
``DIR/<model>-w8a8-zoo/results.json``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dq_export.loading import load_components
from dq_export.graph.onnx_export import unet_example
from dq_export.registry import REGISTRY

pytestmark = pytest.mark.slow


SD_MODELS = ("sd14", "sd15", "sd21-base", "sd21")
FULL_SIZE = [name for name, spec in REGISTRY.items() if not spec.embedded]
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def fp32_export_256(model: str, tmp_path_factory) -> Path:
    existing = os.environ.get("DQ_SD14_FP32_256")
    if existing and model == "sd14":
        return Path(existing)
    from dq_export.export import export
    from dq_export.recipe import Recipe

    out = tmp_path_factory.mktemp(model) / "fp32-256"
    export(model, out, Recipe(bits="fp32", image_size=256, seed=0), init="random")
    return out


@pytest.mark.parametrize("model", SD_MODELS)
def test_unet_call_matches_torch_at_256(model, tmp_path_factory):
    """One classifier-free-guidance UNet call (batch 2, 32x32 latents) of each registry SD
    architecture with seeded random weights: cosine >= 0.9999."""
    import openvino as ov

    from deploy.pipeline import DEFAULT_OV_CONFIG

    export_dir = fp32_export_256(model, tmp_path_factory)
    components = load_components(model, "random", seed=0)
    torch.manual_seed(123)
    sample, _, context = unet_example(components, 32)
    timestep = torch.full((2,), 501.0)
    with torch.no_grad():
        expected = components.unet(sample, timestep, context).sample.numpy().ravel()
    del components
    compiled = ov.Core().compile_model(export_dir / "unet" / "openvino_model.xml", "CPU",
                                       DEFAULT_OV_CONFIG)
    got = compiled({"sample": sample.numpy(), "timestep": timestep.numpy(),
                    "encoder_hidden_states": context.numpy()})[0].ravel()
    cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
    print(f"{model} UNet OpenVINO vs torch at 256x256: cosine {cosine:.7f}")
    assert cosine >= 0.9999


@pytest.mark.parametrize("model", FULL_SIZE)
def test_w8a8_default_recipe_deploys_close_to_torch(model, tmp_path_factory):
    """Every registry architecture with seeded random weights, at its native size: the
    default W8A8 recipe (calibration along the model's own sampler) exports, and the deployed
    UNet (OpenVINO, int8) meets torch FP32 at the first, middle and last calibrated step
    (benchmarks/model_zoo.py: cosine >= 0.99; the row is printed)."""
    from dq_export.export import export
    from dq_export.recipe import Recipe

    root = Path(os.environ.get("DQ_SLOW_EXPORTS") or tmp_path_factory.mktemp(model))
    out, zoo = root / f"{model}-w8a8", root / f"{model}-w8a8-zoo"
    if not (out / "manifest.json").is_file():
        export(model, out, Recipe(bits="w8a8", seed=0), init="random")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "model_zoo.py"), str(out),
                           "--calls", "3", "--out", str(zoo)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    (row,) = json.loads((zoo / "results.json").read_text())["rows"]
    assert row["bits"] == "w8a8" and row["size"] == REGISTRY[model].image_size
    assert min(row["cosine_vs_torch"]) >= 0.99
