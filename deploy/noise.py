"""Gaussian noise that equals ``torch.randn(shape, generator=torch.Generator().manual_seed(s))``
on the CPU, drawn with numpy: a seed gives the image diffusers and torch give, without torch.

torch's CPU normal sampler: a Mersenne Twister (mt19937, seeded with the low 32 bits) gives
one 32-bit word per value, turned into a float uniform in [0, 1) from its low 24 bits; then
Box-Muller on blocks of 16: values j and j + 8 of a block come from the same pair. When the
count is not a multiple of 16, the last 16 values are redrawn from 16 more words. torch
evaluates log/sin/cos in float32 (SIMD), numpy here in float64: values agree to a few ulps.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16  # torch's normal_fill works on blocks of 16 values
MAX_SEED = 2**64 - 1


class Generator:
    """A seeded stream of torch-compatible normal noise (only ``randn`` is needed)."""

    def __init__(self, seed: int):
        if not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed {seed} is outside [0, 2**64 - 1]")
        self._words = np.random.RandomState(int(seed) & 0xFFFFFFFF)

    def _uniform(self, count: int) -> np.ndarray:
        words = self._words.randint(0, 2**32, size=count, dtype=np.uint64)
        return (words & 0xFFFFFF).astype(np.float64) / 2**24

    def randn(self, shape: tuple) -> np.ndarray:
        count = int(np.prod(shape))
        if count < BLOCK:  # torch draws these one by one with another formula: not needed here
            raise ValueError(f"noise of {count} values: at least {BLOCK} are supported")
        whole = count - count % BLOCK
        out = np.empty(count, dtype=np.float32)
        out[:whole] = _box_muller(self._uniform(count)[:whole])  # a word for every value
        if whole != count:  # then the last 16 values again, from 16 fresh words
            out[count - BLOCK:] = _box_muller(self._uniform(BLOCK))
        return out.reshape(shape)


def _box_muller(uniform: np.ndarray) -> np.ndarray:
    """Blocks of 16 uniforms -> 16 normals: (1 - u_j, u_{j+8}) -> (r cos, r sin)."""
    blocks = uniform.reshape(-1, 2, BLOCK // 2)
    radius = np.sqrt(-2 * np.log(1 - blocks[:, 0]))
    theta = 2 * np.pi * blocks[:, 1]
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)
