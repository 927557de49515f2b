"""The judge: a small CNN digit classifier that scores generated digits.

It reads any image size (grey, average-pooled to 16x16, the information an 8x8 digit
upsampled to 64x64 holds), so it judges a 64x64 generation as it judges a real digit.
``features`` (its 64-d penultimate layer) feeds ``digits_fid``, a Frechet distance on
digits the way FID uses Inception on photographs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# the FID formula, on judge features
from dq_export.evaluation.image_metrics import fid as digits_fid

WEIGHTS = Path(__file__).parent / "judge.safetensors"
FEATURES = 64
_cache: dict = {}


def build():
    """The judge's architecture, untrained."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 -> 8
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
        nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU(),     # features
        nn.Linear(FEATURES, 10),
    )


def prepare(images):
    """Images -> N x 1 x 16 x 16 float tensor: PIL images (0-255), or an array/tensor of
    N x C x H x W in [-1, 1] (the pipeline's and the data's range)."""
    import torch
    import torch.nn.functional as F

    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        x = torch.as_tensor(images, dtype=torch.float32)
    return F.adaptive_avg_pool2d(x.mean(dim=1, keepdim=True), 16)


def load(path: Path = WEIGHTS):
    """The committed judge (cached), in eval mode."""
    from safetensors.torch import load_file

    if path not in _cache:
        model = build()
        model.load_state_dict(load_file(path))
        _cache[path] = model.eval()
    return _cache[path]


def _run(images, upto: int | None, model=None):
    import torch

    model = model if model is not None else load()
    with torch.no_grad():
        return model[:upto](prepare(images)) if upto else model(prepare(images))


def classify(images, model=None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted digit and the class probabilities (N x 10) of each image."""
    probs = _run(images, None, model).softmax(dim=1).numpy()
    return probs.argmax(axis=1), probs


def features(images, model=None) -> np.ndarray:
    """The judge's penultimate activations (N x 64), for ``digits_fid``."""
    return _run(images, -1, model).numpy().astype(np.float64)
