"""Fidelity metrics (dq_export.evaluation.fidelity) and the quality benchmark on tiny exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dq_export.errors import UserError
from dq_export.evaluation.fidelity import distortion, global_ssim, relative_error, relative_mse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402  (a script in benchmarks/)


def test_metrics_are_zero_distortion_on_identical_outputs():
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    assert relative_mse(x, x) == 0.0
    assert global_ssim(x, x) == pytest.approx(1.0)
    assert distortion(x, x) == pytest.approx(0.0, abs=1e-12)


def test_metrics_on_a_hand_checked_case():
    x = np.random.default_rng(1).standard_normal(1000)
    x -= x.mean()
    assert relative_mse(x, 1.1 * x) == pytest.approx(0.01)
    assert relative_error(x, 1.1 * x) == pytest.approx(0.1)
    # zero mean, sign flipped: the mean term is 1, the structure term (c2 - 2v) / (2v + c2)
    v, c2 = x.var(), (0.03 * (x.max() - x.min())) ** 2
    assert global_ssim(x, -x) == pytest.approx((c2 - 2 * v) / (2 * v + c2))
    assert distortion(x, -x) == pytest.approx(4.0 + 1.0 - global_ssim(x, -x))


def test_distortion_weighs_a_bias_that_mse_does_not():
    """Equal relative MSE: a bias of 0.1 on zero-mean noise predictions breaks SSIM's
    mean term (the whole image drifts), noise of the same energy barely moves it."""
    rng = np.random.default_rng(2)
    x, noise = rng.standard_normal(4096), rng.standard_normal(4096)
    noise *= 0.1 / np.sqrt(np.mean(noise ** 2))
    assert relative_mse(x, x + 0.1) == pytest.approx(relative_mse(x, x + noise))
    assert distortion(x, x + 0.1) > 0.5 > 0.05 > distortion(x, x + noise)


def test_trajectory_errors_zero_against_itself_and_positive_for_int8(tiny_export, tiny_w8a8):
    from deploy import Pipeline
    from dq_export.evaluation.fidelity import trajectory_errors

    fp32, again, int8 = (Pipeline.load(d, batch_size=2) for d in (tiny_export, tiny_export,
                                                                    tiny_w8a8))
    errors = trajectory_errors(fp32, {"same": again, "w8a8": int8}, ["a cat", "a dog"] * 2,
                               steps=3, scheduler="pndm", seed=0)
    assert set(errors["same"]) == {"relative_error", "relative_mse", "distortion"}
    assert errors["w8a8"]["relative_mse"].shape == (4, 3 + 1)  # PNDM's 3 steps: 4 calls
    assert np.all(errors["same"]["relative_mse"] == 0)
    assert np.all(errors["w8a8"]["relative_mse"] > 0)
    with pytest.raises(UserError, match="batch size"):
        trajectory_errors(fp32, {"w8a8": int8}, ["a cat"] * 3, 3, "pndm", 0)


def test_quality_benchmark_end_to_end(tiny_export, tiny_w8a8, tmp_path):
    out = tmp_path / "quality"
    argv = [f"fp32={tiny_export}", f"w8a8={tiny_w8a8}", "--seeds", "2", "--fidelity-seeds",
            "1", "--resamples", "4", "--schedulers", "pndm:2,dpm++:2", "--out", str(out)]
    assert quality.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["scheduler"] for r in results["runs"]] == ["pndm", "dpm++"]
    for run in results["runs"]:
        w8a8 = run["exports"]["w8a8"]
        assert 0 <= w8a8["accuracy"]["value"] <= 1 and w8a8["psnr"] > 0
        assert w8a8["accuracy"]["ci"][0] <= w8a8["accuracy"]["ci"][1]
        assert run["exports"]["fp32"]["digits_fid_delta"]["value"] == 0
        assert len(run["fidelity"]["w8a8"]["distortion"]["per_step"]) >= 2
    assert results["exports"]["w8a8"]["bits"] == "w8a8"
    for name in ("results.png", "samples-pndm-2.png", "samples-dpmpp-2.png"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "samples").glob("*.npy"))) == 4  # reused on a second run


def test_quality_benchmark_needs_exactly_one_fp32(tiny_w8a8, tmp_path, capsys):
    assert quality.main([f"a={tiny_w8a8}", "--out", str(tmp_path)]) == 2
    assert "0 uncached FP32 exports" in capsys.readouterr().err
    assert quality.main([f"{tiny_w8a8}", "--out", str(tmp_path)]) == 2
    assert "LABEL=EXPORT_DIR" in capsys.readouterr().err
    assert quality.main([f"fp32={tiny_w8a8}", "--schedulers", "pndm", "--out",
                         str(tmp_path)]) == 2
    assert "NAME:STEPS" in capsys.readouterr().err
