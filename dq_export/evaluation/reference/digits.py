"""scikit-learn's bundled handwritten digits as tiny-sd images, with a fixed train/test split.

The 1797 8x8 digits ship inside scikit-learn (no download), so the reference model and its
judge train offline and reproducibly. Both use the same split, and only its train part: the
held-out part is what the judge's accuracy and the tests are measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SIZE = 64
BLUR_SIGMA = 1.5  # pixels at 64x64: softens the bilinear creases of an 8x fold upsampling

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CANONICAL = "a handwritten digit {d}"  # the prompt the README and the tests use
# Other wordings, every word a single token of tiny-sd's vocabulary (tiny_tokenizer.WORDS).
TEMPLATES = (
    "the number {w}, handwritten", "digit {d}", "the digit {w}", "a handwritten {w}",
    "handwritten number {d}", "a {w} written in ink", "the numeral {d}",
    "a sketch of the number {w}", "a {d} drawn with a pen", "{w}", "number {d}",
    "a scribbled {d}", "a handwritten digit {w}", "{d}",
)


@dataclass
class Split:
    """Images in [-1, 1], N x 3 x 64 x 64 float32 (grey, white ink on black), labels 0-9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_split() -> Split:
    """The stratified 80/20 split (seed ``SPLIT_SEED``) of all 1797 digits, upsampled."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=TEST_FRACTION,
                                   random_state=SPLIT_SEED, stratify=digits.target)
    images = upsample(digits.images / 16.0)
    labels = digits.target.astype(np.int64)
    return Split(images[train], labels[train], images[test], labels[test])


def upsample(small: np.ndarray) -> np.ndarray:
    """N x 8 x 8 intensities in [0, 1] -> N x 3 x 64 x 64 in [-1, 1]: bilinear, then a
    Gaussian blur, so strokes look drawn rather than like 8x8 blocks."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(small, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    radius = int(3 * BLUR_SIGMA + 0.5)
    g = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2
                  / (2 * BLUR_SIGMA ** 2))
    g = g / g.sum()
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    return (x.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1).numpy()


def all_captions(label: int) -> list[str]:
    """Every wording for ``label`` (the canonical one first)."""
    return [t.format(d=label, w=WORDS[label]) for t in (CANONICAL, *TEMPLATES)]
