"""The limiter's shared script runs: acquires of one loop iteration go as one
call, settlements ride along or go on their own, and every caller still gets
its own decision, error and time bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from deployments.limiter import RateLimiter
from deployments.limiter_batch import MAX_CALLS, _Acquire, _encode, _Settle
from serve_app.embedded_store import free_port
from serve_app.errors import StoreUnavailableError
from tests.deployments.test_limiter import ctx, per_key, window

pytestmark = pytest.mark.integration

HANG_GUARD_S = 10


async def script_runs(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
async def limiter(redis_client: aioredis.Redis) -> RateLimiter:
    # No leases: these tests count script runs.
    quota = {"window": "1m", "requests": 100, "tokens": 1000}
    limiter = RateLimiter(redis_client, per_key(quota, lease_requests=0))
    await limiter.evaluate(ctx())  # the script is loaded: every later call is one EVALSHA
    return limiter


async def test_acquires_of_one_iteration_are_one_run_each_with_its_own_decision(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    runs = await script_runs(redis_client)
    costs = [300, 200, 100, 500, 50]
    decisions = await asyncio.gather(*(limiter.evaluate(ctx(prompt=c)) for c in costs))
    assert await script_runs(redis_client) == runs + 1
    # Decided one after another in call order: 300+200+100 fit, 500 does not, 50 does.
    assert [d.allowed for d in decisions] == [True, True, True, False, True]
    assert [window(d, 60).tokens_used for d in decisions] == [300, 500, 600, 600, 650]
    assert [d.reserved_tokens for d in decisions] == costs


async def test_more_calls_than_one_run_holds_go_in_several(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    runs = await script_runs(redis_client)
    count = 2 * MAX_CALLS + 3
    keys = [f"b{i % 7}" for i in range(count)]
    decisions = await asyncio.gather(*(limiter.evaluate(ctx(key=key)) for key in keys))
    assert await script_runs(redis_client) == runs + 3
    assert all(d.outcome == "allowed" for d in decisions)
    # Every key counted each of its requests once (the runs may reach the server in any order).
    seen = sorted(
        (key, window(d, 60).requests_used) for key, d in zip(keys, decisions, strict=True)
    )
    expected = sorted((key, n) for key in set(keys) for n in range(1, keys.count(key) + 1))
    assert seen == expected


async def test_a_settlement_rides_on_the_next_acquire_and_applies_once(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    first = await limiter.acquire(ctx(prompt=400))
    runs = await script_runs(redis_client)
    settling = asyncio.create_task(limiter.settle(first, 150))  # refund 250
    second = await limiter.acquire(ctx(prompt=100))
    await settling
    assert await script_runs(redis_client) == runs + 1
    assert window(second, 60).tokens_used == 150 + 100
    await limiter.settle(first, 10)  # settled already: nothing goes
    probe = await limiter.evaluate(ctx())
    assert window(probe, 60).tokens_used == 250
    assert await script_runs(redis_client) == runs + 2


async def test_a_settlement_with_no_later_acquire_still_lands(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    decision = await limiter.acquire(ctx(prompt=300))
    runs = await script_runs(redis_client)
    await limiter.settle(decision, 500)  # charge 200 more, on its own
    assert await script_runs(redis_client) == runs + 1
    probe = await limiter.evaluate(ctx())
    assert window(probe, 60).tokens_used == 500


async def test_one_failing_call_fails_only_its_caller(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    (state,) = (await limiter.evaluate(ctx(key="bad"))).windows
    await redis_client.delete(state.log_key)
    await redis_client.set(state.log_key, "not a sorted set")
    runs = await script_runs(redis_client)
    decisions = await asyncio.gather(
        limiter.evaluate(ctx(key="good")),
        limiter.evaluate(ctx(key="bad")),
        limiter.evaluate(ctx(key="good")),
    )
    assert await script_runs(redis_client) == runs + 1
    assert [d.outcome for d in decisions] == ["allowed", "fail_open", "allowed"]
    assert [window(d, 60).requests_used for d in (decisions[0], decisions[2])] == [1, 2]
    assert limiter.store_errors == 1


async def test_a_caller_that_gives_up_before_the_run_is_not_recorded(
    limiter: RateLimiter,
) -> None:
    async def give_up() -> None:
        gone.cancel()

    # All three run in this order on the next iteration; the run leaves after them.
    gone = asyncio.create_task(limiter.evaluate(ctx(key="k2")))
    kept = asyncio.create_task(limiter.evaluate(ctx(key="k2")))
    await asyncio.create_task(give_up())
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert window(await kept, 60).requests_used == 1
    assert window(await limiter.evaluate(ctx(key="k2")), 60).requests_used == 2


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_dead_store_fails_every_caller_in_the_run(mode: str) -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    limiter = RateLimiter(client, per_key({"window": "1m", "requests": 5}, failure_mode=mode))
    async with asyncio.timeout(HANG_GUARD_S):
        results = await asyncio.gather(
            *(limiter.evaluate(ctx()) for _ in range(5)), return_exceptions=True
        )
    await client.aclose()
    if mode == "open":
        assert [getattr(r, "outcome", r) for r in results] == ["fail_open"] * 5
    else:
        assert all(isinstance(r, StoreUnavailableError) for r in results)
    assert limiter.store_errors == 5


@pytest.fixture
async def silent_client() -> AsyncIterator[aioredis.Redis]:
    """A server that takes connections and commands but never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
    yield client
    await client.aclose()
    server.close()


