"""Train the judge (``judge.py``) on the digits' train split and report held-out accuracy.

    python -m dq_export.evaluation.reference.train_judge  # writes judge.safetensors

Seeded; seconds on 2 cores. Shifts, contrast and noise in training make it judge generated
digits, which are never quite centred or clean, as it judges real ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dq_export.evaluation.reference import judge
from dq_export.evaluation.reference.digits import load_split


def augment(x, generator):
    """Random shifts of up to 1 pixel (of 16), contrast/brightness jitter and noise."""
    import torch

    n = len(x)
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    bias = 0.2 * torch.rand(n, 1, 1, 1, generator=generator) - 0.1
    return x * gain + bias + 0.1 * torch.randn(x.shape, generator=generator)


def train(epochs: int = 40, batch: int = 64, seed: int = 0, out: Path = judge.WEIGHTS) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    split = load_split()
    x = judge.prepare(split.train_images)
    y = torch.as_tensor(split.train_labels)
    model = judge.build()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(augment(x[idx], generator)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}", flush=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    predicted, _ = judge.classify(split.test_images, model)
    accuracy = float(np.mean(predicted == split.test_labels))
    report = {"test_accuracy": accuracy, "test_images": len(split.test_labels),
              "train_images": len(y), "seconds": round(time.perf_counter() - start, 1)}
    print(f"held-out accuracy {accuracy:.4f} on {len(split.test_labels)} digits; "
          f"{report['seconds']} s; wrote {out}", flush=True)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=judge.WEIGHTS)
    args = p.parse_args(argv)
    train(args.epochs, seed=args.seed, out=args.out)


if __name__ == "__main__":
    main()
