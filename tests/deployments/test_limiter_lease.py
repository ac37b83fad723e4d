"""Leases (deployments/limiter_lease.py): how big, and, against a real Redis,
that they save store calls without ever admitting more than a limit."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments.limiter import RateLimiter
from deployments.limiter_decision import LimitDecision, WindowState
from deployments.limiter_lease import MIN_REQUESTS, SHARE, Lease, lease_size, next_size
from tests.deployments.test_limiter import FakeClock, ctx, per_key


def state(requests: int | None = None, tokens: int | None = None, used_r: int = 0, used_t: int = 0):
    return WindowState(
        "key", "k", 60_000_000, False, requests, tokens, used_r, used_t, True,
        0, 0, 0, "log", "cost", 0, 600_000,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("now", "before", "elapsed", "tokens", "expected"),
    [
        # 1/SHARE of the limit at most
        (state(1000, used_r=10), state(1000, used_r=9), 1000, 0, 1000 // SHARE),
        # small limits are always exact
        (state(SHARE * MIN_REQUESTS - 1), state(SHARE * MIN_REQUESTS - 1), 1000, 0, 0),
        # the lower half only
        (state(1000, used_r=495), state(1000, used_r=495), 1000, 0, 5),
        (state(1000, used_r=499), state(1000, used_r=499), 1000, 0, 0),
        # usage growing 10 per ms for the 10 ms lifetime eats 100 of the room
        (state(1000, used_r=300), state(1000, used_r=290), 1000, 0, 31),
        (state(1000, used_r=380), state(1000, used_r=370), 1000, 0, 20),
        # tokens: 1/SHARE of a token limit is 3 requests of 100 tokens
        (state(None, 10_000), state(None, 10_000), 1000, 100, 3),
        (state(None, 10_000), state(None, 10_000), 1000, 0, 64),
    ],
)
def test_lease_size(
    now: WindowState, before: WindowState, elapsed: int, tokens: int, expected: int
) -> None:
    assert lease_size([now], [before], elapsed, 10_000, tokens, 64) == expected


def test_next_size_follows_demand() -> None:
    assert next_size(8, 8, 0, 64) == 16
    assert next_size(64, 64, 0, 64) == 64
    assert next_size(16, 16, 14, 64) == 8
    assert next_size(16, 16, 4, 64) == 16
    assert next_size(2, 2, 2, 64) == MIN_REQUESTS


def test_an_exact_reading_beside_leases_counts_only_what_they_admitted() -> None:
    lease = Lease((state(1000, 10**6, 100, 5000),), 8, 800, 0, 0.0, 1.0)
    spare = Lease((state(1000, 10**6, 108, 5800),), 16, 1600, 0, 0.0, 1.0)
    assert lease.take(100, 0.5) is not None  # 7 requests and 700 tokens left
    # The store counts both leases in full: 100 before + 8 + 16 (+ 1 just decided).
    (window,) = lease.rebase((state(1000, 10**6, 125, 12_500),), spare)
    assert (window.requests_used, window.tokens_used) == (125 - 7 - 16, 12_500 - 700 - 1600)
    taken = lease.take(100, 0.6)
    assert taken is not None and taken.headers is not None
    assert taken.headers["x-ratelimit-remaining-requests"] == str(1000 - 102 - 1)


pytestmark = pytest.mark.integration


async def totals(redis: aioredis.Redis, decision: LimitDecision) -> list[tuple[int, int]]:
    """Each window's (requests, tokens) as the store counts them."""
    out = []
    for window in decision.windows:
        r, t = await redis.hmget(window.costs_key, "R", "T")
        out.append((int(r or 0), int(t or 0)))
    return out


async def admitted_once_leases_are_back(limiters: list[RateLimiter]) -> int:
    """Give every lease back, then admit until each limiter is refused: what the
    windows still had room for."""
    for limiter in limiters:
        await limiter.drain()
    admitted = 0
    for limiter in limiters:
        while (await limiter.evaluate(ctx())).allowed:
            admitted += 1
    return admitted


async def steady(limiter: RateLimiter, clock: FakeClock, count: int, **kw: Any) -> list[Any]:
    """``count`` sequential requests, 1 ms apart."""
    decisions = []
    for _ in range(count):
        decisions.append(await limiter.evaluate(ctx(**kw)))
        clock.now += 0.001
    return decisions


async def test_a_busy_route_is_decided_from_leases_and_the_store_counts_exactly(
    redis_client: aioredis.Redis,
) -> None:
    clock = FakeClock()
    quotas = [
        {"window": "1m", "requests": 10_000, "tokens": 10**7},
        {"window": "1h", "requests": 10**5},
    ]
    ended: list[tuple[int, int]] = []

    class Observer:
        def on_decision(self, decision: LimitDecision) -> None:
            pass

        def on_store_error(self, operation: str) -> None:
            raise AssertionError(operation)

        def on_lease(self, granted: int, used: int) -> None:
            ended.append((granted, used))

    limiter = RateLimiter(redis_client, per_key(*quotas), clock=clock, observer=Observer())
    decisions = await steady(limiter, clock, 300, prompt=10, max_tokens=20)
    assert all(d.allowed for d in decisions)
    assert limiter.leases >= 3 and limiter.leased >= 250
    # Headers keep counting, leased or not.
    remaining = [int(limiter.headers(d)["x-ratelimit-remaining-requests"]) for d in decisions]
    assert remaining == [10_000 - n for n in range(1, 301)]
    assert any(d.lease for d in decisions[:10]) and not any(d.windows for d in decisions if d.lease)
    # Settle half of them to other usage; give the leases back: the store holds
    # exactly what was admitted, no more (unused lease) and no less.
    for d in decisions[:150]:
        limiter.settle_soon(d, 25)
    await limiter.drain()
    assert await totals(redis_client, decisions[0]) == [(300, 150 * 25 + 150 * 30)] * 2
    # Every lease ended, and reported what it admitted; they grew with demand.
    assert len(ended) == limiter.leases
    assert sum(used for _, used in ended) == limiter.leased
    assert max(granted for granted, _ in ended) >= 64


