"""ReplicaStats with a fake clock and fake CPU/memory samplers."""

from __future__ import annotations

from serve_app.autoscaling_policy import (
    METRIC_CPU,
    METRIC_MEMORY,
    METRIC_ONGOING,
    METRIC_P95_LATENCY,
    METRIC_REQUEST_RATE,
)
from serve_app.replica_stats import ReplicaStats, p95


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock, window_s: float = 10.0) -> ReplicaStats:
    return ReplicaStats(
        window_s=window_s, clock=clock, cpu_sampler=lambda: 42.0, memory_sampler=lambda: 12.5
    )


def test_p95_nearest_rank() -> None:
    assert p95([]) == 0.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([0.3]) == 0.3


def test_rate_latency_and_ongoing_over_the_window() -> None:
    clock = FakeClock()
    stats = make(clock)
    clock.now += 10.0
    for i in range(100):
        stats.begin()
        stats.end(latency_s=(i + 1) / 100)
    stats.begin()  # one still in flight
    snap = stats.snapshot()
    assert snap[METRIC_REQUEST_RATE] == 10.0  # 100 completions / 10 s
    assert snap[METRIC_P95_LATENCY] == 0.95
    assert snap[METRIC_ONGOING] == 1.0
    assert (snap[METRIC_CPU], snap[METRIC_MEMORY]) == (42.0, 12.5)
    assert all(isinstance(v, float) for v in snap.values())


def test_old_samples_leave_the_window() -> None:
    clock = FakeClock()
    stats = make(clock)
    clock.now += 20.0
    stats.begin()
    stats.end(5.0)  # slow, but about to age out
    clock.now += 11.0
    stats.begin()
    stats.end(0.1)
    snap = stats.snapshot()
    assert snap[METRIC_P95_LATENCY] == 0.1
    assert snap[METRIC_REQUEST_RATE] == 0.1  # 1 per 10 s


def test_young_replica_rate_uses_its_age() -> None:
    clock = FakeClock()
    stats = make(clock, window_s=30.0)
    clock.now += 2.0
    for _ in range(10):
        stats.begin()
        stats.end(0.01)
    assert stats.snapshot()[METRIC_REQUEST_RATE] == 5.0


def test_default_samplers_read_this_process() -> None:
    snap = ReplicaStats().snapshot()
    assert 0.0 < snap[METRIC_MEMORY] < 100.0
    assert snap[METRIC_CPU] >= 0.0
