"""Mixed precision per layer and group on tiny-sd: the graphs compute the simulation, and
``--budget`` exports end to end (curves, slope search, manifest, chart)."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from calibration.allocation import FLOAT, Choice, weight_bytes
from calibration.collect import load_inputs
from calibration.fakequant import fake_quantized
from calibration.fit import QuantParams
from calibration.layers import quantized_layers, shortcut_splits
from calibration.rd_curves import layer_kind
from dq_export.errors import UserError
from dq_export.loading import load_components
from dq_export.graph.mixed_precision import plan, simulation, write_group_graphs, write_shared_graph
from dq_export.graph.quantize_unet import in_weight_range, weight_bits
from dq_export.recipe import TINY_CALIBRATION, Recipe

F = FLOAT
# every candidate form, each used by some layers: int8, float, dual path, int4, FP32
CONV = [Choice(8, (8, 8, 8, 8)), Choice(F, (F, F, F, F)), Choice(8, (F, 8, F, 8))]
LINEAR = [Choice(8, (8, 8, 8, 8)), Choice(8, (F, F, F, F)), Choice(8, (8, F, 8, F)),
          Choice(4, (F, F, F, F)), Choice(F, (F, F, F, F))]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mixed(tiny_w8a8, tiny_export, tmp_path_factory):
    """Hand-made choices covering every form, written as an export's UNet graphs."""
    import openvino as ov

    manifest = json.loads((tiny_w8a8 / "manifest.json").read_text())
    params = QuantParams.from_dict(json.loads((tiny_w8a8 / "quant_params.json").read_text()))
    components = load_components("tiny-sd", "random", seed=0)
    unet = components.unet
    kinds = {n: layer_kind(m) for n, m in quantized_layers(unet).items()}
    choices = {n: (CONV if kinds[n] == "conv" else LINEAR)[i % (3 if kinds[n] == "conv" else 5)]
               for i, n in enumerate(kinds)}
    splits = shortcut_splits(unet)
    p = plan(unet, params, choices, splits)
    root = tmp_path_factory.mktemp("mixed")
    recipe = Recipe.from_dict(manifest["recipe"])
    fp32 = tiny_export / "onnx" / "unet.onnx"
    groups = write_group_graphs(fp32, root, unet, recipe, p)
    shared = write_shared_graph(fp32, root / "shared.onnx", unet, recipe, p)
    xml = root / "unet.xml"
    ov.save_model(ov.convert_model(str(shared)), str(xml), compress_to_fp16=False)
    calls = load_inputs(manifest["quantization"]["calibration"]["cache_dir"])
    return dict(params=params, components=components, kinds=kinds, choices=choices, plan=p,
                groups=groups, xml=xml, calls=calls, splits=splits,
                weight_range=recipe.weight_range)


def test_plan_has_dual_path_layers_of_both_kinds(mixed):
    p, kinds = mixed["plan"], mixed["kinds"]
    dual = {k.split("#")[0] for k in p.float_steps}
    assert {kinds[n] for n in dual} == {"conv", "linear"}
    assert set(p.float_weights) == {k for k in p.float_steps if kinds[k.split("#")[0]] == "conv"}
    float_everywhere = [n for n, c in mixed["choices"].items() if 8 not in c.paths()]
    assert not {k.split("#")[0] for k in p.params.activations} & set(float_everywhere)


