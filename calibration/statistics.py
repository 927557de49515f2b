"""Per-layer, per-step activation statistics: collected by hooks, cached as safetensors.

Raw statistics are kept apart from what is fitted from them: any range estimator and any
grouping of steps can be applied later without running the model again.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from calibration.histogram import BINS, Histogram, merge, record
from calibration.layers import activation_keys, quantized_layers, shortcut_splits
from dq_export.errors import UserError


class StepStatistics:
    """Histograms of every quantizer input, one per calibrated step (a fixed-size table)."""

    def __init__(self, keys: list[str], num_steps: int):
        self.keys, self.num_steps = list(keys), num_steps
        self.pos = np.zeros((len(keys), num_steps, BINS))
        self.neg = np.zeros((len(keys), num_steps, BINS))
        self.zeros = np.zeros((len(keys), num_steps))
        self.min = np.full((len(keys), num_steps), np.inf)
        self.max = np.full((len(keys), num_steps), -np.inf)
        self._index = {key: i for i, key in enumerate(self.keys)}

    def add(self, key: str, step: int, hist: Histogram) -> None:
        i = self._index[key]
        self.pos[i, step] += hist.pos
        self.neg[i, step] += hist.neg
        self.zeros[i, step] += hist.zeros
        self.min[i, step] = min(self.min[i, step], hist.min)
        self.max[i, step] = max(self.max[i, step], hist.max)

    def histogram(self, key: str, steps: list[int]) -> Histogram:
        """The merged histogram of ``key`` over ``steps`` (a timestep group, or one step)."""
        i = self._index[key]
        return merge([Histogram(self.pos[i, s], self.neg[i, s], self.zeros[i, s],
                                self.min[i, s], self.max[i, s]) for s in steps])

    def steps_seen(self) -> np.ndarray:
        return np.isfinite(self.max).all(axis=0)

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        tensors = {"pos": self.pos.astype(np.float32), "neg": self.neg.astype(np.float32),
                   "zeros": self.zeros, "min": self.min, "max": self.max}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={**metadata, "keys": "\n".join(self.keys)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> tuple[StepStatistics, dict[str, str]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata())
            stats = cls(metadata.pop("keys").split("\n"), f.get_tensor("min").shape[1])
            for name in ("pos", "neg", "zeros", "min", "max"):
                setattr(stats, name, f.get_tensor(name).astype(np.float64))
        return stats, metadata


def statistic_keys(unet) -> list[str]:
    splits = shortcut_splits(unet)
    return [key for name in quantized_layers(unet) for key in activation_keys(name, splits)]


@contextmanager
def recording(unet, stats: StepStatistics, current_step):
    """Forward pre-hooks adding each quantized layer's input to ``stats`` at ``current_step()``.

    ``current_step()`` returns the calibrated step index, or None to record nothing. A
    non-finite input stops calibration with the layer and step named.
    """
    splits = shortcut_splits(unet)

    def hook_for(name):
        def hook(module, inputs):
            step = current_step()
            if step is None:
                return
            x = inputs[0]
            parts = [x[:, :splits[name]], x[:, splits[name]:]] if name in splits else [x]
            for key, part in zip(activation_keys(name, splits), parts):
                hist = record(part)
                if not (np.isfinite(hist.min) and np.isfinite(hist.max)):
                    raise UserError(f"non-finite activation (NaN or inf) at the input of {name}, "
                                    f"calibrated step {step}: check the model weights and inputs")
                stats.add(key, step, hist)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in quantized_layers(unet).items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
