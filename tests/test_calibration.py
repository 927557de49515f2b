"""Calibration collection: caching, resuming, and the errors a user can hit."""

import numpy as np
import pytest
import torch

from calibration.collect import CalibrationSettings, calibrated_timesteps, collect, read_prompts
from calibration.layers import shortcut_splits
from dq_export.errors import UserError
from dq_export.export import export
from dq_export.loading import load_components
from dq_export.manifest import ir_files
from dq_export.recipe import Recipe

SETTINGS = CalibrationSettings(steps=4, num_prompts=4, batch_size=2)
PROMPTS = ["a handwritten digit 1", "a handwritten digit 2", "a digit 3", "a red 4"]


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny-sd", "random", seed=0)


def test_shipped_prompt_file_has_enough_varied_prompts():
    prompts = read_prompts(None)
    assert len(prompts) >= 128 and len(set(prompts)) == len(prompts)


def test_missing_or_empty_prompt_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="does not exist"):
        export("tiny-sd", tmp_path / "out", Recipe(bits="w8a8"), init="random",
               prompts=tmp_path / "nope.txt")
    assert not (tmp_path / "out").exists()


def test_statistics_cover_every_step_and_both_shortcut_halves(tiny, tmp_path):
    stats, summary = collect(tiny, SETTINGS, PROMPTS, 64, tmp_path, progress=False)
    assert summary["calibrated_timesteps"] == calibrated_timesteps(tiny.scheduler_config, SETTINGS)
    assert stats.steps_seen().all() and stats.num_steps == 4
    split = next(iter(shortcut_splits(tiny.unet)))
    assert f"{split}#0" in stats.keys and f"{split}#1" in stats.keys
    # 4 prompts x (cond + uncond) = 8 rows of conv_in's input per step, 4x16x16 each
    assert stats.histogram("conv_in", [0]).total == 8 * 4 * 16 * 16


def test_interrupted_collection_resumes_to_the_same_statistics(tiny, tmp_path, monkeypatch):
    full, _ = collect(tiny, SETTINGS, PROMPTS, 64, tmp_path / "full", progress=False)
    import calibration.collect as collect_module

    original = collect_module._save_inputs
    calls = {"n": 0}

    def crash_on_second_batch(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(*args)

    monkeypatch.setattr(collect_module, "_save_inputs", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        collect(tiny, SETTINGS, PROMPTS, 64, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(collect_module, "_save_inputs", original)
    resumed, summary = collect(tiny, SETTINGS, PROMPTS, 64, tmp_path / "resumed", progress=False)
    np.testing.assert_array_equal(full.pos, resumed.pos)
    np.testing.assert_array_equal(full.max, resumed.max)


def test_statistics_missing_from_an_older_cache_are_rebuilt_from_its_inputs(tiny, tmp_path):
    """A cache whose statistics lack quantizers this version fits (attention operands, say)
    gets them from its cached UNet inputs: the same numbers as a fresh collection, and no
    sampler run (the inputs are not rewritten)."""
    from calibration.statistics import StepStatistics

    full, _ = collect(tiny, SETTINGS, PROMPTS, 64, tmp_path, progress=False)
    assert any(k.endswith("@p") for k in full.keys) and any(k.endswith("@q") for k in full.keys)
    layer_keys = [k for k in full.keys if "@" not in k]
    old = StepStatistics(layer_keys, full.num_steps)
    for name in ("pos", "neg", "zeros", "min", "max"):
        setattr(old, name, getattr(full, name)[:len(layer_keys)])
    checkpoint = tmp_path / "stats.safetensors"
    old.save(checkpoint, {"batches_done": "2", "seconds": "1.0"})
    inputs = {p: p.stat().st_mtime_ns for p in (tmp_path / "inputs").iterdir()}
    rebuilt, _ = collect(tiny, SETTINGS, PROMPTS, 64, tmp_path, progress=False)
    assert rebuilt.keys == full.keys
    np.testing.assert_allclose(rebuilt.pos, full.pos, rtol=0, atol=1e-6 * full.pos.max())
    np.testing.assert_allclose(rebuilt.max, full.max, rtol=1e-5)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "inputs").iterdir()} == inputs
    assert StepStatistics.load(checkpoint)[0].keys == full.keys


def test_softmax_sample_is_the_attention_probabilities_of_the_sampled_rows():
    from calibration.statistics import softmax_sample

    torch.manual_seed(0)
    q, k = torch.randn(2, 100, 16), torch.randn(2, 30, 16)  # 2 heads of 8
    probs = softmax_sample(q, k, heads=2, scale=8 ** -0.5, rows=5)
    assert probs.shape == (2, 2, 5, 30)
    full = torch.softmax(q.reshape(2, 100, 2, 8).transpose(1, 2)
                         @ k.reshape(2, 30, 2, 8).transpose(1, 2).transpose(-1, -2) * 8 ** -0.5, -1)
    rows = torch.linspace(0, 99, 5).round().long()
    torch.testing.assert_close(probs, full[:, :, rows])


def test_cache_of_another_model_or_recipe_is_detected(tiny, tmp_path):
    collect(tiny, SETTINGS, PROMPTS, 64, tmp_path, progress=False)
    other = CalibrationSettings(steps=5, num_prompts=4, batch_size=2)
    with pytest.raises(UserError, match="different model or recipe.*settings"):
        collect(tiny, other, PROMPTS, 64, tmp_path, progress=False)
    reseeded = load_components("tiny-sd", "random", seed=1)
    with pytest.raises(UserError, match="model"):
        collect(reseeded, SETTINGS, PROMPTS, 64, tmp_path, progress=False)


def test_non_finite_activation_names_the_layer_and_step(tmp_path):
    broken = load_components("tiny-sd", "random", seed=0)
    with torch.no_grad():
        broken.unet.mid_block.resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"mid_block\.resnets\.0\.conv2.*step 0"):
        collect(broken, SETTINGS, PROMPTS, 64, tmp_path, progress=False)


