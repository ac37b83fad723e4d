"""Service-level objectives: loaded from YAML, checked against a run summary.

Every objective is optional; an objective whose signal never appeared in the
run (no streams, no cache hits) is reported as ``skipped``, not passed, so a
verdict never silently rests on nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from bench.stats import Summary, Window

DEFAULT_SLO_FILE = Path(__file__).with_name("slo.yaml")

Outcome = Literal["pass", "fail", "skipped"]


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_p50_ms: float | None = Field(None, gt=0)
    latency_p95_ms: float | None = Field(None, gt=0)
    latency_p99_ms: float | None = Field(None, gt=0)
    error_rate_max: float | None = Field(None, ge=0, le=1)
    ttft_p95_ms: float | None = Field(None, gt=0)
    cache_hit_p99_ms: float | None = Field(None, gt=0)
    min_rps: float | None = Field(None, ge=0)
    min_requests: int = Field(1, ge=0)  # fewer requests than this: the run proves nothing
    # False: 429s (the gateway's limits working as configured) do not count as errors.
    rate_limited_is_error: bool = True


def load_slo(path: Path | None = None) -> SLO:
    data = yaml.safe_load((path or DEFAULT_SLO_FILE).read_text()) or {}
    return SLO.model_validate(data.get("slo", data))


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    outcome: Outcome
    observed: float | None
    limit: float
    comparison: Literal["<=", ">="]
    note: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.outcome == "fail"]


def _check(
    name: str, observed: float | None, limit: float | None, comparison: Literal["<=", ">="]
) -> Check | None:
    if limit is None:
        return None
    if observed is None:
        return Check(name, "skipped", None, limit, comparison, "no samples for this signal")
    ok = observed <= limit if comparison == "<=" else observed >= limit
    return Check(name, "pass" if ok else "fail", observed, limit, comparison)


def _error_rate(summary: Summary, slo: SLO) -> float | None:
    if not summary.requests:
        return None
    errors = summary.errors - (0 if slo.rate_limited_is_error else summary.rate_limited)
    return errors / summary.requests


def evaluate(summary: Summary, slo: SLO) -> Verdict:
    lat = summary.latency_ms
    candidates = [
        _check("requests", float(summary.requests), float(slo.min_requests), ">="),
        _check("latency p50 ms", lat["p50"], slo.latency_p50_ms, "<="),
        _check("latency p95 ms", lat["p95"], slo.latency_p95_ms, "<="),
        _check("latency p99 ms", lat["p99"], slo.latency_p99_ms, "<="),
        _check("error rate", _error_rate(summary, slo), slo.error_rate_max, "<="),
        _check("ttft p95 ms", summary.ttft_ms["p95"], slo.ttft_p95_ms, "<="),
        _check(
            "cache-hit latency p99 ms",
            summary.cache_hit_latency_ms["p99"],
            slo.cache_hit_p99_ms,
            "<=",
        ),
        _check("throughput req/s", summary.rps if summary.requests else None, slo.min_rps, ">="),
    ]
    checks = tuple(c for c in candidates if c is not None)
    return Verdict(all(c.outcome != "fail" for c in checks), checks)


def window_breaches(window: Window, slo: SLO) -> list[str]:
    """The latency/error objectives a single window breaks (used to find the knee)."""
    out = []
    if window.requests == 0:
        return out
    for name, observed, limit in (
        ("p95", window.p95, slo.latency_p95_ms),
        ("p99", window.p99, slo.latency_p99_ms),
        ("error rate", window.error_rate, slo.error_rate_max),
    ):
        if limit is not None and observed is not None and observed > limit:
            out.append(name)
    return out


@dataclass(frozen=True, slots=True)
class Knee:
    users: int | None  # the most users at which every window still met the SLOs
    breaking_users: int | None  # users in the first of ``sustain`` consecutive breaching windows
    breached_at_s: float | None
    reasons: tuple[str, ...]


def find_knee(series: Sequence[Window], slo: SLO, sustain: int = 2) -> Knee:
    """The knee of a ramp: where ``sustain`` consecutive windows first breach the SLOs.

    One breaching window alone (a GC pause, a scale-up) is not a knee.
    """
    best_ok: int | None = None
    run: list[Window] = []
    for window in series:
        reasons = window_breaches(window, slo)
        if not reasons:
            run.clear()
            if window.requests:
                best_ok = max(best_ok or 0, window.users)
            continue
        run.append(window)
        if len(run) >= sustain:
            first = run[0]
            all_reasons = sorted({r for w in run for r in window_breaches(w, slo)})
            return Knee(best_ok, first.users, first.t, tuple(all_reasons))
    return Knee(best_ok, None, None, ())
