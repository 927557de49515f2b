"""A tiny Prometheus text-format registry: counters, gauges and histograms with labels.

Enough for dq-serve's /metrics without a dependency or a process-global registry (each app
gets its own, so several apps, or tests, in one process never share counts).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable

# Seconds: generation requests on a CPU run from milliseconds (tiny-sd) to minutes (SD at 512).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    pairs = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...], lock: threading.Lock):
        self.name, self.help, self.label_names, self._lock = name, help_text, labels, lock

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(labels[n] for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args):
        super().__init__(*args)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    """Values read when /metrics is scraped (queue depth, a worker's busy seconds): never
    stale. With labels, ``read`` returns {label values: value}. Kind "counter" is for a
    total that only grows but is kept by its owner (the queue), not by the registry."""

    def __init__(self, name, help_text, labels, lock, read: Callable, kind: str = "gauge"):
        super().__init__(name, help_text, labels, lock)
        self._read, self.kind = read, kind

    def render(self) -> list[str]:
        values = self._read() if self.label_names else {(): self._read()}
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_text, labels, lock, buckets: tuple[float, ...]):
        super().__init__(name, help_text, labels, lock)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            index = bisect.bisect_left(self.buckets, value)
            if index < len(self.buckets):
                series[index] += 1
            series[-2] += value
            series[-1] += 1

    def render(self) -> list[str]:
        lines = self.header()
        for key, series in sorted(self._series.items()):
            cumulative = 0
            for bound, n in zip(self.buckets, series):
                cumulative += n
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative}")
            inf = _labels(self.label_names, key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{inf} {series[-1]}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {series[-1]}")
        return lines


class Registry:
    """Owns the metrics of one app; ``render()`` is the /metrics body."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self):
        self._lock = threading.Lock()
        self._metrics: list[_Metric] = []

    def _add(self, metric):
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels, self._lock))

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> Gauge:
        return self._add(Gauge(name, help_text, (), self._lock, read))

    def counter_read(self, name: str, help_text: str, labels: tuple[str, ...],
                     read: Callable[[], dict]) -> Gauge:
        """A labelled counter whose totals another object keeps, read when scraped."""
        return self._add(Gauge(name, help_text, labels, self._lock, read, kind="counter"))

    def histogram(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help_text, labels, self._lock, buckets))

    def render(self) -> str:
        with self._lock:
            return "\n".join(line for m in self._metrics for line in m.render()) + "\n"