def test_weight_only_export_has_one_graph_and_int8_weights(tmp_path):
    import onnx

    manifest = export("tiny-sd", tmp_path / "w8a16", Recipe(bits="w8a16"), init="random")
    assert manifest["components"]["unet"] == {"onnx": "onnx/unet_qdq.onnx",
                                              "openvino": "unet/dq_model.xml",
                                              "weights": "unet/openvino_model.bin"}
    assert manifest["quantization"]["activations"] == "float (weight-only)"
    model = onnx.load(str(tmp_path / "w8a16" / "onnx" / "unet_qdq.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "DequantizeLinear" in ops and "QuantizeLinear" not in ops
    assert not (tmp_path / "w8a16" / "onnx" / "unet.onnx").exists()


def test_cache_identity_is_stable_between_processes(tiny):
    """Private diffusers config keys (an unordered _use_default_values list) stay out."""
    from calibration.collect import cache_identity

    identity = cache_identity(tiny, SETTINGS, PROMPTS, 64)
    assert not any(key.startswith("_") for key in identity["unet_config"])


def test_w4a16_puts_int4_on_linear_layers_and_int8_on_convs(tmp_path):
    import onnx
    import onnxruntime as ort
    import openvino as ov

    from calibration.fakequant import fake_quant_weight

    manifest = export("tiny-sd", tmp_path / "w4", Recipe(bits="w4a16"), init="random")
    assert manifest["quantization"]["weights"].startswith("int4 for every Linear, int8 for")
    path = tmp_path / "w4" / manifest["components"]["unet"]["onnx"]
    model = onnx.load(str(path))
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["conv_in.weight_quantized"] == onnx.TensorProto.INT8
    assert types["time_embedding.linear_1.weight_quantized"] == onnx.TensorProto.INT4
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "time_embedding.linear_1.weight_dequantized", 1, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tiny = load_components("tiny-sd", "random", seed=0)
    feeds = {"sample": np.zeros((2, 4, 16, 16), np.float32),
             "timestep": np.full(2, 500.0, np.float32),
             "encoder_hidden_states": np.zeros((2, 32, 64), np.float32)}
    got = session.run(["time_embedding.linear_1.weight_dequantized"], feeds)[0]
    expected = fake_quant_weight(tiny.unet.time_embedding.linear_1.weight.detach().numpy(), 4)
    np.testing.assert_allclose(got, expected, atol=1e-7)  # Gemm keeps torch's [out, in]
    ir = ov.Core().read_model(*ir_files(tmp_path / "w4", manifest["components"]["unet"]))
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i4
               for op in ir.get_ops())
