"""Per-layer, per-step activation statistics: collected by hooks, cached as safetensors.

Raw statistics are kept apart from what is fitted from them: any range estimator and any
grouping of steps can be applied later without running the model again.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from calibration.histogram import BINS, Histogram, merge, record
from calibration.layers import (PROJECTIONS, activation_keys, attention_keys,
                                attention_modules, quantized_layers, shortcut_splits)
from dq_export.errors import UserError
from dq_export.filesystem import replacing


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

    def merge(self, other: StepStatistics) -> None:
        """Add a table of the same quantizers and steps made from other batches: the counts
        add and min/max combine, so shards merged in any order give the table of them all."""
        if other.keys != self.keys or other.num_steps != self.num_steps:
            raise ValueError("statistics of different quantizers or steps do not merge")
        self.pos += other.pos
        self.neg += other.neg
        self.zeros += other.zeros
        np.minimum(self.min, other.min, out=self.min)
        np.maximum(self.max, other.max, out=self.max)

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
        with replacing(path) as tmp:  # a kill or a full disk never leaves half a checkpoint
            save_file(tensors, str(tmp), metadata={**metadata, "keys": "\n".join(self.keys)})

    @classmethod
    def load(cls, path: Path) -> tuple[StepStatistics, dict[str, str]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata())
            stats = cls(metadata.pop("keys").split("\n"), f.get_tensor("min").shape[1])
            for name in ("pos", "neg", "zeros", "min", "max"):
                setattr(stats, name, f.get_tensor(name).astype(np.float64))
        return stats, metadata


def statistic_keys(unet, splits: dict[str, int] | None = None) -> list[str]:
    """Every layer input quantizer, then every attention's q, k, v and softmax output p.
    ``splits``: the split shortcuts (None: the UNet's; {} for a model without skip
    concatenations, such as a VAE decoder)."""
    splits = shortcut_splits(unet) if splits is None else splits
    return ([key for name in quantized_layers(unet) for key in activation_keys(name, splits)]
            + [key for name in attention_modules(unet) for key in attention_keys(name)])


SOFTMAX_ROWS = 64  # query rows per (sample, head) whose softmax is recorded


def softmax_sample(q, k, heads: int, scale: float, rows: int = SOFTMAX_ROWS):
    """softmax(q k^T · scale) for evenly spaced query rows of every sample and head: the
    attention probabilities A, at a cost independent of the sequence length squared."""
    import torch

    batch, length, inner = q.shape
    pick = torch.linspace(0, length - 1, min(rows, length)).round().long()
    q = q[:, pick].reshape(batch, len(pick), heads, inner // heads).transpose(1, 2)
    k = k.reshape(batch, k.shape[1], heads, inner // heads).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


@contextmanager
def recording(unet, stats: StepStatistics, current_step, splits: dict[str, int] | None = None):
    """Hooks adding to ``stats`` at ``current_step()`` each quantized layer's input, each
    attention's q, k, v (the outputs of its projections) and its softmax output p, from a
    sample of query rows (``softmax_sample``).

    ``current_step()`` returns the calibrated step index, or None to record nothing. A
    non-finite input stops calibration with the layer and step named. ``splits`` as in
    ``statistic_keys``.
    """
    splits = shortcut_splits(unet) if splits is None else splits

    def add(keys, parts):
        step = current_step()
        if step is None:
            return
        for key, part in zip(keys, parts):
            hist = record(part)
            if not (np.isfinite(hist.min) and np.isfinite(hist.max)):
                raise UserError(f"non-finite activation (NaN or inf) at {key}, calibrated step "
                                f"{step}: check the model weights and inputs")
            stats.add(key, step, hist)

    def input_hook(name):
        def hook(module, inputs):
            x = inputs[0]
            parts = [x[:, :splits[name]], x[:, splits[name]:]] if name in splits else [x]
            add(activation_keys(name, splits), parts)
        return hook

    def output_hook(name, operand):
        def hook(module, inputs, output):
            add([f"{name}@{operand}"], [output])
            if operand == "q":  # diffusers projects q, then k: keep q for the softmax
                queries[name] = output
            elif operand == "k" and name in queries and current_step() is not None:
                add([f"{name}@p"], [softmax_sample(queries.pop(name), output,
                                                   modules[name].heads, modules[name].scale)])
        return hook

    modules = dict(unet.named_modules())
    queries = {}
    handles = [m.register_forward_pre_hook(input_hook(n)) for n, m in quantized_layers(unet).items()]
    for name, projections in attention_modules(unet).items():
        handles += [modules[p].register_forward_hook(output_hook(name, operand))
                    for operand, p in zip(PROJECTIONS, projections)]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
