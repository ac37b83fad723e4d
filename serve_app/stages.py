"""The DAG's stages as one replica holds them, built from ``GatewayArgs``.

Stages never call each other: the ingress runs them in order. All but the
semantic cache run in the ingress replica against Redis (one round trip
each); the semantic cache is its own deployment, reached through a handle.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis

from deployments.budget import BudgetEvent
from deployments.concurrency import ConcurrencyLimiter
from deployments.cost_tracker import CostTracker
from deployments.dedup_redis import RedisSingleFlight
from deployments.exact_cache import ExactCache
from deployments.limiter import RateLimiter
from deployments.limiter_decision import LimitDecision
from deployments.resilience import Resilience, Target
from deployments.target_limits import TargetLimits
from deployments.tasks import cancel_and_wait
from serve_app.metrics import DeltaExporter, MetricSink, NullMetrics
from serve_app.settings import GatewayArgs
from serve_app.store import Store

log = logging.getLogger(__name__)
SYNC_INTERVAL_S = 1.0
BUDGET_GAUGE_INTERVAL_S = 10.0  # one pipelined read of the budgets this replica has seen


class SemanticCacheClient(Protocol):
    """What the ingress needs of the semantic tier (a Serve handle or a local object)."""

    async def check(
        self, scope: str, text: str, namespace: str, max_age_s: float | None = None
    ) -> Any: ...

    async def store(
        self, scope: str, text: str, namespace: str, body: bytes, ttl: float | None = None
    ) -> None: ...

    async def invalidate_namespace(self, namespace: str | None) -> int: ...


class HandleSemanticClient:
    """The semantic deployment behind a Serve handle, as a ``SemanticCacheClient``."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def check(
        self, scope: str, text: str, namespace: str, max_age_s: float | None = None
    ) -> Any:
        return await self._handle.check.remote(scope, text, namespace, max_age_s=max_age_s)

    async def store(
        self, scope: str, text: str, namespace: str, body: bytes, ttl: float | None = None
    ) -> None:
        await self._handle.store.remote(scope, text, namespace, body, ttl)

    async def invalidate_namespace(self, namespace: str | None) -> int:
        return int(await self._handle.invalidate_namespace.remote(namespace))


class _LimiterMetrics:
    def __init__(self, sink: MetricSink) -> None:
        self._sink = sink

    def on_decision(self, decision: LimitDecision) -> None:
        if decision.outcome in ("unlimited", "disabled"):  # no quota applied: nothing decided
            return
        label = decision.hit.label if decision.hit else ""
        self._sink.inc(
            "gateway_ratelimit_decisions_total", 1, {"outcome": decision.outcome, "limit": label}
        )
        self._sink.observe("gateway_ratelimit_decision_seconds", decision.latency_s)
        for hit in decision.shadow_hits:
            self._sink.inc(
                "gateway_ratelimit_decisions_total",
                1,
                {"outcome": "shadow_hit", "limit": hit.label},
            )

    def on_store_error(self, operation: str) -> None:
        self._sink.inc("gateway_ratelimit_store_errors_total", 1, {"operation": operation})

    def on_lease(self, granted: int, used: int) -> None:
        self._sink.inc("gateway_ratelimit_leases_total")
        if used:
            self._sink.inc("gateway_ratelimit_leased_requests_total", used)


