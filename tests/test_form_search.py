"""``--form auto``: the candidate UNet forms timed on this CPU, the fastest one whose error
stays near the flags' form kept, and the search written into the manifest."""

import pytest
from test_cli import assert_one_line_error, run

from dq_export.errors import UserError
from dq_export.form_search import FIDELITY_SLACK, candidates, choose
from dq_export.recipe import TINY_CALIBRATION, Recipe


def test_candidates_flip_one_choice_each():
    forms = candidates(Recipe(bits="w8a8"))  # the default: float attention
    assert forms == {"as given": {}, "attention qkv": {"attention": "qkv"},
                     "attention int8": {"attention": "int8"},
                     "zero points off": {"asymmetric_activations": False},
                     "split shortcut off": {"split_shortcut": False}}
    flipped = candidates(Recipe(bits="w8a8", attention="int8", split_shortcut=False))
    assert {k: v for k, v in flipped.items() if k.startswith("attention")} == {
        "attention float": {"attention": "float"}, "attention qkv": {"attention": "qkv"}}
    assert flipped["split shortcut on"] == {"split_shortcut": True}


def test_choose_takes_the_fastest_form_whose_error_holds():
    measured = {"as given": {"whole_call_ms": 10.0, "relative_mse": 0.010},
                "fast but wrong": {"whole_call_ms": 5.0,
                                   "relative_mse": 0.010 * (1 + FIDELITY_SLACK) + 1e-6},
                "faster, close": {"whole_call_ms": 8.0, "relative_mse": 0.0105},
                "slower, exact": {"whole_call_ms": 12.0, "relative_mse": 0.001}}
    assert choose(measured) == "faster, close"
    del measured["faster, close"]
    assert choose(measured) == "as given"


@pytest.fixture(scope="module")
def form_auto(tiny_w8a8):
    """tiny_w8a8's recipe and calibration with ``--form auto``."""
    from dq_export.export import export

    out = tiny_w8a8.parent / "tiny-sd-w8a8-form-auto"
    manifest = export("tiny-sd", out, Recipe(bits="w8a8", seed=0, form="auto",
                                             **TINY_CALIBRATION),
                      init="random", calibration_dir=tiny_w8a8.parent / "calibration")
    return out, manifest


def test_form_auto_records_every_candidate_and_exports_the_chosen_one(form_auto):
    out, manifest = form_auto
    search = manifest["quantization"]["form_search"]
    assert list(search["candidates"]) == list(candidates(Recipe(bits="w8a8")))
    for measured in search["candidates"].values():
        assert measured["whole_call_ms"] > 0 and 0 < measured["relative_mse"] < 1
    chosen = search["candidates"][search["chosen"]]
    limit = search["candidates"]["as given"]["relative_mse"] * (1 + FIDELITY_SLACK)
    assert chosen["relative_mse"] <= limit
    expected = {"attention": "float", "asymmetric_activations": True, "split_shortcut": True,
                **chosen["overrides"]}
    assert {field: manifest["recipe"][field] for field in expected} == expected
    assert manifest["recipe"]["form"] == "auto"
    assert not list(out.glob("onnx/.forms-*"))  # the candidates' graphs are gone


def test_form_auto_export_generates(form_auto):
    from deploy import Pipeline

    image = Pipeline.load(form_auto[0]).generate("a handwritten digit 7", steps=4).images[0]
    assert image.size == (64, 64)


def test_form_auto_needs_int8_activations(tmp_path):
    with pytest.raises(UserError, match="--form auto"):
        Recipe(bits="w8a16", form="auto").check()
    assert_one_line_error(run("dq_export.cli", "--model", "tiny-sd", "--init", "random",
                              "--bits", "fp32", "--form", "auto", "--out",
                              str(tmp_path / "x")), "--form auto")
    assert not (tmp_path / "x").exists()