def test_openvino_and_onnx_runtime_compute_the_simulation_in_every_group(mixed):
    """One call per group: the OpenVINO graph (both paths on dual-path layers) and the group's ONNX
    graph each lie as close to the torch simulation of that group's precisions as the
    W8A8 test asks (tests/test_quantized_export.py); and switching a group's layers to
    float makes the simulation measurably different from the all-int8 one."""
    import openvino as ov

    params, unet = mixed["params"], mixed["components"].unet
    compiled = ov.Core().compile_model(mixed["xml"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for g, steps in enumerate(params.groups):
        k = steps[0]
        call = next(c for c in mixed["calls"]
                    if int(round(c["timestep"][0])) == params.timesteps[k])
        run = {n: call[n] for n in ("sample", "timestep", "encoder_hidden_states")}
        fp = _torch(unet, run)
        bits, group_params = simulation(mixed["choices"], mixed["kinds"], params, g)
        with fake_quantized(unet, group_params, g, k, mixed["splits"],
                            in_weight_range(bits, mixed["weight_range"])):
            sim = _torch(unet, run)
        with fake_quantized(unet, params, g, k, mixed["splits"],
                            weight_bits(unet, "w8a8", mixed["weight_range"])):
            all_int8 = _torch(unet, run)
        feeds = dict(run)
        ov_out = compiled(feeds)[0]
        onnx_out = ort.InferenceSession(str(mixed["groups"][g]),
                                        providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        error = rel(sim, fp)
        print(f"group {g}: sim vs fp {error:.4f}, all-int8 vs fp {rel(all_int8, fp):.4f}, "
              f"openvino vs sim {rel(ov_out, sim):.4f}, ort vs sim {rel(onnx_out, sim):.4f}")
        assert rel(sim, all_int8) > 0.3 * error  # the group's own precisions matter
        for out in (ov_out, onnx_out):
            assert abs(rel(out, fp) - error) < 0.3 * error
            assert rel(out, sim) < np.sqrt(2) * error


def _torch(unet, call):
    import torch

    with torch.no_grad():
        return unet(*(torch.from_numpy(call[k]) for k in ("sample", "timestep",
                                                          "encoder_hidden_states"))).sample.numpy()


def test_the_ir_holds_the_weights_the_allocation_charges(mixed):
    """The .bin holds about the bytes the rate counts: int8 and FP32 copies of dual-path
    convolutions, one int8 copy of a dual-path Linear, int4, FP32 (per-channel scales and
    step tables on top)."""
    from dq_export.mixed_export import fixed_bytes

    unet = mixed["components"].unet
    modules = quantized_layers(unet)
    charged = fixed_bytes(unet) + sum(weight_bytes(mixed["kinds"][n], m.weight.numel(),
                                                   mixed["choices"][n])
                                      for n, m in modules.items())
    stored = mixed["xml"].with_suffix(".bin").stat().st_size
    print(f"IR .bin {stored} bytes, charged {charged:.0f}")
    assert charged <= stored < 1.06 * charged


def test_budget_export_end_to_end(tiny_w8a8, tmp_path, monkeypatch):
    """``--budget`` with both rates on tiny-sd: curves, kernel timings, the slope search,
    graphs that meet the budget, the manifest entry and chart, and a pipeline that runs."""
    from calibration import rd_curves
    from deploy import Pipeline
    from dq_export.export import export
    from dq_export.manifest import read_manifest

    monkeypatch.setattr(rd_curves, "STEPS_PER_GROUP", 1)  # one step a group: seconds
    recipe = Recipe(bits="w8a8", seed=0, **{**TINY_CALIBRATION, "groups": 2},
                    budget="size=1.4MB,latency=1.5x")
    out = tmp_path / "mixed"
    export("tiny-sd", out, recipe, init="random", calibration_dir=tiny_w8a8.parent / "calibration")
    manifest = read_manifest(out)  # every file hashed, the chart and curves among them
    q = manifest["quantization"]
    entry = q["allocation"]
    assert q["openvino_form"]["form"] == "shared_scales+dual_path"
    assert entry["weight_bytes"] <= 1.4e6 and entry["latency_vs_int8"] <= 1.5
    assert set(entry["files"].values()) <= set(manifest["files"])
    assert len(entry["layers"]) == 132 and len(q["groups"]) == 2
    assert {layer["weights"] for layer in entry["layers"].values()} <= {4, 8, 32}
    curves = json.loads((out / "rd_curves.json").read_text())
    assert len(curves["steps_measured"]) == 2 and all(len(s) == 1 for s in curves["steps_measured"])
    assert [p.name for p in (out / "onnx").glob("unet_group*.onnx")] != []
    pipe = Pipeline.load(out)
    assert pipe.generate("a handwritten digit 3", steps=2, seed=0).images[0].size == (64, 64)


def test_an_unreachable_budget_is_one_line_naming_the_smallest_size(tmp_path, capsys):
    from dq_export.cli import main

    out = tmp_path / "never"
    code = main(["--model", "tiny-sd", "--init", "random", "--bits", "w8a8", "--budget",
                 "size=1MB", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("[")]  # the stage log's progress lines go to stderr too
    assert code == 2 and len(err) == 1 and not out.exists()
    assert "smallest reachable UNet is 1.282 MB" in err[0]  # uniform W4A8's size
    with pytest.raises(UserError, match="--budget allocates"):
        Recipe(bits="w4a8", budget="size=2MB").check()
    assert main(["--model", "tiny-sd", "--bits", "w8a8", "--budget", "size=lots"]) == 2
    assert "--budget 'size=lots'" in capsys.readouterr().err
