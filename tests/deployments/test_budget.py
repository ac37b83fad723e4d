"""Budgets: all-or-none reservations, no overshoot under concurrency, settle, release."""

from __future__ import annotations

import asyncio
import pickle
import time
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from deployments.budget import BudgetEvent, BudgetGuard, BudgetLimit, BudgetSettings, Reservation
from deployments.cost import CostMeter
from deployments.ledger import Ledger
from deployments.ledger_record import LedgerRecord
from deployments.tokens import estimate_prompt_tokens
from serve_app.errors import InsufficientQuotaError, StoreUnavailableError
from tests.support import OwnStore

pytestmark = pytest.mark.integration

TENANT, KEY = "acme", "k1"


def guard(redis: aioredis.Redis, **settings: object) -> BudgetGuard:
    return BudgetGuard(redis, BudgetSettings.model_validate(settings))


async def test_fifty_concurrent_requests_fit_ten_and_the_ledger_adds_up(
    redis_client: aioredis.Redis,
) -> None:
    meter = CostMeter()
    messages = [{"role": "user", "content": "Summarise the plot of Hamlet in two lines."}]
    prompt = estimate_prompt_tokens(messages)
    worst = meter.reservation("gpt-4o-mini", prompt, 200)
    budgets = guard(redis_client, keys={KEY: {"daily_usd": str(worst * 10)}})
    start = asyncio.Event()

    async def one(i: int) -> Reservation | InsufficientQuotaError:
        await start.wait()
        try:
            return await budgets.reserve(
                f"r{i}", tenant=TENANT, key_id=KEY, user=None, amount=worst
            )
        except InsufficientQuotaError as exc:
            return exc

    tasks = [asyncio.create_task(one(i)) for i in range(50)]
    start.set()
    outcomes = await asyncio.gather(*tasks)
    admitted = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(admitted) == 10
    assert sum(isinstance(o, InsufficientQuotaError) for o in outcomes) == 40

    ledger = Ledger(redis_client)
    records = []
    for n, reservation in enumerate(admitted):
        usage = {"prompt_tokens": prompt + n, "completion_tokens": 150 + 5 * n}
        charge = meter.charge("gpt-4o-mini", usage)
        await budgets.settle(reservation, charge.cost)
        records.append(_record(reservation.request_id, charge.cost_pico))
    assert await ledger.write(records) == 10

    [status] = await budgets.status(TENANT, KEY)
    recorded = sum((r.cost for r in records), Decimal(0))
    assert status.held == 0
    assert status.spent == recorded <= status.limit + worst
    [row] = await ledger.summary("key", *_today())
    assert row.cost == recorded and row.requests == 10


async def test_a_reservation_must_fit_every_applicable_budget(redis_client: aioredis.Redis) -> None:
    budgets = guard(
        redis_client,
        keys={KEY: {"daily_usd": "10", "monthly_usd": "100"}},
        users={"ann": {"daily_usd": "1"}},
        default_tenant={"monthly_usd": "1000"},
    )
    refs = budgets.applicable(TENANT, KEY, "ann")
    assert {(r.scope, r.period) for r in refs} == {
        ("key", "daily"),
        ("key", "monthly"),
        ("user", "daily"),
        ("tenant", "monthly"),
    }
    with pytest.raises(InsufficientQuotaError) as caught:
        await budgets.reserve("big", tenant=TENANT, key_id=KEY, user="ann", amount=Decimal("1.5"))
    assert "user 'ann'" in caught.value.message
    # Nothing was held anywhere by the refused request: the key budget still fits 10.
    ok = await budgets.reserve("r1", tenant=TENANT, key_id=KEY, user="bob", amount=Decimal(10))
    assert len(ok.budgets) == 3


async def test_exhausted_budget_error_is_insufficient_quota(redis_client: aioredis.Redis) -> None:
    for status_code in (429, 402):
        budgets = guard(redis_client, keys={KEY: {"daily_usd": "0.01"}}, status_code=status_code)
        with pytest.raises(InsufficientQuotaError) as caught:
            await budgets.reserve("r", tenant=TENANT, key_id=KEY, user=None, amount=Decimal("0.02"))
        error = caught.value
        assert (error.status_code, error.type, error.code) == (
            status_code,
            "insufficient_quota",
            "insufficient_quota",
        )
        assert error.headers["x-should-retry"] == "false"
        clone = pickle.loads(pickle.dumps(error))
        assert (clone.status_code, clone.headers) == (status_code, error.headers)


async def test_failed_request_releases_its_reservation(redis_client: aioredis.Redis) -> None:
    budgets = guard(redis_client, keys={KEY: {"daily_usd": "1"}})
    held = await budgets.reserve("r1", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))
    with pytest.raises(InsufficientQuotaError):
        await budgets.reserve("r2", tenant=TENANT, key_id=KEY, user=None, amount=Decimal("0.5"))
    await budgets.release(held)
    [status] = await budgets.status(TENANT, KEY)
    assert (status.spent, status.held, status.remaining) == (0, 0, 1)
    await budgets.reserve("r3", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))


async def test_settle_charges_actual_once(redis_client: aioredis.Redis) -> None:
    budgets = guard(redis_client, keys={KEY: {"monthly_usd": "1"}})
    held = await budgets.reserve("r1", tenant=TENANT, key_id=KEY, user=None, amount=Decimal("0.5"))
    await budgets.settle(held, Decimal("0.125"))
    await budgets.settle(held, Decimal("0.125"))
    [status] = await budgets.status(TENANT, KEY)
    assert (status.spent, status.held) == (Decimal("0.125"), 0)


