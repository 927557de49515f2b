"""Shared fixtures: one tiny-sd FP32 export per test session, built from config, offline."""

from __future__ import annotations

import os

import pytest

from dq_export.recipe import TINY_CALIBRATION

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="run checks on full-size architectures (minutes, GBs of memory)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="full-size check: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def diffusers_scheduler(name: str, config: dict):
    """diffusers' twin of ``deploy.schedulers.make_scheduler(name, config)``."""
    import diffusers

    from deploy.schedulers import SCHEDULERS

    cls_name = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
                "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}[name]
    return getattr(diffusers, cls_name).from_config({**config, **SCHEDULERS[name][1]})


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """tiny-sd with seeded random weights (seed 0), exported once to FP32."""
    from dq_export.export import export
    from dq_export.recipe import Recipe

    out = tmp_path_factory.mktemp("exports") / "tiny-sd-fp32"
    export("tiny-sd", out, Recipe(bits="fp32", seed=0), init="random")
    return out


@pytest.fixture(scope="session")
def trained_tiny_sd(tmp_path_factory):
    """The trained reference tiny-sd (its committed weights), exported once to FP32."""
    from dq_export.export import export
    from dq_export.recipe import Recipe

    out = tmp_path_factory.mktemp("trained") / "tiny-sd-trained-fp32"
    export("tiny-sd", out, Recipe(bits="fp32"), init="pretrained")
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_export):
    from deploy import Pipeline

    return Pipeline.load(tiny_export)


@pytest.fixture(scope="session")
def tiny_w8a8(tmp_path_factory):
    """tiny-sd (seed 0) at W8A8: 4 auto groups, calibrated on 4 prompts x 10 PNDM steps. Its
    attention is ``qkv``, not the default ``float``, so that the tests meet every kind of
    quantizer (attention operands included) in one export."""
    from dq_export.export import export
    from dq_export.recipe import Recipe

    root = tmp_path_factory.mktemp("w8a8")
    out = root / "tiny-sd-w8a8"
    export("tiny-sd", out, Recipe(bits="w8a8", seed=0, attention="qkv", **TINY_CALIBRATION),
           init="random", calibration_dir=root / "calibration")
    return out
