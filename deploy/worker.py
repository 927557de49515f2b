"""One generation thread behind a bounded admission count: backpressure instead of a backlog.

The Pipeline runs one generation at a time (its lock), so more threads would only wait on
the lock; one worker thread keeps the event loop free and the order first come, first served.
A full queue is refused at once (the caller answers 429) rather than letting latency grow
without bound, and a request whose deadline passes while it waits never runs.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """No room for another job; ``retry_after`` is a whole-second estimate of the wait."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class JobTimeout(Exception):
    pass


class GenerationQueue:
    """Admits at most ``capacity`` jobs (waiting + running) and runs them on one thread."""

    def __init__(self, capacity: int, timeout: float):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity, self.timeout = capacity, timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dq-serve-worker")
        self._lock = threading.Lock()
        self._pending = 0
        self._mean_seconds = 1.0  # running mean of job time, for Retry-After

    @property
    def depth(self) -> int:
        """Jobs admitted and not finished: waiting or running."""
        return self._pending

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * max(self._pending, 1)))

    async def run(self, job: Callable[[float], T]) -> T:
        """Run ``job(deadline)`` on the worker thread; the deadline is a ``time.monotonic``
        value the job may check between images to give up early."""
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

    def _timed(self, job: Callable[[float], T], deadline: float) -> T:
        start = time.perf_counter()
        try:
            return job(deadline)
        finally:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - start)

    def _release(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        """Wait for the jobs already admitted, then stop the thread."""
        self._executor.shutdown(wait=True)
