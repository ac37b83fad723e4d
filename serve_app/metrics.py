"""The gateway's Prometheus metrics, through ``ray.serve.metrics`` so that Ray's
metrics agent exports them with deployment/replica/application labels (Ray
prefixes each name with ``ray_``: ``gateway_requests_total`` is scraped as
``ray_gateway_requests_total``). Units are seconds and USD; counters end in
``_total``.

Outside a Serve replica (unit tests, a plain ``Gateway``) every call is a
no-op. Counters the stages keep themselves (breaker transitions, dedup
savings) are exported as deltas by ``sync``, called on a timer.

Histograms are added up in the replica too (``HistogramBuffer``) and exported
as the series a Prometheus histogram is made of, ``<name>_bucket{le}``,
``<name>_sum`` and ``<name>_count``, as Ray gauges holding each replica's
cumulative counts: ``rate()`` and ``histogram_quantile()`` read them as they
read a native histogram. Not as Ray histograms, because Ray's metrics agent
replays every observation of a Ray histogram one by one into its own
OpenTelemetry instrument (``record_histogram_aggregated_batch``): two a request
cost the node's agent ~80-110 us of CPU per request at ~1-2k requests/s
(measured from ``/proc`` under ``bench.passthrough``'s load), where a flush of
these series costs it the same whatever the request rate.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as CounterType
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_FAST_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]

# name -> (kind, description, tag keys, buckets)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "gateway_requests_total": (
        "counter",
        "Requests by route, model and status.",
        ("route", "model", "status"),
        None,
    ),
    "gateway_request_duration_seconds": (
        "histogram",
        "End-to-end request latency.",
        ("route", "model"),
        _LATENCY_BUCKETS,
    ),
    "gateway_stage_duration_seconds": (
        "histogram",
        "Time spent in each DAG stage.",
        ("stage",),
        _LATENCY_BUCKETS,
    ),
    "gateway_upstream_duration_seconds": (
        "histogram",
        "Upstream call latency (whole answer).",
        ("upstream",),
        _LATENCY_BUCKETS,
    ),
    "gateway_upstream_ttft_seconds": (
        "histogram",
        "Upstream time to first streamed byte.",
        ("upstream",),
        _LATENCY_BUCKETS,
    ),
    "gateway_cache_results_total": (
        "counter",
        "Cache outcomes (HIT, SEMANTIC_HIT, MISS, BYPASS).",
        ("result",),
        None,
    ),
    "gateway_semantic_lookup_failures_total": (
        "counter",
        "Semantic lookups taken as misses: the tier was busy (shed), timed out or failed.",
        ("reason",),
        None,
    ),
    "gateway_dedup_requests_total": ("counter", "Requests by single-flight role.", ("role",), None),
    "gateway_upstream_calls_saved_total": (
        "counter",
        "Upstream calls saved by coalescing.",
        (),
        None,
    ),
    "gateway_dedup_streams_stopped_total": (
        "counter",
        "Coalesced upstream streams stopped because every client reading them had left.",
        (),
        None,
    ),
    "gateway_ratelimit_decisions_total": (
        "counter",
        "Rate-limit decisions by outcome and limit.",
        ("outcome", "limit"),
        None,
    ),
    "gateway_ratelimit_decision_seconds": (
        "histogram",
        "Rate-limit decision latency.",
        (),
        _FAST_BUCKETS,
    ),
    "gateway_ratelimit_leases_total": (
        "counter",
        "Rate-limit leases ended (deployments/limiter_lease.py).",
        (),
        None,
    ),
    "gateway_ratelimit_leased_requests_total": (
        "counter",
        "Requests admitted from a lease, with no store round trip.",
        (),
        None,
    ),
    "gateway_ratelimit_store_errors_total": (
        "counter",
        "Limiter store errors.",
        ("operation",),
        None,
    ),
    "gateway_breaker_state": (
        "gauge",
        "Breaker state: 0 closed, 1 open, 2 half-open, 3 forced-open, 4 disabled, 5 metrics-only.",
        ("breaker",),
        None,
    ),
    "gateway_breaker_transitions_total": (
        "counter",
        "Breaker state transitions.",
        ("breaker", "from_state", "to_state"),
        None,
    ),
    "gateway_breaker_refused_total": (
        "counter",
        "Calls refused by an open breaker.",
        ("breaker",),
        None,
    ),
    "gateway_retries_total": ("counter", "Upstream retries.", ("upstream",), None),
    "gateway_retries_over_budget_total": (
        "counter",
        "Retries not made: the upstream's retry budget was spent.",
        ("upstream",),
        None,
    ),
    "gateway_fallbacks_total": (
        "counter",
        "Fallbacks to the next target.",
        ("from_breaker", "to_breaker"),
        None,
    ),
    "gateway_target_limited_total": (
        "counter",
        "Calls that passed over a balanced target at its rpm/tpm.",
        ("target",),
        None,
    ),
    "gateway_prompt_guard_blocked_total": (
        "counter",
        "Requests the prompt guard refused, by the rule that refused them (deny or allow).",
        ("rule",),
        None,
    ),
    "gateway_context_fallbacks_total": (
        "counter",
        "Requests too long for a target's context window, handed to the model's context fallbacks.",
        ("breaker",),
        None,
    ),
    "gateway_balancer_picks_total": (
        "counter",
        "Calls of a balanced model, by the target picked first (upstream/model).",
        ("model", "target"),
        None,
    ),
    "gateway_bulkhead_rejected_total": (
        "counter",
        "Calls refused by a full bulkhead.",
        ("upstream",),
        None,
    ),
    "gateway_spend_usd_total": ("counter", "Spend in USD.", ("model", "tenant"), None),
    "gateway_savings_usd_total": (
        "counter",
        "Cost avoided by cache hits and coalescing.",
        ("model", "served_by"),
        None,
    ),
    "gateway_tokens_total": ("counter", "Tokens by kind.", ("model", "kind"), None),
    "gateway_budget_remaining_usd": (
        "gauge",
        "USD left in a budget (limit - spent - held) this period, for budgets in use.",
        ("scope", "tenant", "subject", "period"),
        None,
    ),
    "gateway_ledger_dropped_records_total": (
        "counter",
        "Cost-ledger records lost: the writer's queue was full, the store refused a batch on "
        "every try, or it was still unreachable at shutdown.",
        (),
        None,
    ),
    "gateway_budget_threshold_events_total": (
        "counter",
        "Budget soft-threshold crossings.",
        ("scope", "period"),
        None,
    ),
}


class MetricSink(Protocol):
    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None: ...

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...

    def flush(self) -> None: ...


class NullMetrics:
    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        pass

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        pass

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        pass

    def flush(self) -> None:
        pass


_Key = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, tags: Mapping[str, str] | None) -> _Key:
    # Unsorted: a call site builds its tags in one order. Two orders of the same tags
    # would only be two buffered entries, each added to the same series at flush.
    return name, tuple(tags.items()) if tags else ()


class HistogramBuffer:
    """One histogram series' observations since the replica started: a count per
    bucket (an observation goes in the first whose bound it does not exceed, as
    Prometheus' ``le``; past the last, in ``+Inf``) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, observations at or under it)`` for every bucket, ``+Inf`` last."""
        labels = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        out, running = [], 0
        for label, count in zip(labels, self.counts, strict=True):
            running += count
            out.append((label, running))
        return out


class ServeMetrics:
    """The real thing, for use inside a Serve replica.

    Recording a Ray metric costs more than a Redis round trip (measured with
    py-spy in a replica), so counters, gauges and histograms add up in memory
    and reach Ray on ``flush`` (once a second, from the stages' sync loop)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._metrics: dict[str, Any] = {}
        self._counts: dict[_Key, float] = {}
        self._gauges: dict[_Key, float] = {}
        self._buckets: dict[str, list[float]] = {}
        self._histograms: dict[_Key, HistogramBuffer] = {}
        for name, (kind, description, tags, buckets) in DEFINITIONS.items():
            if kind == "counter":
                self._metrics[name] = metrics.Counter(name, description, tag_keys=tags)
            elif kind == "gauge":
                self._metrics[name] = metrics.Gauge(name, description, tag_keys=tags)
            else:
                self._buckets[name] = buckets or []
                for suffix, keys in (("_bucket", (*tags, "le")), ("_sum", tags), ("_count", tags)):
                    self._metrics[name + suffix] = metrics.Gauge(
                        name + suffix, description, tag_keys=keys
                    )

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if value > 0:
            key = _key(name, tags)
            self._counts[key] = self._counts.get(key, 0.0) + value

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        key = _key(name, tags)
        if (series := self._histograms.get(key)) is None:
            series = self._histograms[key] = HistogramBuffer(self._buckets[name])
        series.add(value)

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._gauges[_key(name, tags)] = value

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for (name, tags), value in counts.items():
            self._metrics[name].inc(value, tags=dict(tags))
        # Every gauge and histogram series is sent again at each flush, changed or not:
        # Ray's agent drops a gauge value no process re-reported within two report
        # intervals, and a quiet series would vanish from the scrape between requests.
        for (name, tags), value in self._gauges.items():
            self._metrics[name].set(value, tags=dict(tags))
        for (name, tags), series in self._histograms.items():
            self._export(name, dict(tags), series)

    def _export(self, name: str, tags: dict[str, str], series: HistogramBuffer) -> None:
        buckets, count = self._metrics[name + "_bucket"], 0
        for le, count in series.cumulative():
            buckets.set(count, tags={**tags, "le": le})
        self._metrics[name + "_sum"].set(series.total, tags=tags)
        self._metrics[name + "_count"].set(count, tags=tags)  # the +Inf bucket's


class DeltaExporter:
    """Turns a stage's cumulative counters into counter increments."""

    def __init__(self, sink: MetricSink) -> None:
        self._sink = sink
        self._seen: dict[tuple[str, Any], float] = {}

    def export(self, name: str, counts: Mapping[Any, float], tag_keys: tuple[str, ...]) -> None:
        for key, total in counts.items():
            previous = self._seen.get((name, key), 0.0)
            if total > previous:
                parts = key if isinstance(key, tuple) else (key,)
                tags = dict(zip(tag_keys, (str(p) for p in parts), strict=False))
                self._sink.inc(name, total - previous, tags)
                self._seen[(name, key)] = total

    def export_total(self, name: str, total: float) -> None:
        self.export(name, CounterType({(): total}), ())
