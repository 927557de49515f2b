"""The quantization maths against ONNX Runtime and OpenVINO, and the estimators and groups."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calibration.estimators import asymmetric_scale, estimate, zero_point
from calibration.fit import (ASYMMETRIC_GAIN, ActivationQuantizer, asymmetric_gain,
                             constant_score_scales)
from calibration.groups import auto_groups, interval_cost, uniform_groups
from calibration.histogram import merge, record
from calibration.quant_math import dequantize_linear, quantize_linear, weight_scales


def qdq_model(scale, zero, axis=None):
    """ONNX graph x -> QuantizeLinear -> DequantizeLinear with the given parameters."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("q", numpy_helper.from_array(
                                  zero).data_type, None),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(zero, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CASES = [
    ("int8 per tensor", np.float32(0.05), np.int8(0), None),
    ("uint8 per tensor", np.float32(0.02), np.uint8(0), None),
    ("uint8 with a zero point", np.float32(0.03), np.uint8(17), None),
    ("int8 per channel", np.array([0.01, 0.1, 0.03], np.float32), np.zeros(3, np.int8), 1),
]


@pytest.mark.parametrize("label, scale, zero, axis", CASES, ids=[c[0] for c in CASES])
def test_quant_math_matches_onnxruntime_and_openvino(label, scale, zero, axis, tmp_path):
    import openvino as ov

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4, 5)) * 3).astype(np.float32)
    x.flat[:4] = [0.025, -0.075, 0.125, 100.0]  # ties and saturation
    dtype = "uint8" if zero.dtype == np.uint8 else "int8"
    q = quantize_linear(x, scale, zero, dtype, axis)
    y = dequantize_linear(q, scale, zero, axis)
    model = qdq_model(scale, zero, axis)
    q_ort, y_ort = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(q, q_ort)
    np.testing.assert_allclose(y, y_ort, rtol=0, atol=1e-6)
    onnx.save(model, tmp_path / "qdq.onnx")
    compiled = ov.Core().compile_model(ov.convert_model(tmp_path / "qdq.onnx"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    y_ov = compiled({"x": x})[compiled.outputs[1]]
    # OpenVINO's FakeQuantize rounds (x - low) / step: with a zero point an exact tie of
    # x / scale can land one level away (measure zero on real data; the first 4 are ties)
    ties = np.zeros(x.shape, bool)
    if zero.any():
        ties.flat[:3] = True
    np.testing.assert_allclose(y[~ties], y_ov[~ties], rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(y - y_ov)[ties] <= np.max(scale) * 1.0001)


def test_weight_scales_are_per_output_channel_and_symmetric():
    w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    np.testing.assert_allclose(weight_scales(w, axis=0), [2 / 127, 0.5 / 127])
    q = quantize_linear(w, weight_scales(w, 0), 0, "int8", axis=0)
    assert q[0, 1] == -127 and q[1, 0] == 127


def test_histograms_merge_exactly():
    a, b = torch.randn(5000), torch.randn(3000) * 5
    merged, direct = merge([record(a), record(b)]), record(torch.cat([a, b]))
    np.testing.assert_array_equal(merged.pos, direct.pos)
    assert merged.min == direct.min and merged.total == direct.total == 8000


def test_histogram_counts_each_sign_and_keeps_tiny_negatives_out_of_the_top_bins():
    """The counts match numpy's histogram of log10|x| per sign (to rounding at bin edges);
    values just above 1e-5 in magnitude stay in the lowest bins of their own sign."""
    x = torch.cat([torch.randn(50_000) * 3, torch.full((100,), -1.001e-5),
                   torch.full((100,), 1.001e-5), torch.zeros(7), torch.full((5,), 1e-7)])
    hist, a = record(x), x.numpy()
    for counts, values in ((hist.pos, a[a > 0]), (hist.neg, -a[a < 0])):
        values = values[values >= 1e-5]
        expected, _ = np.histogram(np.log10(values), bins=len(counts), range=(-5, 4))
        assert counts.sum() == expected.sum()
        assert np.abs(counts - expected).sum() <= 1e-3 * expected.sum()
        assert counts[:2].sum() >= 100 and counts[-200:].sum() == expected[-200:].sum()
    assert hist.zeros == 12 and hist.min == float(a.min()) and hist.max == float(a.max())


def actual_mse(x: np.ndarray, threshold: float) -> float:
    scale = np.float32(threshold / 127)
    return float(((dequantize_linear(quantize_linear(x, scale), scale) - x) ** 2).mean())


@pytest.mark.parametrize("df", [3, 5, 30])
def test_mse_estimator_minimises_the_real_quantization_error(df):
    """On Student-t data (tails from heavy to Gaussian) the mse threshold's real error is
    the lowest of the three estimators and of a sweep of clip ratios."""
    rng = np.random.default_rng(df)
    x = rng.standard_t(df=df, size=200_000).astype(np.float32)
    hist = record(torch.from_numpy(x))
    t_minmax, t_pct, t_mse = (estimate(hist, e) for e in ("minmax", "percentile", "mse"))
    assert t_minmax == pytest.approx(np.abs(x).max())
    assert t_mse <= t_minmax and t_pct <= t_minmax
    best_sweep = min(actual_mse(x, r * t_minmax) for r in np.geomspace(0.01, 1, 60))
    assert actual_mse(x, t_mse) <= 1.05 * min(actual_mse(x, t_minmax), actual_mse(x, t_pct),
                                              best_sweep)


def test_non_negative_inputs_use_the_unsigned_range():
    x = torch.rand(10000) * 4
    assert record(x).min >= 0
    assert estimate(record(x), "minmax") == pytest.approx(float(x.max()))


def real_error(x: np.ndarray, scale: float, zero: int, dtype: str = "uint8") -> float:
    scale = np.float32(scale)
    return float(((dequantize_linear(quantize_linear(x, scale, zero, dtype), scale, zero) - x)
                  ** 2).mean())


def test_asymmetric_uint8_fits_a_silu_input_better_than_symmetric_int8():
    """SiLU's output lies in [-0.28, max]: uint8 with a zero point spends its 256 levels
    there; the mse scale is as good as a sweep over scales at that zero point, and its real
    error is well below symmetric int8's best."""
    rng = np.random.default_rng(0)
    pre = rng.standard_normal(200_000).astype(np.float32) * 2
    x = pre / (1 + np.exp(-pre))
    hist = record(torch.from_numpy(x))
    zero = zero_point(hist, "mse")
    assert 5 <= zero <= 30 and asymmetric_gain(zero) >= ASYMMETRIC_GAIN
    scale = asymmetric_scale(hist, zero, "mse")
    widest = max(x.max() / (255 - zero), -x.min() / zero)
    sweep = min(real_error(x, widest * r, zero) for r in np.geomspace(0.02, 1, 80))
    assert real_error(x, scale, zero) <= 1.05 * sweep
    assert real_error(x, asymmetric_scale(hist, zero, "minmax"), zero) <= \
        1.05 * real_error(x, widest, zero)  # minmax covers both sides
    symmetric = actual_mse(x, estimate(hist, "mse"))
    assert real_error(x, scale, zero) < symmetric / 2


def test_a_balanced_input_keeps_symmetric_int8():
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(100_000).astype(np.float32))
    zero = zero_point(record(x), "mse")
    assert 118 <= zero <= 138 and asymmetric_gain(zero) < ASYMMETRIC_GAIN
    assert zero_point(record(x.abs()), "mse") == 0  # never negative: uint8 from 0


def test_score_scales_are_widened_to_one_product_and_nothing_else_moves():
    """q and k of one attention get s_q*s_k equal in every group (a constant OpenVINO folds),
    no scale shrinks (no new clipping), the group with the largest product keeps its own,
    and other quantizers are untouched."""
    acts = {"a@q": ActivationQuantizer("int8", [0.1, 0.2, 0.05]),
            "a@k": ActivationQuantizer("int8", [0.3, 0.1, 0.4]),
            "a@v": ActivationQuantizer("int8", [0.5, 0.6, 0.7]),
            "conv": ActivationQuantizer("uint8", [1.0, 2.0, 3.0], None, 12)}
    out = constant_score_scales(acts)
    q, k = np.array(out["a@q"].group_scales), np.array(out["a@k"].group_scales)
    np.testing.assert_allclose(q * k, 0.03, rtol=1e-12)
    assert (q >= np.array(acts["a@q"].group_scales) - 1e-15).all()
    assert (k >= np.array(acts["a@k"].group_scales) - 1e-15).all()
    assert q[0] == 0.1 and k[0] == pytest.approx(0.3)
    assert out["a@v"] == acts["a@v"] and out["conv"] == acts["conv"]


def test_uniform_groups_cover_every_step_in_order():
    groups = uniform_groups(10, 4)
    assert [s for g in groups for s in g] == list(range(10)) and len(groups) == 4
    assert uniform_groups(3, 8) == [[0], [1], [2]]


def test_auto_groups_find_the_range_jumps_and_are_optimal():
    ranges = np.array([[1, 1, 1, 8, 8, 8, 64, 64], [2, 2, 2, 2, 16, 16, 16, 16]], float)
    assert auto_groups(ranges, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    rng = np.random.default_rng(2)
    ranges = rng.uniform(1, 100, (3, 7))
    logs = np.log2(ranges)
    best = min(
        (interval_cost(logs, 0, a) + interval_cost(logs, a, b) + interval_cost(logs, b, 7), (a, b))
        for a in range(1, 6) for b in range(a + 1, 7))
    a, b = best[1]
    assert auto_groups(ranges, 3) == [list(range(0, a)), list(range(a, b)), list(range(b, 7))]
