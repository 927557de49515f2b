"""Algorithm 1's bookkeeping (calibration.rd_curves): which inputs a group's curves measure,
and the curves' cache key and JSON form."""

import numpy as np

from calibration.fit import ActivationQuantizer, QuantParams
from calibration.rd_curves import (cached_curves, curves_key, group_inputs, group_shares,
                                   load_curves, output_distortion)


def calls_for(timesteps, batches=2, rows=4):
    """Calibration calls as load_inputs returns them: batch-major, one call per step."""
    return [{"sample": np.full((rows, 1), 10 * b + k, np.float32),
             "timestep": np.full(rows, t, np.float32),
             "encoder_hidden_states": np.zeros((rows, 2), np.float32)}
            for b in range(batches) for k, t in enumerate(timesteps)]


def test_each_group_measures_its_first_and_last_steps_of_the_first_batch():
    timesteps = [900, 700, 500, 300, 100]
    params = QuantParams(timesteps, [[0, 1, 2], [3, 4]], {})
    chosen = group_inputs(calls_for(timesteps), params, per_group=2)
    assert [[k for k, _ in group] for group in chosen] == [[0, 2], [3, 4]]
    assert all(call["sample"][0, 0] == k for group in chosen for k, call in group)  # batch 0
    single = group_inputs(calls_for(timesteps), params, per_group=1, conditional_only=True)
    assert [[k for k, _ in group] for group in single] == [[0], [3]]
    assert single[0][0][1]["sample"].shape == (2, 1)  # the prompts' half of [uncond; cond]
    assert group_shares(params) == [0.6, 0.4]


def test_distortion_is_zero_for_equal_outputs_and_grows_with_the_error():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 4, 8, 8))
    assert output_distortion(ref, ref) == 0.0
    small, large = (output_distortion(ref, ref + s * rng.standard_normal(ref.shape))
                    for s in (0.01, 0.1))
    assert 0 < small < large


def test_curves_are_cached_by_what_they_depend_on(tmp_path):
    params = QuantParams([900, 100], [[0], [1]], {"a": ActivationQuantizer("int8", [1.0, 2.0])})
    other = QuantParams([900, 100], [[0], [1]], {"a": ActivationQuantizer("int8", [1.0, 3.0])})
    key = curves_key(params, {"model": "m"}, 2)
    assert key != curves_key(other, {"model": "m"}, 2) != curves_key(params, {"model": "m"}, 1)
    data = {"shares": [0.5, 0.5], "layers": [
        {"name": "a", "kind": "linear", "params": 6,
         "weight_distortion": {"8": [1e-4, 2e-4], "4": [1e-3, 2e-3]},
         "input_distortion": [3e-4, 4e-4]}]}
    built = []
    for _ in range(2):
        assert cached_curves(tmp_path, key, lambda: built.append(1) or data) == data
    assert built == [1]  # the second call read the file
    (layer,) = load_curves(data, {"a": {"int8": 1.0}})
    assert layer.weight_distortion[4] == [1e-3, 2e-3] and layer.ms == {"int8": 1.0}
