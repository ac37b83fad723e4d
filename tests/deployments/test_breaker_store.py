"""The breaker contract: the reference (Resilience4j) behaviours on every store.

The in-memory store and the Redis store (Lua) run one algorithm each; both must
pass every test here, on the same controllable clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from deployments.breaker import (
    BreakerSettings,
    BreakerState,
    BreakerStore,
    Decision,
    Outcome,
    Transition,
    open_error,
)
from deployments.breaker_store import MemoryBreakerStore, RedisBreakerStore

F, S, SLOW, IGN = Outcome.FAILURE, Outcome.SUCCESS, Outcome.SLOW_SUCCESS, Outcome.IGNORED
NAME = "openai/gpt-4o"


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[BreakerStore]:
    if request.param == "memory":
        yield MemoryBreakerStore(clock)
        return
    # redis_url only for this param, so memory runs never start a server.
    client = aioredis.from_url(request.getfixturevalue("redis_url"))
    await client.flushdb()
    yield RedisBreakerStore(client, clock=clock)
    await client.aclose()


def settings(**overrides: object) -> BreakerSettings:
    base: dict[str, object] = {
        "window_size": 10,
        "minimum_calls": 5,
        "failure_rate_threshold": 50,
        "permitted_calls_in_half_open": 4,
        "wait_in_open_s": 10,
    }
    return BreakerSettings.model_validate(base | overrides)


async def call(store: BreakerStore, cfg: BreakerSettings, outcome: Outcome) -> Decision:
    permit = await store.acquire(NAME, cfg, 30)
    assert permit.allowed, permit
    return await store.record(NAME, cfg, permit, outcome)


async def open_breaker(store: BreakerStore, cfg: BreakerSettings) -> None:
    for outcome in (F,) * effective_calls(cfg):
        await call(store, cfg, outcome)
    assert (await store.snapshot(NAME, cfg)).state == BreakerState.OPEN


def effective_calls(cfg: BreakerSettings) -> int:
    return min(cfg.minimum_calls, cfg.window_size)


async def test_opens_at_60_percent_once_minimum_calls_are_recorded(store: BreakerStore) -> None:
    cfg = settings()
    for outcome in (F, F, F, S):
        decision = await call(store, cfg, outcome)
        snap = await store.snapshot(NAME, cfg)
        assert decision.transition is None
        assert snap.state == BreakerState.CLOSED
        assert snap.failure_rate is None  # unknown below minimum_calls
    decision = await call(store, cfg, S)
    assert decision.transition == Transition(BreakerState.CLOSED, BreakerState.OPEN)
    snap = await store.snapshot(NAME, cfg)
    assert snap.state == BreakerState.OPEN
    assert snap.open_remaining_ms == 10_000


async def test_stays_closed_below_the_threshold(store: BreakerStore) -> None:
    cfg = settings()
    for outcome in (F, F, S, S, S):
        await call(store, cfg, outcome)
    snap = await store.snapshot(NAME, cfg)
    assert snap.state == BreakerState.CLOSED
    assert snap.failure_rate == 40.0
    assert (snap.calls, snap.failed_calls) == (5, 2)


async def test_open_refuses_at_once_and_counts_not_permitted(
    store: BreakerStore, clock: Clock
) -> None:
    cfg = settings()
    await open_breaker(store, cfg)
    clock.advance(2.5)
    refused = await store.acquire(NAME, cfg, 30)
    assert not refused.allowed
    assert refused.retry_after_ms == 7_500
    error = open_error(NAME, refused)
    assert error.status_code == 503 and error.code == "circuit_open"
    assert error.headers["retry-after"] == "8"  # whole seconds, rounded up
    await store.acquire(NAME, cfg, 30)
    assert (await store.snapshot(NAME, cfg)).not_permitted == 2


async def test_half_open_only_after_the_wait(store: BreakerStore, clock: Clock) -> None:
    cfg = settings()
    await open_breaker(store, cfg)
    clock.advance(9.999)
    assert not (await store.acquire(NAME, cfg, 30)).allowed
    clock.advance(0.001)
    probe = await store.acquire(NAME, cfg, 30)
    assert probe.allowed and probe.state == BreakerState.HALF_OPEN
    assert probe.transition == Transition(BreakerState.OPEN, BreakerState.HALF_OPEN)


async def test_half_open_hands_out_exactly_n_permits_and_a_release_returns_one(
    store: BreakerStore, clock: Clock
) -> None:
    cfg = settings(permitted_calls_in_half_open=3)
    await open_breaker(store, cfg)
    clock.advance(10)
    permits = [await store.acquire(NAME, cfg, 30) for _ in range(4)]
    assert [p.allowed for p in permits] == [True, True, True, False]
    await store.record(NAME, cfg, permits[0], IGN)  # released: neither success nor failure
    again = await store.acquire(NAME, cfg, 30)
    assert again.allowed
    assert not (await store.acquire(NAME, cfg, 30)).allowed
    snap = await store.snapshot(NAME, cfg)
    assert (snap.half_open_in_flight, snap.half_open_calls) == (3, 0)


async def half_open_run(store: BreakerStore, cfg: BreakerSettings, outcomes: list[Outcome]) -> None:
    permits = [await store.acquire(NAME, cfg, 30) for _ in outcomes]
    assert all(p.allowed and p.state == BreakerState.HALF_OPEN for p in permits)
    for permit, outcome in zip(permits, outcomes, strict=True):
        await store.record(NAME, cfg, permit, outcome)


async def test_half_open_reopens_at_75_percent(store: BreakerStore, clock: Clock) -> None:
    cfg = settings()
    await open_breaker(store, cfg)
    clock.advance(10)
    await half_open_run(store, cfg, [F, F, S, F])
    snap = await store.snapshot(NAME, cfg)
    assert snap.state == BreakerState.OPEN
    assert snap.open_remaining_ms == 10_000


async def test_half_open_closes_at_25_percent_with_fresh_metrics(
    store: BreakerStore, clock: Clock
) -> None:
    cfg = settings()
    await open_breaker(store, cfg)
    clock.advance(10)
    await half_open_run(store, cfg, [F, S, S, S])
    snap = await store.snapshot(NAME, cfg)
    assert snap.state == BreakerState.CLOSED
    assert (snap.calls, snap.failed_calls, snap.failure_rate) == (0, 0, None)


async def test_slow_successes_reopen_at_zero_failures(store: BreakerStore, clock: Clock) -> None:
    cfg = settings(slow_call_rate_threshold=50)
    await open_breaker(store, cfg)
    clock.advance(10)
    await half_open_run(store, cfg, [SLOW, SLOW, S, SLOW])
    assert (await store.snapshot(NAME, cfg)).state == BreakerState.OPEN


async def test_slow_call_rate_opens_a_closed_breaker(store: BreakerStore) -> None:
    cfg = settings(slow_call_rate_threshold=60)
    for outcome in (SLOW, S, SLOW, SLOW, S):
        await call(store, cfg, outcome)
    snap = await store.snapshot(NAME, cfg)
    assert snap.state == BreakerState.OPEN


async def test_exponential_wait_grows_on_repeated_openings(
    store: BreakerStore, clock: Clock
) -> None:
    cfg = settings(wait_multiplier=2, max_wait_in_open_s=30, permitted_calls_in_half_open=1)
    await open_breaker(store, cfg)
    for expected in (20_000, 30_000, 30_000):
        clock.advance(60)
        await half_open_run(store, cfg, [F])
        assert (await store.snapshot(NAME, cfg)).open_remaining_ms == expected
    clock.advance(60)
    await half_open_run(store, cfg, [S])
    await open_breaker(store, cfg)  # closing reset the growth
    assert (await store.snapshot(NAME, cfg)).open_remaining_ms == 10_000


async def test_forced_open_never_recovers_by_itself(store: BreakerStore, clock: Clock) -> None:
    cfg = settings()
    await store.set_state(NAME, cfg, BreakerState.FORCED_OPEN)
    clock.advance(3600)
    refused = await store.acquire(NAME, cfg, 30)
    assert not refused.allowed and refused.state == BreakerState.FORCED_OPEN
    assert refused.retry_after_ms == 10_000
    assert (await store.open_for(NAME, cfg, 1)).state == BreakerState.FORCED_OPEN
    await store.set_state(NAME, cfg, BreakerState.CLOSED)
    assert (await store.acquire(NAME, cfg, 30)).allowed


async def test_metrics_only_records_but_never_transitions(store: BreakerStore) -> None:
    cfg = settings()
    await store.set_state(NAME, cfg, BreakerState.METRICS_ONLY)
    for _ in range(8):
        decision = await call(store, cfg, F)
        assert decision.transition is None
    snap = await store.snapshot(NAME, cfg)
    assert snap.state == BreakerState.METRICS_ONLY
    assert (snap.calls, snap.failure_rate) == (8, 100.0)


async def test_disabled_permits_everything_and_records_nothing(store: BreakerStore) -> None:
    cfg = settings()
    await store.set_state(NAME, cfg, BreakerState.DISABLED)
    for _ in range(8):
        await call(store, cfg, F)
    snap = await store.snapshot(NAME, cfg)
    assert snap.state == BreakerState.DISABLED and snap.calls == 0


async def test_ignored_outcomes_count_as_neither(store: BreakerStore) -> None:
    cfg = settings()
    for outcome in (F, IGN, F, IGN, IGN, S, S):
        await call(store, cfg, outcome)
    snap = await store.snapshot(NAME, cfg)
    assert (snap.calls, snap.failed_calls, snap.state) == (4, 2, BreakerState.CLOSED)
    assert snap.failure_rate is None  # 4 < minimum_calls: the ignored ones did not count
    await call(store, cfg, S)
    assert (await store.snapshot(NAME, cfg)).failure_rate == 40.0


async def test_open_for_an_upstream_retry_after(store: BreakerStore, clock: Clock) -> None:
    cfg = settings()
    permit = await store.acquire(NAME, cfg, 30)
    decision = await store.record(NAME, cfg, permit, F, open_for_s=2)
    assert decision.transition == Transition(BreakerState.CLOSED, BreakerState.OPEN)
    assert decision.retry_after_ms == 2_000
    clock.advance(1.9)
    assert not (await store.acquire(NAME, cfg, 30)).allowed
    assert (await store.open_for(NAME, cfg, 0.05)).retry_after_ms == 100  # never shortened
    clock.advance(0.1)
    assert (await store.acquire(NAME, cfg, 30)).state == BreakerState.HALF_OPEN


async def test_open_for_is_capped(store: BreakerStore) -> None:
    cfg = settings(max_open_for_s=60)
    assert (await store.open_for(NAME, cfg, 86_400)).retry_after_ms == 60_000


async def test_an_outcome_from_an_older_state_is_dropped(store: BreakerStore, clock: Clock) -> None:
    cfg = settings()
    stale = await store.acquire(NAME, cfg, 30)
    await open_breaker(store, cfg)
    clock.advance(10)
    probe = await store.acquire(NAME, cfg, 30)
    await store.record(NAME, cfg, stale, F)
    snap = await store.snapshot(NAME, cfg)
    assert (snap.state, snap.half_open_calls) == (BreakerState.HALF_OPEN, 0)
    assert probe.allowed


async def test_an_expired_probe_lease_frees_its_permit(store: BreakerStore, clock: Clock) -> None:
    cfg = settings(permitted_calls_in_half_open=1)
    await open_breaker(store, cfg)
    clock.advance(10)
    assert (await store.acquire(NAME, cfg, 5)).allowed  # this replica then dies
    assert not (await store.acquire(NAME, cfg, 5)).allowed
    clock.advance(5)
    assert (await store.acquire(NAME, cfg, 5)).allowed


async def test_a_stuck_half_open_times_out_to_open(store: BreakerStore, clock: Clock) -> None:
    cfg = settings(max_wait_in_half_open_s=20)
    await open_breaker(store, cfg)
    clock.advance(10)
    assert (await store.acquire(NAME, cfg, 300)).allowed
    clock.advance(20)
    refused = await store.acquire(NAME, cfg, 300)
    assert not refused.allowed
    assert refused.transition == Transition(BreakerState.HALF_OPEN, BreakerState.OPEN)


async def test_count_window_forgets_the_oldest_call(store: BreakerStore) -> None:
    cfg = settings(window_size=5, failure_rate_threshold=70)
    for outcome in (F, F, F, S, S, S, S):
        await call(store, cfg, outcome)
    snap = await store.snapshot(NAME, cfg)
    assert (snap.calls, snap.failed_calls) == (5, 1)


async def test_time_window_forgets_calls_older_than_its_span(
    store: BreakerStore, clock: Clock
) -> None:
    cfg = settings(window_type="TIME_BASED", window_size=10, minimum_calls=3)
    await call(store, cfg, F)
    await call(store, cfg, F)
    clock.advance(10)
    await call(store, cfg, F)
    snap = await store.snapshot(NAME, cfg)
    assert (snap.state, snap.calls, snap.failure_rate) == (BreakerState.CLOSED, 1, None)
    clock.advance(1)
    await call(store, cfg, S)
    await call(store, cfg, F)
    snap = await store.snapshot(NAME, cfg)
    assert (snap.state, snap.calls) == (BreakerState.OPEN, 3)


async def test_reset_forgets_everything(store: BreakerStore) -> None:
    cfg = settings()
    await open_breaker(store, cfg)
    await store.reset(NAME)
    snap = await store.snapshot(NAME, cfg)
    assert (snap.state, snap.calls, snap.not_permitted) == (BreakerState.CLOSED, 0, 0)


async def test_concurrent_probes_never_exceed_the_permits(
    store: BreakerStore, clock: Clock
) -> None:
    cfg = settings(permitted_calls_in_half_open=3)
    await open_breaker(store, cfg)
    clock.advance(10)
    permits = await asyncio.gather(*(store.acquire(NAME, cfg, 30) for _ in range(20)))
    assert sum(p.allowed for p in permits) == 3


# Two replicas: two stores on their own connections to one Redis, on its clock.


@pytest.fixture
async def replicas(
    redis_client: aioredis.Redis, redis_url: str
) -> AsyncIterator[list[BreakerStore]]:
    clients = [aioredis.from_url(redis_url) for _ in range(2)]
    yield [RedisBreakerStore(c) for c in clients]
    for c in clients:
        await c.aclose()


@pytest.mark.integration
async def test_failures_on_one_replica_open_the_breaker_for_both(
    replicas: list[BreakerStore],
) -> None:
    a, b = replicas
    cfg = settings(wait_in_open_s=60)
    for outcome in (F, F, S, F, F):
        await call(a, cfg, outcome)
    refused = await b.acquire(NAME, cfg, 30)
    assert not refused.allowed and refused.state == BreakerState.OPEN
    assert 59_000 < refused.retry_after_ms <= 60_000  # the server's clock, not ours


@pytest.mark.integration
async def test_half_open_probes_are_bounded_across_replicas(replicas: list[BreakerStore]) -> None:
    a, b = replicas
    cfg = settings(permitted_calls_in_half_open=3)
    await a.set_state(NAME, cfg, BreakerState.HALF_OPEN)
    permits = await asyncio.gather(*(s.acquire(NAME, cfg, 30) for s in [a, b] * 10))
    assert sum(p.allowed for p in permits) == 3
    probes = [(s, p) for s, p in zip([a, b] * 10, permits, strict=True) if p.allowed]
    for s, p in probes:
        await s.record(NAME, cfg, p, S)
    assert (await b.snapshot(NAME, cfg)).state == BreakerState.CLOSED


@pytest.mark.integration
async def test_record_many_is_one_round_trip_with_the_same_result(
    redis_client: aioredis.Redis,
) -> None:
    from deployments.breaker import Outcome
    from deployments.breaker_store import RedisBreakerStore

    store = RedisBreakerStore(redis_client, prefix="rm")
    cfg = BreakerSettings(minimum_calls=5, window_size=5)
    permits = [await store.acquire("b", cfg, 5) for _ in range(5)]
    outcomes = [Outcome.FAILURE] * 3 + [Outcome.SUCCESS] * 2
    decisions = await store.record_many(
        [("b", cfg, p, o, 0.0, 1) for p, o in zip(permits, outcomes, strict=True)]
    )
    assert decisions[-1].state == BreakerState.OPEN  # F,F,F,S,S opens at 60 %
    await redis_client.script_flush()  # a restarted server has forgotten the script
    again = await store.record_many(
        [("c", cfg, await store.acquire("c", cfg, 5), Outcome.SUCCESS, 0.0, 1)]
    )
    assert again[0].state == BreakerState.CLOSED


@pytest.mark.integration
@pytest.mark.parametrize("window_type", ["COUNT_BASED", "TIME_BASED"])
async def test_a_counted_record_equals_that_many_single_records(
    redis_client: aioredis.Redis, window_type: str
) -> None:
    from deployments.breaker import Outcome
    from deployments.breaker_store import MemoryBreakerStore, RedisBreakerStore

    cfg = BreakerSettings(window_type=window_type, minimum_calls=4, window_size=10)
    counted = RedisBreakerStore(redis_client, prefix="counted")
    single = RedisBreakerStore(redis_client, prefix="single")
    local = MemoryBreakerStore()
    for store in (counted, single, local):
        await store.record("b", cfg, await store.acquire("b", cfg, 5), Outcome.FAILURE)
    await counted.record_many(
        [("b", cfg, await counted.acquire("b", cfg, 5), Outcome.SUCCESS, 0.0, 13)]
    )
    await local.record_many(
        [("b", cfg, await local.acquire("b", cfg, 5), Outcome.SUCCESS, 0.0, 13)]
    )
    for _ in range(13):
        await single.record("b", cfg, await single.acquire("b", cfg, 5), Outcome.SUCCESS)
    snapshots = [await s.snapshot("b", cfg) for s in (counted, single, local)]
    seen = {(x.state, x.calls, x.failed_calls) for x in snapshots}
    # A count window of 10 has pushed the failure out; a time window still holds it.
    expected = (10, 0) if window_type == "COUNT_BASED" else (14, 1)
    assert seen == {(BreakerState.CLOSED, *expected)}


@pytest.mark.integration
async def test_successes_into_a_full_window_of_successes_then_failures_match_memory(
    redis_client: aioredis.Redis,
) -> None:
    """The script's shortcut (a full window of fast successes only moves its head) must
    leave the ring as the one-slot-at-a-time path would: failures then displace the
    same outcomes in the same order."""
    from deployments.breaker import Outcome
    from deployments.breaker_store import MemoryBreakerStore, RedisBreakerStore

    cfg = BreakerSettings(window_size=10, minimum_calls=5, failure_rate_threshold=50)
    shared, local = RedisBreakerStore(redis_client, prefix="full"), MemoryBreakerStore()
    seen: list[set[tuple[BreakerState, int, int]]] = []
    steps = [(Outcome.SUCCESS, 10), (Outcome.SUCCESS, 7), (Outcome.SLOW_SUCCESS, 1)]
    steps += [(Outcome.FAILURE, 1)] * 6
    for outcome, count in steps:
        for store in (shared, local):
            permit = await store.acquire("b", cfg, 5)
            if permit.allowed:
                await store.record_many([("b", cfg, permit, outcome, 0.0, count)])
        snapshots = [await s.snapshot("b", cfg) for s in (shared, local)]
        seen.append({(x.state, x.calls, x.failed_calls) for x in snapshots})
    assert all(len(step) == 1 for step in seen), seen
    assert seen[-1] == {(BreakerState.OPEN, 10, 5)}
