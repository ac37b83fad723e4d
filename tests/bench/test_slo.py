from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.slo import DEFAULT_SLO_FILE, SLO, evaluate, find_knee, load_slo
from bench.stats import Window, summarize
from tests.bench.helpers import rec


def _summary(latencies: list[float], errors: int = 0, duration: float = 1.0, **kw: object):
    records = [rec(0, lat, **kw) for lat in latencies] + [
        rec(0, 1, ok=False) for _ in range(errors)
    ]
    return summarize(records, duration)


def test_default_file_loads_and_has_the_cache_objective() -> None:
    slo = load_slo(DEFAULT_SLO_FILE)
    assert slo.cache_hit_p99_ms == 100
    assert slo.latency_p95_ms is not None and slo.error_rate_max is not None


def test_load_accepts_top_level_or_nested(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("latency_p95_ms: 5\n")
    assert load_slo(flat).latency_p95_ms == 5
    unknown = tmp_path / "bad.yaml"
    unknown.write_text("slo:\n  latency_p95: 5\n")
    with pytest.raises(ValidationError):
        load_slo(unknown)


def test_all_met_passes() -> None:
    verdict = evaluate(
        _summary([10.0] * 100), SLO(latency_p95_ms=50, error_rate_max=0.01, min_rps=50)
    )
    assert verdict.passed
    assert [c.outcome for c in verdict.checks] == ["pass"] * 4


def test_each_breach_fails_with_observed_value() -> None:
    summary = _summary([10.0] * 95 + [500.0] * 5, errors=3)
    verdict = evaluate(summary, SLO(latency_p99_ms=100, error_rate_max=0.01))
    assert not verdict.passed
    failed = {c.name: c.observed for c in verdict.failures}
    assert failed["latency p99 ms"] == pytest.approx(500.0)
    assert failed["error rate"] == pytest.approx(3 / 103)


def test_rate_limited_answers_can_be_excluded_from_errors() -> None:
    records = [rec(0, 5.0) for _ in range(90)] + [rec(0, 1.0, ok=False, status=429)] * 10
    summary = summarize(records, 1.0)
    assert summary.rate_limited == 10
    assert not evaluate(summary, SLO(error_rate_max=0.01)).passed
    assert evaluate(summary, SLO(error_rate_max=0.01, rate_limited_is_error=False)).passed


def test_min_rps_is_a_floor() -> None:
    verdict = evaluate(_summary([1.0] * 10, duration=10.0), SLO(min_rps=5))
    assert [(c.name, c.outcome) for c in verdict.failures] == [("throughput req/s", "fail")]


def test_missing_signals_are_skipped_not_passed() -> None:
    verdict = evaluate(_summary([10.0] * 10), SLO(ttft_p95_ms=100, cache_hit_p99_ms=100))
    assert verdict.passed
    assert {c.name: c.outcome for c in verdict.checks}["ttft p95 ms"] == "skipped"
    assert {c.name: c.outcome for c in verdict.checks}["cache-hit latency p99 ms"] == "skipped"


def test_cache_hits_over_100ms_fail() -> None:
    hits = [rec(0, 150.0, cache="HIT")] * 2 + [rec(0, 5.0, cache="HIT")] * 20
    verdict = evaluate(summarize(hits, 1), SLO(cache_hit_p99_ms=100))
    assert [c.name for c in verdict.failures] == ["cache-hit latency p99 ms"]


def test_too_few_requests_fail() -> None:
    assert not evaluate(_summary([]), SLO(min_requests=1)).passed


def _w(t: float, users: int, p95: float, err: float = 0.0) -> Window:
    return Window(t, 10, 2.0, err, p95 / 2, p95, p95, None, None, None, users)


def test_knee_needs_sustained_breach() -> None:
    slo = SLO(latency_p95_ms=100, error_rate_max=0.05)
    series = [
        _w(0, 5, 50),
        _w(5, 10, 150),
        _w(10, 15, 60),
        _w(15, 20, 80),
        _w(20, 25, 200),
        _w(25, 30, 90, err=0.2),
        _w(30, 35, 300),
    ]
    knee = find_knee(series, slo)
    assert (knee.users, knee.breaking_users, knee.breached_at_s) == (20, 25, 20)
    assert knee.reasons == ("error rate", "p95")


def test_knee_never_reached() -> None:
    knee = find_knee([_w(0, 1, 10), _w(5, 2, 20)], SLO(latency_p95_ms=100))
    assert (knee.users, knee.breaking_users) == (2, None)
