"""Calibration batches as Ray tasks, merged by addition into the sequential run's statistics.

Each task runs whole batches (prompts, or images for an unconditional model) through the FP32
sampler into a table of its own; the driver adds the tables in batch order. The counts are
whole numbers, exact in float64, and min/max are exact, so the merged table is bit-identical
to the sequential one, provided the UNet computes the same floats: the same CPU kind, and the
same torch thread count (its float sums depend on it), so each task uses the driver's.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from calibration.collect import BatchJob, run_batch
from calibration.statistics import StepStatistics


def batches_on_ray(components, job: BatchJob, pending: list[int], stats: StepStatistics,
                   address: str) -> Iterator[tuple[int, dict]]:
    """Run the ``pending`` batches as Ray tasks (one CPU each); add each one's statistics to
    ``stats`` and yield (batch, its UNet inputs), in batch order."""
    if not pending:
        return
    import torch

    from dq_export.ray_cluster import connect

    ray = connect(address)
    task = ray.remote(num_cpus=1)(_batch_task)
    shared = ray.put(dataclasses.replace(components, vae=None))  # the sampler needs no decoder
    threads = torch.get_num_threads()
    refs = [task.remote(shared, job, b, stats.keys, threads) for b in pending]
    for b, ref in zip(pending, refs):
        batch_stats, inputs = ray.get(ref)
        stats.merge(batch_stats)
        yield b, inputs


def _batch_task(components, job: BatchJob, b: int, keys: list[str],
                threads: int) -> tuple[StepStatistics, dict]:
    import torch

    torch.set_num_threads(threads)
    stats = StepStatistics(keys, len(job.timesteps))
    inputs = run_batch(components, job, b, stats)
    return stats, inputs
