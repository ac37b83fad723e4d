from bench.criteria import (
    RunFacts,
    breaker_prevents_cascade,
    cache_hits_fast,
    cost_tracked,
    evaluate_all,
    knee_at_least_target,
    no_drift,
    replicas_scale_up,
)
from bench.slo import SLO, Knee
from bench.stats import summarize, windows
from tests.bench.helpers import rec


def _facts(records: list, metrics: dict | None = None, **kw: object) -> RunFacts:
    summary = summarize(records, 60)
    series = windows(records, [], 60, 5)
    return RunFacts(summary, series, records, metrics or {}, SLO(cache_hit_p99_ms=100), **kw)


def test_replicas_scale_up() -> None:
    key = "ray_serve_deployment_replica_healthy{deployment=Ingress}"
    grew = _facts([], {key: [(0, 1.0), (10, 1.0), (20, 3.0)]})
    assert replicas_scale_up(grew).outcome == "pass"
    flat = _facts([], {key: [(0, 2.0), (20, 2.0)]})
    assert replicas_scale_up(flat).outcome == "fail"
    assert replicas_scale_up(_facts([])).outcome == "inconclusive"


def test_cache_hits_fast() -> None:
    hits = [rec(i, 4.0, kind="repeat", cache="HIT") for i in range(20)]
    misses = [rec(i, 300.0, kind="repeat", cache="MISS") for i in range(5)]
    assert cache_hits_fast(_facts(hits + misses)).outcome == "pass"
    slow = [rec(i, 140.0, kind="repeat", cache="HIT") for i in range(20)]
    assert cache_hits_fast(_facts(slow)).outcome == "fail"
    rarely = [rec(i, 4.0, kind="repeat", cache="HIT") for i in range(2)] + misses
    assert cache_hits_fast(_facts(rarely)).outcome == "fail"  # repeats mostly missed
    assert cache_hits_fast(_facts([rec(0, 4.0, kind="repeat")])).outcome == "inconclusive"


def _fault(calls: int = 10) -> dict:
    return {"fault": {"start": 10.0, "end": 30.0, "hang_s": 2.0, "upstream_calls": calls}}


def test_breaker_passes_when_failing_fast_and_recovering() -> None:
    before = [rec(t, 20.0) for t in range(10)]
    during = [rec(10 + t * 0.1, 3.0, ok=False) for t in range(200)]
    after = [rec(35 + t, 20.0) for t in range(20)]
    result = breaker_prevents_cascade(_facts(before + during + after, observations=_fault()))
    assert result.outcome == "pass", result.detail


def test_breaker_must_be_seen_open_when_its_state_is_scraped() -> None:
    records = [rec(10 + t * 0.1, 3.0, ok=False) for t in range(200)]
    records += [rec(35 + t, 20.0) for t in range(20)]
    key = "ray_gateway_breaker_state{breaker=mock-gpt}"
    closed = _facts(records, {key: [(5.0, 0.0), (20.0, 0.0)]}, observations=_fault())
    assert "no breaker reported open" in breaker_prevents_cascade(closed).detail
    opened = _facts(records, {key: [(5.0, 0.0), (20.0, 1.0)]}, observations=_fault())
    assert breaker_prevents_cascade(opened).outcome == "pass"


def test_breaker_fails_on_a_cascade() -> None:
    during = [rec(10 + t * 0.5, 2100.0, ok=False) for t in range(40)]
    after = [rec(35 + t, 20.0, ok=t % 2 == 0) for t in range(25)]
    result = breaker_prevents_cascade(_facts(during + after, observations=_fault(calls=40)))
    assert result.outcome == "fail"
    assert "queued" in result.detail and "reached the failing upstream" in result.detail
    assert "ok at the end, after the fault cleared" in result.detail


def test_breaker_without_fault_is_inconclusive() -> None:
    assert breaker_prevents_cascade(_facts([])).outcome == "inconclusive"
    failed = {"fault": {"error": "no --mock-url"}}
    assert breaker_prevents_cascade(_facts([], observations=failed)).detail == "no --mock-url"


def test_cost_tracked() -> None:
    costed = [rec(i, 5.0, cost=0.001) for i in range(10)]
    recs = {"cost_recommendations": {"status": 200, "count": 2}}
    assert cost_tracked(_facts(costed, observations=recs)).outcome == "pass"
    none = {"cost_recommendations": {"status": 200, "count": 0}}
    assert cost_tracked(_facts(costed, observations=none)).outcome == "fail"
    uncosted = [*costed, rec(0, 5.0)]
    assert "x-request-cost" in cost_tracked(_facts(uncosted, observations=recs)).detail


def test_knee_at_least_target() -> None:
    assert knee_at_least_target(_facts([], knee=Knee(20, 22, 50.0, ("p95",)))).outcome == "pass"
    assert knee_at_least_target(_facts([], knee=Knee(9, 10, 20.0, ("p95",)))).outcome == "fail"
    assert knee_at_least_target(_facts([], knee=Knee(30, None, None, ()))).outcome == "pass"
    assert knee_at_least_target(_facts([], knee=Knee(None, 1, 0.0, ("p95",)))).outcome == "fail"
    assert (
        knee_at_least_target(_facts([], knee=Knee(None, None, None, ()))).outcome == "inconclusive"
    )
    assert knee_at_least_target(_facts([])).outcome == "inconclusive"


def test_no_drift() -> None:
    steady = [rec(t * 0.5, 20.0) for t in range(120)]
    assert no_drift(_facts(steady)).outcome == "pass"
    drifting = [rec(t * 0.5, 20.0 + t * 2) for t in range(120)]
    assert no_drift(_facts(drifting)).outcome == "fail"


def test_evaluate_all_runs_named_criteria_in_order() -> None:
    names = ["no_drift", "replicas_scale_up"]
    assert [r.name for r in evaluate_all(names, _facts([]))] == names
