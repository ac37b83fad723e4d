"""The ingress-facing cost stage: admit, finish, release, then read back."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from deployments.budget import BudgetLimit, BudgetSettings
from deployments.cost_tracker import CostArgs, CostTracker
from serve_app.context import Principal, RequestContext
from serve_app.errors import InsufficientQuotaError

pytestmark = pytest.mark.integration

USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 90,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 30},
}


def ctx(request_id: str, stream: bool = False) -> RequestContext:
    return RequestContext(
        request_id=request_id,
        call_id=request_id,  # the ledger's record id: what the test looks records up by
        principal=Principal(key_id="k1", tenant="acme"),
        route="chat",
        model="o4-mini",
        body={"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        stream=stream,
        end_user="ann",
        prompt_tokens_estimate=40,
        max_tokens=100,
    )


def tracker(redis: aioredis.Redis, daily_usd: str = "1") -> CostTracker:
    budgets = BudgetSettings(keys={"k1": BudgetLimit(daily_usd=Decimal(daily_usd))})
    t = CostTracker(redis, CostArgs(), budgets)
    t.start()
    return t


async def test_streamed_and_plain_requests_are_billed_alike(redis_client: aioredis.Redis) -> None:
    t = tracker(redis_client)
    now_ms = int(time.time() * 1000)
    charges = []
    for rid, stream in (("plain", False), ("streamed", True)):
        held = await t.admit(ctx(rid, stream))
        charges.append(
            t.finish(ctx(rid, stream), held, USAGE, started_ms=now_ms, upstream="openai")
        )
    await t.aclose()
    plain, streamed = [await t.ledger.get(rid) for rid in ("plain", "streamed")]
    assert plain is not None and streamed is not None
    assert plain.cost_pico == streamed.cost_pico == charges[0].cost_pico > 0
    assert streamed.stream and not plain.stream
    [status] = await t.guard.status("acme", "k1")
    assert status.spent == 2 * charges[0].cost and status.held == 0


async def test_a_cache_hit_records_savings_not_spend(redis_client: aioredis.Redis) -> None:
    t = tracker(redis_client)
    held = await t.admit(ctx("hit"))
    charge = t.finish(ctx("hit"), held, USAGE, started_ms=0, served_by="cache", cache="hit")
    await t.aclose()
    rec = await t.ledger.get("hit")
    assert rec is not None and rec.cost_pico == 0 and rec.savings_pico == charge.savings_pico > 0
    [status] = await t.guard.status("acme", "k1")
    assert (status.spent, status.held) == (0, 0)


async def test_release_after_a_failed_call_and_refusal_when_spent(
    redis_client: aioredis.Redis,
) -> None:
    # o4-mini worst case: 40 * 1.1 + 100 * 4.4 per 1e6 = $0.000484; the budget fits one.
    t = tracker(redis_client, daily_usd="0.0005")
    held = await t.admit(ctx("first"))
    with pytest.raises(InsufficientQuotaError):
        await t.admit(ctx("second"))
    t.release(held)
    await t.aclose()
    assert (await t.admit(ctx("third"))).amount == Decimal("0.000484")


async def test_recommendations_read_the_ledger(redis_client: aioredis.Redis) -> None:
    t = tracker(redis_client, daily_usd="1000")
    now_ms = int(time.time() * 1000)
    for i in range(30):  # the same short question over and over, never cached
        held = await t.admit(ctx(f"r{i}"))
        t.finish(ctx(f"r{i}"), held, USAGE, started_ms=now_ms)
    await t.aclose()
    rules = {r.rule for r in await t.recommendations(now_ms - 1, now_ms + 1)}
    assert rules == {"cache"}
    today = datetime.now(UTC).date()
    [row] = await t.summary("user", today, today)
    assert (row.group, row.requests) == ("ann", 30)


def user_ctx(request_id: str, user: str) -> RequestContext:
    base = ctx(request_id)
    return RequestContext(
        request_id=request_id,
        principal=base.principal,
        route="chat",
        model=base.model,
        body=base.body,
        end_user=user,
        prompt_tokens_estimate=40,
        max_tokens=100,
    )


async def test_budget_statuses_report_each_budget_in_use_once(
    redis_client: aioredis.Redis,
) -> None:
    budgets = BudgetSettings(
        keys={"k1": BudgetLimit(daily_usd=Decimal("1"))},
        users={"bob": BudgetLimit(monthly_usd=Decimal("2"))},
        default_user=BudgetLimit(daily_usd=Decimal("0.5")),
    )
    t = CostTracker(redis_client, CostArgs(), budgets)
    t.start()
    assert await t.budget_statuses() == []  # nothing admitted yet: nothing to report
    now_ms = int(time.time() * 1000)
    charge = None
    for rid, user in (("r-ann", "ann"), ("r-bob", "bob"), ("r-bob-2", "bob"), ("r-cy", "cy")):
        held = await t.admit(user_ctx(rid, user))
        charge = t.finish(user_ctx(rid, user), held, USAGE, started_ms=now_ms)
    await t.aclose()  # settles every hold
    statuses = {(s.scope, s.tenant, s.subject, s.period): s for s in await t.budget_statuses()}
    # Users named by the client are reported only when they have a budget of their own.
    assert set(statuses) == {("key", "acme", "k1", "daily"), ("user", "acme", "bob", "monthly")}
    assert charge is not None
    key = statuses[("key", "acme", "k1", "daily")]
    assert key.held == 0 and key.spent == 4 * charge.cost
    assert key.remaining == Decimal("1") - 4 * charge.cost
    assert statuses[("user", "acme", "bob", "monthly")].spent == 2 * charge.cost
