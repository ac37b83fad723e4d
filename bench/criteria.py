"""The seed's success criteria, each a check over what a run observed.

A criterion returns ``inconclusive`` when the signal it needs never arrived
(no metrics scraped, no cache headers, no mock URL to inject faults): a
criterion scenario must never pass on missing evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.records import RequestRecord
from bench.slo import SLO, Knee
from bench.stats import CACHE_HITS, Summary, Window, percentile

Outcome = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True, slots=True)
class CriterionResult:
    name: str
    outcome: Outcome
    detail: str


@dataclass(slots=True)
class RunFacts:
    summary: Summary
    windows: list[Window]
    records: list[RequestRecord]
    metrics: dict[str, list[tuple[float, float]]]  # key -> [(t from run start, value)]
    slo: SLO
    knee: Knee | None = None
    target_users: int = 15
    observations: dict[str, Any] = field(default_factory=dict)  # from faults and probes


def replicas_scale_up(f: RunFacts) -> CriterionResult:
    name = "replicas_scale_up"
    series = {k: v for k, v in f.metrics.items() if "replica_healthy" in k and v}
    if not series:
        return CriterionResult(
            name,
            "inconclusive",
            "no ray_serve_deployment_replica_healthy samples (pass --metrics-url)",
        )
    grew = []
    for key, points in series.items():
        first, peak = points[0][1], max(v for _, v in points)
        if peak > first:
            grew.append(f"{key}: {first:g} -> {peak:g}")
    if grew:
        return CriterionResult(name, "pass", "; ".join(grew))
    flat = ", ".join(f"{k}={v[0][1]:g}" for k, v in series.items())
    return CriterionResult(name, "fail", f"no deployment gained replicas ({flat})")


def cache_hits_fast(f: RunFacts) -> CriterionResult:
    name = "cache_hits_fast"
    repeats = [r for r in f.records if r.ok and r.kind == "repeat"]
    if not any(r.cache for r in repeats):
        return CriterionResult(name, "inconclusive", "no x-cache header on responses")
    hits = [r for r in repeats if (r.cache or "").upper() in CACHE_HITS]
    share = len(hits) / len(repeats)
    p99 = percentile([r.latency_ms for r in hits], 99)
    limit = f.slo.cache_hit_p99_ms or 100.0
    detail = f"{len(hits)}/{len(repeats)} repeats were hits ({share:.0%}), hit p99 " + (
        "n/a" if p99 is None else f"{p99:.1f} ms (limit {limit:g} ms)"
    )
    ok = p99 is not None and p99 < limit and share >= 0.5
    return CriterionResult(name, "pass" if ok else "fail", detail)


def breaker_prevents_cascade(f: RunFacts) -> CriterionResult:
    """During an injected upstream overload the gateway must fail fast (not queue behind a
    hanging upstream), shed calls to the upstream, and recover by the end of the run
    (the last 15 %: an open breaker rightly waits out its ``wait_in_open`` first)."""
    name = "breaker_prevents_cascade"
    fault = f.observations.get("fault")
    if not fault or "error" in fault:
        why = fault.get("error") if fault else "no fault was injected (pass --mock-url)"
        return CriterionResult(name, "inconclusive", str(why))
    start, end, hang_ms = fault["start"], fault["end"], fault["hang_s"] * 1000
    grace = 3.0  # let the breaker see enough failures to open
    during = [r for r in f.records if start + grace <= r.t < end]
    tail_start = max(end + grace, f.summary.duration_s * 0.85)
    after = [r for r in f.records if r.t >= tail_start]
    if not during or not after:
        return CriterionResult(
            name, "inconclusive", "too few requests in or after the fault window"
        )
    p95 = percentile([r.latency_ms for r in during], 95) or 0.0
    recovered = sum(r.ok for r in after) / len(after)
    calls = fault.get("upstream_calls")
    shed = None if calls is None else calls / max(1, sum(start <= r.t < end for r in f.records))
    problems = []
    if hang_ms and p95 >= hang_ms / 2:
        problems.append(f"p95 {p95:.0f} ms during the fault: requests queued behind the upstream")
    if shed is not None and shed > 0.5:
        problems.append(f"{shed:.0%} of client requests still reached the failing upstream")
    if recovered < 0.95:
        problems.append(f"only {recovered:.0%} ok at the end, after the fault cleared")
    if _breaker_opened(f, start, end + grace) is False:
        problems.append("no breaker reported open (gateway_breaker_state) during the fault")
    detail = (
        f"fault p95 {p95:.0f} ms; upstream/client calls "
        + ("n/a" if shed is None else f"{shed:.0%}")
        + f"; {recovered:.0%} ok after"
    )
    return CriterionResult(name, "fail" if problems else "pass", "; ".join(problems) or detail)


def _breaker_opened(f: RunFacts, start: float, end: float) -> bool | None:
    """Whether a scraped breaker state gauge read open (1) or forced-open (3) in
    ``[start, end]``; ``None`` when no breaker state was scraped at all."""
    series = [pts for key, pts in f.metrics.items() if "breaker_state" in key]
    if not series:
        return None
    return any(v in (1.0, 3.0) for pts in series for t, v in pts if start <= t <= end)


def cost_tracked(f: RunFacts) -> CriterionResult:
    name = "cost_tracked"
    coverage = f.summary.cost_coverage
    recs = f.observations.get("cost_recommendations")
    problems = []
    if coverage is None or coverage < 0.99:
        problems.append(
            f"x-request-cost on {0 if coverage is None else coverage:.0%} of ok responses"
        )
    if not isinstance(recs, dict) or recs.get("status") != 200:
        problems.append(f"GET /v1/cost/recommendations: {recs}")
    elif not recs.get("count"):
        problems.append("no recommendations returned")
    if problems:
        return CriterionResult(name, "fail", "; ".join(problems))
    total = f.summary.cost_total or 0.0
    detail = (
        f"cost on {coverage:.0%} of responses, total {total:.6f}; {recs['count']} recommendations"
    )
    return CriterionResult(name, "pass", detail)


def knee_at_least_target(f: RunFacts) -> CriterionResult:
    name = "knee_at_least_target"
    knee = f.knee
    if knee is None or (knee.users is None and knee.breaking_users is None):
        return CriterionResult(name, "inconclusive", "no window had requests")
    if knee.users is None:
        detail = f"the SLOs were breached from the start ({knee.breaking_users} users)"
        return CriterionResult(name, "fail", detail)
    if knee.breaking_users is None:
        return CriterionResult(
            name, "pass", f"SLOs held up to {knee.users} users (no knee reached)"
        )
    reasons = ", ".join(knee.reasons)
    detail = f"knee at {knee.users} users; breached at {knee.breaking_users} users ({reasons})"
    return CriterionResult(name, "pass" if knee.users >= f.target_users else "fail", detail)


def no_drift(f: RunFacts, factor: float = 1.5) -> CriterionResult:
    name = "no_drift"
    busy = [w for w in f.windows if w.requests and w.p95 is not None]
    quarter = len(busy) // 4
    if quarter < 2:
        return CriterionResult(
            name, "inconclusive", "run too short to compare its first and last quarter"
        )
    first = percentile([w.p95 for w in busy[:quarter] if w.p95 is not None], 50) or 0.0
    last = percentile([w.p95 for w in busy[-quarter:] if w.p95 is not None], 50) or 0.0
    detail = f"median window p95 {first:.1f} ms (first quarter) -> {last:.1f} ms (last quarter)"
    return CriterionResult(name, "pass" if last <= first * factor else "fail", detail)


CRITERIA: dict[str, Callable[[RunFacts], CriterionResult]] = {
    "replicas_scale_up": replicas_scale_up,
    "cache_hits_fast": cache_hits_fast,
    "breaker_prevents_cascade": breaker_prevents_cascade,
    "cost_tracked": cost_tracked,
    "knee_at_least_target": knee_at_least_target,
    "no_drift": no_drift,
}


def evaluate_all(names: Sequence[str], facts: RunFacts) -> list[CriterionResult]:
    return [CRITERIA[n](facts) for n in names]