@dataclass
class Stages:
    limiter: RateLimiter
    exact: ExactCache
    dedup: RedisSingleFlight
    resilience: Resilience
    cost: CostTracker
    metrics: MetricSink
    redis: aioredis.Redis
    concurrency: ConcurrencyLimiter
    semantic: SemanticCacheClient | None = None
    _deltas: DeltaExporter | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        args: GatewayArgs,
        store: Store,
        metrics: MetricSink | None = None,
        semantic: SemanticCacheClient | None = None,
    ) -> Stages:
        sink = metrics or NullMetrics()
        redis = store.redis

        def on_threshold(event: BudgetEvent) -> None:
            log.warning(
                "budget %s %s (%s) crossed %.0f%%: spent %s of %s",
                event.scope,
                event.subject,
                event.period,
                event.threshold * 100,
                event.spent,
                event.limit,
            )
            sink.inc(
                "gateway_budget_threshold_events_total",
                1,
                {"scope": str(event.scope), "period": str(event.period)},
            )

        limiter = RateLimiter(redis, args.limits, observer=_LimiterMetrics(sink))
        cost = CostTracker(
            redis,
            args.cost,
            args.budgets,
            on_threshold=on_threshold,
            served_models=args.served_models(),
        )

        def price(target: Target) -> float | None:
            found = cost.meter.book.find(target.model)
            return None if found is None else float(found.rates.input + found.rates.output)

        return cls(
            limiter=limiter,
            exact=ExactCache(redis, args.cache.exact),
            dedup=RedisSingleFlight(redis, args.dedup),
            resilience=Resilience.with_redis(
                args.resilience,
                redis,
                TargetLimits(limiter, args.resilience.balance),
                price=price,
            ),
            cost=cost,
            metrics=sink,
            redis=redis,
            concurrency=ConcurrencyLimiter(redis, args.request_timeout_s + 60),
            semantic=semantic,
            _deltas=DeltaExporter(sink),
        )

    async def start(self) -> None:
        self.cost.start()
        await self.dedup.start()
        await self.exact.start()
        self._tasks.append(asyncio.create_task(self._sync_forever()))
        if self.cost.guard.settings.budgets_anything:
            self._tasks.append(asyncio.create_task(self._budgets_forever()))

    async def aclose(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        await self.resilience.drain()
        await self.limiter.drain()
        await self.dedup.close()
        await self.exact.close()
        await self.cost.aclose()

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                self.sync_metrics()
            except Exception:
                log.exception("metrics sync failed")

    async def _budgets_forever(self) -> None:
        while True:
            await asyncio.sleep(BUDGET_GAUGE_INTERVAL_S)
            try:
                await self.export_budgets()
            except Exception as exc:  # Redis down: the gauges keep their last values
                log.warning("budget gauges not refreshed: %s", exc)

    async def export_budgets(self) -> None:
        """What is left of each budget this replica has admitted requests against."""
        for status in await self.cost.budget_statuses():
            tags = {
                "scope": status.scope,
                "tenant": status.tenant,
                "subject": status.subject,
                "period": status.period,
            }
            self.metrics.set("gateway_budget_remaining_usd", float(status.remaining), tags)

    def sync_metrics(self) -> None:
        """Export the stages' own cumulative counters as metric deltas."""
        deltas = self._deltas
        if deltas is None:
            return
        m = self.resilience.metrics
        deltas.export(
            "gateway_breaker_transitions_total",
            m.transitions,
            ("breaker", "from_state", "to_state"),
        )
        deltas.export("gateway_breaker_refused_total", m.refused, ("breaker",))
        deltas.export("gateway_retries_total", m.retries, ("upstream",))
        deltas.export("gateway_retries_over_budget_total", m.retries_over_budget, ("upstream",))
        deltas.export("gateway_fallbacks_total", m.fallbacks, ("from_breaker", "to_breaker"))
        deltas.export("gateway_balancer_picks_total", m.picks, ("model", "target"))
        deltas.export("gateway_context_fallbacks_total", m.context_fallbacks, ("breaker",))
        deltas.export("gateway_bulkhead_rejected_total", m.bulkhead_rejected, ("upstream",))
        deltas.export("gateway_target_limited_total", m.target_limited, ("target",))
        for breaker, state in m.states.items():
            self.metrics.set("gateway_breaker_state", float(int(state)), {"breaker": breaker})
        deltas.export_total(
            "gateway_upstream_calls_saved_total", float(self.dedup.stats.upstream_calls_saved)
        )
        deltas.export_total(
            "gateway_dedup_streams_stopped_total", float(self.dedup.stats.streams_stopped)
        )
        deltas.export_total("gateway_ledger_dropped_records_total", float(self.cost.ledger.dropped))
        self.metrics.flush()
