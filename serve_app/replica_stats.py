"""Per-replica load figures for Serve's ``record_autoscaling_stats()`` hook.

The ingress holds one ``ReplicaStats``, calls ``begin()``/``end(latency_s)`` around each request
and returns ``snapshot()`` from ``record_autoscaling_stats``; Serve sends the dict to the
controller, where ``serve_app.autoscaling_policy`` reads it as ``ctx.aggregated_metrics``.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil

from deployments.counts import parse_count
from serve_app.autoscaling_policy import (
    METRIC_CPU,
    METRIC_MEMORY,
    METRIC_ONGOING,
    METRIC_P95_LATENCY,
    METRIC_REQUEST_RATE,
)

Clock = Callable[[], float]
Sampler = Callable[[], float]


def _memory_limit_bytes() -> float:
    # In a pod the cgroup limit is what OOM-kills the replica, not the node's total memory.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if (limit := parse_count(text)) is not None and limit < psutil.virtual_memory().total:
            return float(limit)
    return float(psutil.virtual_memory().total)


def psutil_samplers(cpu_allotment: float = 1.0) -> tuple[Sampler, Sampler]:
    """CPU % of ``cpu_allotment`` cores and memory % of the limit, for this process."""
    process = psutil.Process(os.getpid())
    process.cpu_percent(interval=None)  # primes the counter: the first reading is always 0
    limit = _memory_limit_bytes()

    def cpu() -> float:
        return process.cpu_percent(interval=None) / cpu_allotment

    def memory() -> float:
        return 100.0 * process.memory_info().rss / limit

    return cpu, memory


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class ReplicaStats:
    """Request rate, in-flight count and p95 latency over a sliding window, plus CPU/memory."""

    def __init__(
        self,
        *,
        window_s: float = 30.0,
        max_samples: int = 50_000,
        clock: Clock = time.monotonic,
        cpu_sampler: Sampler | None = None,
        memory_sampler: Sampler | None = None,
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self._window_s = window_s
        self._clock = clock
        self._started = clock()
        self._ongoing = 0
        # (completion time, latency s); bounded so a flood cannot grow memory without limit.
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        if cpu_sampler is None or memory_sampler is None:
            default_cpu, default_memory = psutil_samplers()
            cpu_sampler = cpu_sampler or default_cpu
            memory_sampler = memory_sampler or default_memory
        self._cpu = cpu_sampler
        self._memory = memory_sampler

    @property
    def ongoing(self) -> int:
        return self._ongoing

    def begin(self) -> None:
        self._ongoing += 1

    def end(self, latency_s: float) -> None:
        self._ongoing = max(0, self._ongoing - 1)
        self._samples.append((self._clock(), latency_s))

    def _prune(self, now: float) -> None:
        horizon = now - self._window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def snapshot(self) -> dict[str, float]:
        """The custom metrics dict (name -> float) Serve expects from record_autoscaling_stats."""
        now = self._clock()
        self._prune(now)
        # A replica younger than the window has seen less than a window of traffic.
        span = max(min(self._window_s, now - self._started), 1.0)
        return {
            METRIC_REQUEST_RATE: len(self._samples) / span,
            METRIC_ONGOING: float(self._ongoing),
            METRIC_P95_LATENCY: p95([latency for _, latency in self._samples]),
            METRIC_CPU: float(self._cpu()),
            METRIC_MEMORY: float(self._memory()),
        }