class LostReply:
    """A settle script that runs, but whose reply never arrives (the connection drops
    after the command went out), once; then the real one."""

    def __init__(self, script: object) -> None:
        self.script, self.lost = script, False

    async def __call__(self, *, keys: list[str], args: list[object]) -> object:
        reply = await self.script(keys=keys, args=args)  # type: ignore[operator]
        if not self.lost:
            self.lost = True
            raise RedisConnectionError("Connection closed by server.")
        return reply


async def test_a_retried_settle_whose_first_attempt_ran_charges_once(
    redis_client: aioredis.Redis,
) -> None:
    budgets = guard(redis_client, keys={KEY: {"monthly_usd": "1"}})
    budgets._settle = LostReply(budgets._settle)  # type: ignore[assignment]
    held = await budgets.reserve("r1", tenant=TENANT, key_id=KEY, user=None, amount=Decimal("0.5"))
    await budgets.settle(held, Decimal("0.125"))
    assert budgets._settle.lost  # type: ignore[attr-defined]
    [status] = await budgets.status(TENANT, KEY)
    assert (status.spent, status.held) == (Decimal("0.125"), 0)


async def test_a_settle_waits_out_a_store_restart(own_store: OwnStore) -> None:
    """A settle that failed used to be dropped: the request's spend never reached its
    budget (its hold expired 15 minutes later), so the budget could be overspent."""
    budgets = guard(own_store.client, keys={KEY: {"daily_usd": "1"}})
    held = await budgets.reserve("r1", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))
    await own_store.kill()
    settling = asyncio.create_task(budgets.settle(held, Decimal("0.25")))
    await asyncio.sleep(1.0)
    assert not settling.done()
    await own_store.start()  # same data: the hold is still there
    await asyncio.wait_for(settling, timeout=10)
    [status] = await budgets.status(TENANT, KEY)
    assert (status.spent, status.held) == (Decimal("0.25"), 0)


async def test_a_closing_guard_stops_waiting_for_the_store(own_store: OwnStore) -> None:
    budgets = guard(own_store.client, keys={KEY: {"daily_usd": "1"}})
    held = await budgets.reserve("r1", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))
    await own_store.kill()
    settling = asyncio.create_task(budgets.settle(held, Decimal("0.25")))
    await asyncio.sleep(0.3)
    budgets.closing = True  # the replica shuts down
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(settling, timeout=5)


async def test_soft_threshold_event_fires_once_per_period(redis_client: aioredis.Redis) -> None:
    seen: list[BudgetEvent] = []
    budgets = BudgetGuard(
        redis_client,
        BudgetSettings(
            tenants={TENANT: BudgetLimit(daily_usd=Decimal(1))}, soft_thresholds=(0.5, 0.8)
        ),
        on_threshold=seen.append,
    )
    events = []
    for i, cost in enumerate(["0.4", "0.45", "0.05"]):
        held = await budgets.reserve(
            f"r{i}", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(cost)
        )
        events.append(await budgets.settle(held, Decimal(cost)))
    assert [len(e) for e in events] == [0, 2, 0]
    assert [(e.scope, e.threshold, e.spent) for e in seen] == [
        ("tenant", 0.5, Decimal("0.85")),
        ("tenant", 0.8, Decimal("0.85")),
    ]


async def test_the_servers_clock_picks_the_period(redis_client: aioredis.Redis) -> None:
    skewed = BudgetGuard(
        redis_client,
        BudgetSettings(keys={KEY: BudgetLimit(daily_usd=Decimal(1))}),
        clock=lambda: 0.0,
    )
    held = await skewed.reserve("r1", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))
    assert held.budgets[0].hash_key.endswith(time.strftime("d%Y%m%d", time.gmtime()))


async def test_a_crashed_replicas_hold_expires(redis_client: aioredis.Redis) -> None:
    budgets = guard(redis_client, keys={KEY: {"daily_usd": "1"}}, hold_ttl_s=0.02)
    await budgets.reserve("lost", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))
    await asyncio.sleep(0.05)  # the hold's expiry runs on the server's clock
    await budgets.reserve("next", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))


async def test_no_budget_configured_reserves_nothing(redis_client: aioredis.Redis) -> None:
    held = await guard(redis_client).reserve(
        "r", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(5)
    )
    assert held.budgets == ()
    assert await redis_client.dbsize() == 0


def _today() -> tuple[date, date]:
    today = datetime.now(UTC).date()
    return today, today


def _record(request_id: str, cost_pico: int) -> LedgerRecord:
    return LedgerRecord(
        request_id=request_id,
        ts_ms=int(time.time() * 1000),
        tenant=TENANT,
        key_id=KEY,
        user=None,
        model="gpt-4o-mini",
        upstream="openai",
        prompt_tokens=10,
        completion_tokens=10,
        cached_tokens=0,
        reasoning_tokens=0,
        cost_pico=cost_pico,
        savings_pico=0,
        price="test",
        estimated=False,
    )


async def test_a_free_request_settles_and_its_expired_hold_frees_nothing_twice(
    redis_client: aioredis.Redis,
) -> None:
    """A model with no price reserves 0: its hold read back as '-0', which Redis refused, so
    the settle failed, and once the hold expired every reservation on the budget failed."""
    budgets = guard(redis_client, keys={KEY: {"daily_usd": "1"}}, hold_ttl_s=0.02)
    free = await budgets.reserve("free", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(0))
    assert free.budgets  # held (at zero) like any other request
    await budgets.settle(free, Decimal(0))
    await budgets.reserve("lost", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(0))
    await asyncio.sleep(0.05)  # the zero hold of "lost" expires on the server's clock
    held = await budgets.reserve("next", tenant=TENANT, key_id=KEY, user=None, amount=Decimal(1))
    await budgets.settle(held, Decimal("0.25"))
    [status] = await budgets.status(TENANT, KEY)
    assert (status.spent, status.held) == (Decimal("0.25"), 0)
