"""The cost stage as the ingress uses it: admit (reserve), finish (bill, settle, record).

It runs inside the ingress replica, with no Ray hop: ``admit`` is one Redis
round trip on the request's path; ``finish`` computes the charge at once (for the
``x-request-cost`` header or the final stream chunk) and leaves the budget
settle and the ledger write to background work, off the answer's path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from pydantic import Field

from deployments.budget import (
    BudgetEvent,
    BudgetGuard,
    BudgetLimit,
    BudgetSettings,
    BudgetStatus,
    Reservation,
    Subject,
)
from deployments.cost import Charge, CostMeter, CostSettings, ServedBy
from deployments.ledger import GroupBy, Ledger, LedgerSettings, SummaryRow
from deployments.ledger_record import record_for
from deployments.recommendations import Recommendation, RecommendationSettings, recommendations
from deployments.tasks import Background
from serve_app.context import RequestContext

log = logging.getLogger(__name__)

# Subjects whose budgets this replica reports as gauges. Users are client-named, so only
# users with a budget of their own are reported by name (keys and tenants come from config).
MAX_REPORTED_SUBJECTS = 4096


class CostArgs(CostSettings):
    """``args.cost`` in config.yaml (budgets are ``args.budgets``: ``BudgetSettings``)."""

    enabled: bool = True
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    recommendations: RecommendationSettings = Field(default_factory=RecommendationSettings)


class CostTracker:
    def __init__(
        self,
        redis: aioredis.Redis,
        settings: CostArgs | None = None,
        budgets: BudgetSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_threshold: Callable[[BudgetEvent], None] | None = None,
        served_models: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``served_models``: for a public model, the upstream model names that may answer
        it (its primary, balanced targets and fallbacks); a hold covers the priciest."""
        self.settings = settings or CostArgs()
        self._served = dict(served_models or {})
        self.meter = CostMeter(self.settings)
        self.guard = BudgetGuard(redis, budgets or BudgetSettings(), clock, on_threshold)
        self._budgeted = self.guard.settings.budgets_anything
        self.ledger = Ledger(redis, self.settings.ledger, clock)
        self.clock = clock
        self._settles = Background(log, "budget settle")
        self._subjects: dict[Subject, None] = {}  # ordered: oldest first

    def reconfigure_budgets(self, budgets: BudgetSettings) -> None:
        """New budgets from now on (run time: ``PUT /admin/budgets``); holds already
        taken settle against the budgets they were taken from."""
        self.guard.settings = budgets
        self._budgeted = budgets.budgets_anything

    def start(self) -> None:
        self.ledger.start()

    async def aclose(self) -> None:
        """Finish pending settles, then flush the ledger (call at replica shutdown); a
        settle still waiting for an unreachable store gives up at its next try."""
        self.guard.closing = True
        await self._settles.drain()
        await self.ledger.aclose()

    def holds(self, ctx: RequestContext) -> bool:
        """Whether some budget may apply to the request (else admitting it holds nothing)."""
        return self._budgeted or ctx.principal.budget is not None

    async def admit(self, ctx: RequestContext, *, provider: str | None = None) -> Reservation:
        """Reserve the worst case; raises ``InsufficientQuotaError`` when a budget is spent."""
        own = ctx.principal.budget
        if not self.holds(ctx):  # no budget anywhere: nothing to price or hold
            return Reservation(ctx.call_id, 0, ())
        amount = self.meter.reservation(
            ctx.model,
            ctx.prompt_tokens_estimate,
            ctx.max_tokens,
            choices=ctx.choices,
            provider=provider,
            served_models=self._served.get(ctx.model)
            or ((ctx.target_model,) if ctx.target_model else ()),
        )
        reservation = await self.guard.reserve(
            ctx.call_id,
            tenant=ctx.principal.tenant,
            key_id=ctx.principal.key_id,
            user=ctx.user,
            amount=amount,
            key_budget=own,
        )
        if reservation.budgets:
            self._report(ctx)
        return reservation

    def _report(self, ctx: RequestContext) -> None:
        user = ctx.user if ctx.user in self.guard.settings.users else None
        subject = (ctx.principal.tenant, ctx.principal.key_id, user, ctx.principal.budget)
        if subject in self._subjects:
            return
        if len(self._subjects) >= MAX_REPORTED_SUBJECTS:
            del self._subjects[next(iter(self._subjects))]
        self._subjects[subject] = None

    async def budget_statuses(self) -> list[BudgetStatus]:
        """Every budget that applied to a request this replica admitted (the gauges)."""
        if not self._subjects:
            return []
        return await self.guard.statuses(list(self._subjects))

    def finish(
        self,
        ctx: RequestContext,
        reservation: Reservation,
        usage: Mapping[str, Any] | None,
        *,
        started_ms: int,
        completion_text: str = "",
        served_by: ServedBy = "upstream",
        cache: str = "miss",
        upstream: str = "",
        status: str = "ok",
        attempts: int = 1,
        provider: str | None = None,
        served_model: str | None = None,
    ) -> Charge:
        """Bill a finished request (also a failed one that reported usage); the settle and
        the ledger record happen in the background."""
        charge = self.meter.charge(
            ctx.model,
            usage,
            prompt_tokens_estimate=ctx.prompt_tokens_estimate,
            completion_text=completion_text,
            served_by=served_by,
            provider=provider,
            served_model=served_model,
        )
        now_ms = int(self.clock() * 1000)
        self._settle_later(reservation, charge.cost)
        self.ledger.submit(
            record_for(
                ctx,
                charge,
                ts_ms=started_ms,
                upstream=upstream,
                cache=cache,
                latency_ms=max(0, now_ms - started_ms),
                status=status,
                attempts=attempts,
            )
        )
        return charge

    def release(self, reservation: Reservation) -> None:
        """The call failed without usage: give the hold back, in the background."""
        self._settle_later(reservation, Decimal(0))

    def _settle_later(self, reservation: Reservation, cost: Decimal) -> None:
        if not reservation.budgets:  # no budget holds anything: settled, and no task
            reservation.settled = True
            return
        self._settles.spawn(self.guard.settle(reservation, cost))

    async def summary(self, group_by: GroupBy, since: date, until: date) -> list[SummaryRow]:
        return await self.ledger.summary(group_by, since, until)

    async def recommendations(
        self,
        since_ms: int,
        until_ms: int,
        key_budgets: Mapping[str, BudgetLimit] | None = None,
    ) -> list[Recommendation]:
        """``key_budgets``: the budgets keys made at run time carry, by key id, which
        replace the configured per-key ones for them."""
        records = await self.ledger.records(since_ms, until_ms)
        own = key_budgets or {}
        statuses: dict[tuple[str, str, str], BudgetStatus] = {}
        for tenant, key_id, user in {(r.tenant, r.key_id, r.user) for r in records}:
            for s in await self.guard.status(tenant, key_id, user, own.get(key_id)):
                statuses[(s.scope, s.subject, s.period)] = s
        now = datetime.fromtimestamp(self.clock(), UTC)
        return recommendations(
            records, statuses.values(), self.meter.book, now, self.settings.recommendations
        )
