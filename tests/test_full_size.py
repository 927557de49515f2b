"""Full-size architecture checks (minutes, several GB): run with ``pytest --run-slow``.

Set ``DQ_SD14_FP32_256`` to an existing ``dq-export --model sd14 --init random --size 256``
folder to skip re-exporting it.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dq_export.loading import load_components
from dq_export.onnx_export import unet_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd14_export(tmp_path_factory):
    existing = os.environ.get("DQ_SD14_FP32_256")
    if existing:
        return Path(existing)
    from dq_export.export import export
    from dq_export.recipe import Recipe

    out = tmp_path_factory.mktemp("sd14") / "fp32-256"
    export("sd14", out, Recipe(bits="fp32", image_size=256, seed=0), init="random")
    return out


def test_sd14_unet_call_matches_torch_at_256(sd14_export):
    """One classifier-free-guidance UNet call (batch 2, 32x32 latents): cosine >= 0.9999."""
    import openvino as ov

    from deploy.pipeline import DEFAULT_OV_CONFIG

    components = load_components("sd14", "random", seed=0)
    torch.manual_seed(123)
    sample, _, context = unet_example(components.unet, components.text_encoder, 32)
    timestep = torch.full((2,), 501.0)
    with torch.no_grad():
        expected = components.unet(sample, timestep, context).sample.numpy().ravel()
    del components
    compiled = ov.Core().compile_model(sd14_export / "openvino" / "unet.xml", "CPU",
                                       DEFAULT_OV_CONFIG)
    got = compiled({"sample": sample.numpy(), "timestep": timestep.numpy(),
                    "encoder_hidden_states": context.numpy()})[0].ravel()
    cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
    print(f"sd14 UNet OpenVINO vs torch at 256x256: cosine {cosine:.7f}")
    assert cosine >= 0.9999
