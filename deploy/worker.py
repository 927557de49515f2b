"""Generation threads behind a bounded admission count: backpressure instead of a backlog.

A Pipeline runs one generation at a time (its lock), so each thread owns one worker: a
Pipeline or one of its siblings (the same compiled models, infer requests of its own). With
one worker the order is first come, first served; with N, N jobs run at once on OpenVINO's
streams and the rest wait in arrival order. A full queue is refused at once (the caller
answers 429) rather than letting latency grow without bound, and a request whose deadline
passes while it waits never runs.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
W = TypeVar("W")


class QueueFull(Exception):
    """No room for another job; ``retry_after`` is a whole-second estimate of the wait."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class JobTimeout(Exception):
    pass


class GenerationQueue(Generic[W]):
    """Admits at most ``capacity`` jobs (waiting + running) and runs them on one thread per
    worker; a job is handed the worker it runs on."""

    def __init__(self, capacity: int, timeout: float, workers: Sequence[W]):
        if capacity < 1 or not workers:
            raise ValueError("capacity and workers must be at least 1")
        self.capacity, self.timeout, self.workers = capacity, timeout, list(workers)
        self._executor = ThreadPoolExecutor(max_workers=len(self.workers),
                                            thread_name_prefix="dq-serve-worker")
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()  # workers without a job
        for index in range(len(self.workers)):
            self._idle.put(index)
        self._lock = threading.Lock()
        self._pending = 0
        self._running = 0
        self._mean_seconds = 1.0  # running mean of job time, for Retry-After
        self.busy_seconds = [0.0] * len(self.workers)  # per worker, jobs' wall time

    @property
    def depth(self) -> int:
        """Jobs admitted and not finished: waiting or running."""
        return self._pending

    @property
    def running(self) -> int:
        """Jobs running now: at most one per worker."""
        return self._running

    def retry_after(self) -> int:
        waves = max(self._pending, 1) / len(self.workers)  # the workers drain it in parallel
        return max(1, math.ceil(self._mean_seconds * waves))

    async def run(self, job: Callable[[W, float], T]) -> T:
        """Run ``job(worker, deadline)`` on a worker thread; the deadline is a
        ``time.monotonic`` value the job may check between images to give up early."""
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(self.retry_after())
            self._pending += 1
        deadline = time.monotonic() + self.timeout
        future = self._executor.submit(self._timed, job, deadline)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            future.cancel()  # a job still waiting never runs; a running one sees its deadline
            raise JobTimeout(f"generation did not finish within {self.timeout:g} s") from None

    def _timed(self, job: Callable[[W, float], T], deadline: float) -> T:
        # one thread per worker and one job per thread, so an idle worker is always there
        index = self._idle.get_nowait()
        with self._lock:
            self._running += 1
        start = time.perf_counter()
        try:
            return job(self.workers[index], deadline)
        finally:
            seconds = time.perf_counter() - start
            with self._lock:
                self._running -= 1
                self.busy_seconds[index] += seconds
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
            self._idle.put(index)

    def _release(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        """Wait for the jobs already admitted, then stop the threads."""
        self._executor.shutdown(wait=True)
