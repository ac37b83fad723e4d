import pytest

from bench.records import UserSample
from bench.stats import auto_window, percentile, summarize, windows
from tests.bench.helpers import rec


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([], 50) is None


def test_summary_counts_errors_latency_over_successes_only() -> None:
    records = [rec(i * 0.1, 10.0 + i) for i in range(9)] + [rec(1.0, 5000.0, ok=False)]
    s = summarize(records, duration_s=2.0)
    assert (s.requests, s.ok, s.errors) == (10, 9, 1)
    assert s.error_rate == 0.1
    assert s.rps == 5.0
    assert s.latency_ms["max"] == 18.0  # the failed request's 5 s does not count
    assert s.status == {"200": 9, "503": 1}
    assert s.error_samples == ["HTTP 503"]


def test_summary_cache_dedup_cost_and_streams() -> None:
    records = [
        rec(0, 5.0, cache="HIT", dedup="LEADER", cost=0.002),
        rec(0, 7.0, cache="SEMANTIC_HIT", dedup="SHARED", cost=0.0),
        rec(0, 90.0, cache="MISS", cost=0.003, stream=True, ttft_ms=30.0, itl_ms=4.0),
        rec(0, 80.0, cache="BYPASS"),
    ]
    s = summarize(records, 1.0)
    assert s.cache == {"HIT": 1, "SEMANTIC_HIT": 1, "MISS": 1, "BYPASS": 1}
    assert s.cache_hit_ratio == 0.5
    assert s.cache_hit_latency_ms["p99"] == pytest.approx(6.98)
    assert s.dedup_shared_ratio == 0.5
    assert s.cost_total == pytest.approx(0.005)
    assert s.cost_coverage == 0.75
    assert (s.streams, s.ttft_ms["p50"], s.itl_ms["p50"]) == (1, 30.0, 4.0)


def test_summary_of_nothing_is_empty_not_an_error() -> None:
    s = summarize([], 5.0)
    assert s.requests == 0 and s.error_rate == 0.0 and s.latency_ms["p95"] is None


def test_windows_bucket_by_start_time_and_carry_user_counts() -> None:
    records = [rec(0.5, 10), rec(1.5, 20), rec(4.9, 30), rec(5.1, 40, ok=False), rec(12, 1)]
    users = [UserSample(0, 2), UserSample(5, 6)]
    series = windows(records, users, duration_s=10, width=5)
    assert len(series) == 2  # t=12 lies past the run
    first, second = series
    assert (first.requests, first.rps, first.error_rate, first.p50, first.users) == (
        3,
        0.6,
        0.0,
        20,
        2,
    )
    assert (second.requests, second.error_rate, second.p50, second.users) == (1, 1.0, None, 6)


def test_windows_drop_a_short_trailing_window() -> None:
    assert len(windows([], [], duration_s=11, width=5)) == 2
    assert len(windows([], [], duration_s=13, width=5)) == 3


def test_auto_window() -> None:
    assert auto_window(8) == 1.0
    assert auto_window(120) == 5.0
    assert auto_window(1800) == 75.0