async def test_each_caller_gets_the_time_bound(silent_client: aioredis.Redis) -> None:
    settings = per_key({"window": "1m", "requests": 5}, store_timeout_s=0.2)
    limiter = RateLimiter(silent_client, settings)
    started = time.monotonic()
    async with asyncio.timeout(HANG_GUARD_S):
        decisions = await asyncio.gather(*(limiter.evaluate(ctx()) for _ in range(3)))
    assert [d.outcome for d in decisions] == ["fail_open"] * 3
    assert 0.2 <= time.monotonic() - started < HANG_GUARD_S / 2
    assert limiter.store_errors == 3


@dataclass(frozen=True)
class _Window:
    log_key: str
    costs_key: str
    spec: bytes = b"60000000 600000 5 -1 0"
    slice_us: int = 1_000
    window_us: int = 60_000_000
    resolution_us: int = 600_000


def test_shared_windows_and_checks_are_sent_once() -> None:
    loop = asyncio.new_event_loop()
    minute, hour = _Window("m:log", "m:cost"), _Window("h:log", "h:cost", b"3600 36 -1 9 1")
    acquires = [_Acquire((minute, hour), tokens, 1.0, loop.create_future()) for tokens in (7, 8)]
    settles = [_Settle((minute,), -3, 1.0, loop.create_future())]
    keys, args = _encode("", acquires, settles)
    loop.close()
    assert keys == ["m:log", "m:cost", "h:log", "h:cost"]
    assert args == [
        "",
        2,
        1,
        b"1 60000000 600000 5 -1 0",
        b"2 3600 36 -1 9 1",
        b"-3 0 1 1000 60000000 600000",
        b"7 1 2",
        b"8 1 2",
    ]


async def test_settle_soon_returns_at_once_and_drain_waits_for_it(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    decisions = [await limiter.acquire(ctx(key="soon", prompt=100)) for _ in range(3)]
    for decision in decisions:
        limiter.settle_soon(decision, 40)  # refund 60 each, no task, no await
    limiter.settle_soon(decisions[0], 0)  # settled already: nothing more goes
    await asyncio.wait_for(limiter.drain(), HANG_GUARD_S)
    probe = await limiter.evaluate(ctx(key="soon"))
    assert window(probe, 60).tokens_used == 3 * 40


async def test_settle_soon_reports_a_store_failure_and_drain_still_ends(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    decision = await limiter.acquire(ctx(key="lost", prompt=100))
    errors = limiter.store_errors
    (state,) = decision.windows
    await redis_client.delete(state.costs_key)
    await redis_client.set(state.costs_key, "not a hash")  # the settlement's script call fails
    limiter.settle_soon(decision, 10)
    await asyncio.wait_for(limiter.drain(), HANG_GUARD_S)
    assert limiter.store_errors == errors + 1


async def test_a_server_that_forgot_the_script_is_given_it_again(
    redis_client: aioredis.Redis, limiter: RateLimiter
) -> None:
    await redis_client.script_flush()
    decision = await limiter.acquire(ctx(key="flushed"))
    assert window(decision, 60).requests_used == 1
