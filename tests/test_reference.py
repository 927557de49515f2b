"""The trained reference model and its judge, from the committed weights (no training here).

The generation test runs the real path: export tiny-sd's trained weights to FP32, then
OpenVINO's pipeline, and asks the judge whether "a handwritten digit D" came out as a D.
"""

import numpy as np
import pytest

from dq_export.evaluation.reference import judge
from dq_export.evaluation.reference.digits import load_split


@pytest.fixture(scope="module")
def split():
    return load_split()


def test_judge_classifies_held_out_digits(split):
    predicted, probs = judge.classify(split.test_images)
    assert probs.shape == (len(split.test_labels), 10)
    assert np.mean(predicted == split.test_labels) > 0.9
    assert judge.features(split.test_images[:5]).shape == (5, judge.FEATURES)


def test_digits_fid_is_zero_for_identical_sets(split):
    feats = judge.features(split.test_images)
    assert abs(judge.digits_fid(feats, feats)) < 1e-6
    assert judge.digits_fid(feats, judge.features(split.train_images[:360])) > 0


def test_digits_fid_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(1)
    std1, std2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = rng.normal([0, 0, 0], std1, size=(50_000, 3))
    b = rng.normal([1, 0, 2], std2, size=(50_000, 3))
    expected = 1 + 4 + np.sum((std1 - std2) ** 2)  # diagonal: ||dmu||^2 + sum (s1 - s2)^2
    assert judge.digits_fid(a, b) == pytest.approx(expected, rel=0.03)


def test_trained_tiny_sd_draws_the_digit_asked_for(trained_tiny_sd):
    import json

    from deploy import Pipeline
    from dq_export.evaluation.reference.evaluate import generate_digits, score

    manifest = json.loads((trained_tiny_sd / "manifest.json").read_text())
    assert manifest["model"]["init"] == "pretrained"
    images, labels = generate_digits(Pipeline.load(trained_tiny_sd), seeds=(0, 1), steps=20)
    result = score(images, labels)
    assert result["accuracy"] >= 0.6, result