async def test_replicas_with_leases_never_admit_more_than_the_limit(
    replicas: list[aioredis.Redis],
) -> None:
    clock = FakeClock()
    limit = 640
    settings = per_key({"window": "1m", "requests": limit}, lease_max_s=0.05)
    limiters = [RateLimiter(c, settings, clock=clock) for c in replicas]
    allowed = 0
    for _ in range(300):  # waves of 4 concurrent requests, one per replica, 10 ms apart
        wave = await asyncio.gather(*(lim.evaluate(ctx()) for lim in limiters))
        allowed += sum(d.allowed for d in wave)
        assert allowed <= limit
        clock.now += 0.01
    assert sum(lim.leases for lim in limiters) > 0
    # Leases stop at half the window: the second half was decided exactly, and
    # once every lease is back, what was left unused is admitted again.
    allowed += await admitted_once_leases_are_back(limiters)
    assert allowed == limit


async def test_leased_usage_leaves_the_window_no_earlier_than_the_lease_ends(
    redis_client: aioredis.Redis,
) -> None:
    clock = FakeClock()
    settings = per_key({"window": "1m", "requests": 6400}, lease_max_s=0.05)
    limiter = RateLimiter(redis_client, settings, clock=clock)
    decisions = await steady(limiter, clock, 30)
    assert limiter.leased > 0
    last = decisions[0].windows[0]
    scores = await redis_client.zrange(last.log_key, 0, -1, withscores=True)
    newest = max(score for _, score in scores)
    # The newest entry is stamped at the end of the newest lease, ahead of the
    # clock at its last request, and within its slice.
    assert newest > clock.now * 1e6 - 1000
    assert newest < last.slice_us + last.resolution_us
    await limiter.drain()


async def test_small_limits_bursts_and_the_upper_half_never_lease(
    redis_client: aioredis.Redis,
) -> None:
    clock = FakeClock()
    small = RateLimiter(redis_client, per_key({"window": "1m", "requests": 63}), clock=clock)
    await steady(small, clock, 60)
    assert small.leases == 0
    # A burst out of quiet, all in one script run: no pace, no lease.
    burst = RateLimiter(
        redis_client, per_key({"window": "1m", "requests": 10_000}, key_prefix="{b}")
    )
    await asyncio.gather(*(burst.evaluate(ctx()) for _ in range(50)))
    assert burst.leases == 0
    await small.drain()
    await burst.drain()


async def test_reconfigure_gives_the_leases_back(redis_client: aioredis.Redis) -> None:
    clock = FakeClock()
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "requests": 10_000}), clock=clock)
    decisions = await steady(limiter, clock, 40)
    assert limiter.leases > 0
    limiter.reconfigure(per_key({"window": "1m", "requests": 20_000}))
    await asyncio.sleep(0)  # the give-back is scheduled on the loop
    await limiter.drain()
    assert (await totals(redis_client, decisions[0]))[0][0] == 40


async def test_a_shadow_quota_is_leased_only_in_its_lower_half_and_reports_exactly(
    redis_client: aioredis.Redis,
) -> None:
    clock = FakeClock()
    shadow = {"window": "1m", "requests": 320, "shadow": True}
    settings = per_key({"window": "1m", "requests": 10_000}, shadow, lease_max_s=0.05)
    limiter = RateLimiter(redis_client, settings, clock=clock)
    decisions = await steady(limiter, clock, 400)
    assert limiter.leased > 0
    assert all(d.allowed for d in decisions)
    assert [d.outcome for d in decisions] == ["allowed"] * 320 + ["shadow_rejected"] * 80
    assert not any(d.lease for d in decisions[160:])  # the upper half was decided exactly
    await limiter.drain()


async def test_requests_of_any_size_leave_exact_totals(redis_client: aioredis.Redis) -> None:
    clock = FakeClock()
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "tokens": 10**7}), clock=clock)
    sizes = [(i * 37) % 500 for i in range(400)]  # reservations from 0 to 499 tokens
    decisions = []
    for size in sizes:
        decisions.append(await limiter.evaluate(ctx(prompt=size, max_tokens=0)))
        clock.now += 0.001
    assert all(d.allowed for d in decisions) and limiter.leased > 100
    for decision, size in zip(decisions, sizes, strict=True):
        limiter.settle_soon(decision, size // 2)
    await limiter.drain()
    assert await totals(redis_client, decisions[0]) == [(400, sum(s // 2 for s in sizes))]


async def test_staggered_traffic_past_the_limit_never_overshoots_and_loses_nothing(
    replicas: list[aioredis.Redis],
) -> None:
    # Arrivals spread over a second, as HTTP traffic arrives, on two replicas
    # with leases: never more than the limit, and once the leases are back
    # exactly the limit in all (in trial runs the burst itself admitted exactly
    # the limit every time: leases stop at half of the window).
    limit, rng = 1000, random.Random(7)
    limiters = [RateLimiter(c, per_key({"window": "1m", "requests": limit})) for c in replicas[:2]]

    async def arrive(i: int) -> LimitDecision:
        await asyncio.sleep(rng.random())
        return await limiters[i % 2].evaluate(ctx())

    decisions = await asyncio.gather(*(arrive(i) for i in range(1300)))
    admitted = sum(d.allowed for d in decisions)
    assert admitted <= limit
    assert sum(lim.leases for lim in limiters) > 0
    admitted += await admitted_once_leases_are_back(limiters)
    assert admitted == limit
