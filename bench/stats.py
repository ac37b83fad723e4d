"""From raw request records to a run summary and per-window time series."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.records import RequestRecord, UserSample

CACHE_HITS = frozenset({"HIT", "SEMANTIC_HIT"})


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _is_shared(record: RequestRecord) -> bool:
    # x-dedup names the follower side of a coalesced request: "SHARED"/"HIT"/"FOLLOWER".
    return (record.dedup or "").upper() in {"SHARED", "HIT", "FOLLOWER", "COALESCED"}


@dataclass(slots=True)
class Summary:
    requests: int
    ok: int
    errors: int
    error_rate: float
    rate_limited: int  # 429 answers (counted in errors)
    duration_s: float
    rps: float
    latency_ms: dict[str, float | None]  # p50 p90 p95 p99 max mean
    ttft_ms: dict[str, float | None]  # p50 p95 p99 (streams only)
    itl_ms: dict[str, float | None]  # p50 p95 (mean gap per stream)
    streams: int
    cache: dict[str, int]  # x-cache value -> count ("(ABSENT)" without the header)
    cache_hit_ratio: float | None
    cache_hit_latency_ms: dict[str, float | None]  # p50 p99 of HIT/SEMANTIC_HIT responses
    dedup_shared_ratio: float | None
    cost_total: float | None
    cost_coverage: float | None  # share of ok responses that carried x-request-cost
    status: dict[str, int]
    upstream: dict[str, int]
    kinds: dict[str, int]
    tenants: dict[str, int]
    error_samples: list[str] = field(default_factory=list)


def _latency_block(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


def summarize(records: Sequence[RequestRecord], duration_s: float) -> Summary:
    ok = [r for r in records if r.ok]
    errors = len(records) - len(ok)
    streams = [r for r in ok if r.stream]
    hits = [r for r in ok if (r.cache or "").upper() in CACHE_HITS]
    with_cache = [r for r in ok if r.cache]
    costs = [r.cost for r in ok if r.cost is not None]
    duration = max(duration_s, 1e-9)
    hit_lat = [r.latency_ms for r in hits]
    return Summary(
        requests=len(records),
        ok=len(ok),
        errors=errors,
        error_rate=errors / len(records) if records else 0.0,
        rate_limited=sum(r.status == 429 for r in records),
        duration_s=duration_s,
        rps=len(records) / duration,
        latency_ms=_latency_block([r.latency_ms for r in ok]),
        ttft_ms={
            q: percentile([r.ttft_ms for r in streams if r.ttft_ms is not None], n)
            for q, n in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        itl_ms={
            q: percentile([r.itl_ms for r in streams if r.itl_ms is not None], n)
            for q, n in (("p50", 50), ("p95", 95))
        },
        streams=len(streams),
        cache=dict(Counter((r.cache or "(absent)").upper() for r in ok)),
        cache_hit_ratio=_ratio(len(hits), len(with_cache)),
        cache_hit_latency_ms={"p50": percentile(hit_lat, 50), "p99": percentile(hit_lat, 99)},
        dedup_shared_ratio=_ratio(sum(_is_shared(r) for r in ok), sum(bool(r.dedup) for r in ok)),
        cost_total=sum(costs) if costs else None,
        cost_coverage=_ratio(len(costs), len(ok)),
        status=dict(Counter(str(r.status) for r in records)),
        upstream=dict(Counter(r.upstream for r in ok if r.upstream)),
        kinds=dict(Counter(r.kind for r in records)),
        tenants=dict(Counter(r.tenant for r in records)),
        error_samples=sorted({r.error or f"HTTP {r.status}" for r in records if not r.ok})[:10],
    )


@dataclass(frozen=True, slots=True)
class Window:
    t: float  # window start, seconds from the run start
    requests: int
    rps: float
    error_rate: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    ttft_p95: float | None
    cache_hit_ratio: float | None
    dedup_shared_ratio: float | None
    users: int


def _users_at(samples: Sequence[UserSample], t: float) -> int:
    current = 0
    for sample in samples:
        if sample.t > t:
            break
        current = sample.users
    return current


def _window(t: float, width: float, chunk: list[RequestRecord], users: int) -> Window:
    ok = [r for r in chunk if r.ok]
    lat = [r.latency_ms for r in ok]
    cached = [r for r in ok if r.cache]
    deduped = [r for r in ok if r.dedup]
    hits = sum((r.cache or "").upper() in CACHE_HITS for r in cached)
    return Window(
        t=t,
        requests=len(chunk),
        rps=len(chunk) / width,
        error_rate=_ratio(len(chunk) - len(ok), len(chunk)),
        p50=percentile(lat, 50),
        p95=percentile(lat, 95),
        p99=percentile(lat, 99),
        ttft_p95=percentile([r.ttft_ms for r in ok if r.ttft_ms is not None], 95),
        cache_hit_ratio=_ratio(hits, len(cached)),
        dedup_shared_ratio=_ratio(sum(_is_shared(r) for r in deduped), len(deduped)),
        users=users,
    )


def auto_window(duration_s: float) -> float:
    """About 24 windows per run, at least 1 s: enough points to chart and to test."""
    return float(max(1, round(duration_s / 24)))


def windows(
    records: Iterable[RequestRecord],
    users: Sequence[UserSample],
    duration_s: float,
    width: float = 5.0,
) -> list[Window]:
    """Fixed windows of ``width`` s over ``[0, duration_s)``; a trailing partial window
    shorter than half a width is dropped (its rate would be misleading)."""
    count = max(1, math.floor(duration_s / width + 0.5))
    buckets: list[list[RequestRecord]] = [[] for _ in range(count)]
    for record in records:
        index = int(record.t // width)
        if 0 <= index < count:
            buckets[index].append(record)
    return [
        _window(i * width, width, chunk, _users_at(users, i * width + width / 2))
        for i, chunk in enumerate(buckets)
    ]
