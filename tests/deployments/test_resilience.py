"""The orchestrator: breaker -> bulkhead -> call -> record -> retry or fall back."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from deployments.breaker import BreakerSettings, BreakerSnapshot, BreakerState
from deployments.breaker_store import MemoryBreakerStore
from deployments.bulkhead import BulkheadSettings
from deployments.resilience import Resilience, ResilienceSettings, Target, UpstreamPolicy
from deployments.retry import RetrySettings
from serve_app.errors import (
    CircuitOpenError,
    NotFoundError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)

A = Target(upstream="a", model="m-a")
B = Target(upstream="b", model="m-b")
C = Target(upstream="c", model="m-c")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def error(status: int, **headers: str) -> UpstreamError:
    return UpstreamError(f"status {status}", status_code=status, headers=headers)


class Upstreams:
    """Scripted upstreams: each call pops the next behaviour for that upstream."""

    def __init__(self, clock: Clock, **scripts: list[object]) -> None:
        self.clock = clock
        self.scripts = scripts
        self.calls: list[str] = []

    async def __call__(self, target: Target) -> str:
        self.calls.append(target.upstream)
        script = self.scripts.get(target.upstream) or ["ok"]
        step = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(step, float):  # a call that takes this long
            self.clock.now += step
            return f"{target.upstream}:{target.model}"
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return await step()
        return f"{target.upstream}:{target.model}"


def policy(**breaker: object) -> UpstreamPolicy:
    cfg: dict[str, object] = {"window_size": 4, "minimum_calls": 4, "wait_in_open_s": 30}
    return UpstreamPolicy(
        breaker=BreakerSettings.model_validate(cfg | breaker),
        retry=RetrySettings(max_attempts=2, jitter="none"),
        bulkhead=BulkheadSettings(max_concurrent=1, max_queued=0),
    )


def resilience(clock: Clock, **breaker: object) -> Resilience:
    settings = ResilienceSettings(default=policy(**breaker), fallbacks={"gpt": [A, B, C]})
    return Resilience(settings, MemoryBreakerStore(clock), clock=clock, sleep=clock.sleep)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_the_primary_serves_when_healthy(clock: Clock) -> None:
    res = resilience(clock)
    up = Upstreams(clock)
    result = await res.call(res.chain("gpt"), up, 30)
    assert result.value == "a:m-a"
    assert result.headers() == {"x-upstream": "a", "x-attempts": "1"}


async def test_a_retryable_failure_is_retried_after_backoff(clock: Clock) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[error(503), "ok"])
    result = await res.call([A], up, 30)
    assert (result.value, result.attempts, up.calls) == ("a:m-a", 2, ["a", "a"])
    assert clock.slept == [pytest.approx(0.2)]
    assert res.metrics.retries["a"] == 1


async def test_fallbacks_follow_the_chain_in_order(clock: Clock) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[error(500)], b=[error(502, **{"x-should-retry": "false"})])
    result = await res.call(res.chain("gpt"), up, 30)
    assert up.calls == ["a", "a", "b", "c"]
    assert result.headers() == {"x-upstream": "c", "x-attempts": "4"}
    assert res.metrics.fallbacks == {("a/m-a", "b/m-b"): 1, ("b/m-b", "c/m-c"): 1}


async def test_a_client_error_is_neither_retried_nor_fallen_back(clock: Clock) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[error(400)])
    with pytest.raises(UpstreamError) as info:
        await res.call(res.chain("gpt"), up, 30)
    assert info.value.status_code == 400 and up.calls == ["a"]
    assert info.value.headers["x-attempts"] == "1" and info.value.headers["x-upstream"] == "a"
    snap = (await res.breakers())[0]
    assert (snap.calls, snap.failed_calls) == (1, 0)  # the upstream answered: a success


async def test_an_open_breaker_is_skipped_without_calling_the_upstream(clock: Clock) -> None:
    res = resilience(clock)
    await res.force_open("a/m-a")
    up = Upstreams(clock)
    result = await res.call(res.chain("gpt"), up, 30)
    assert up.calls == ["b"] and result.headers() == {"x-upstream": "b", "x-attempts": "1"}
    assert res.metrics.refused["a/m-a"] == 1


async def test_failures_open_the_breaker_then_calls_are_refused(clock: Clock) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[error(500)])
    for _ in range(2):  # two calls, two attempts each: four failures
        with pytest.raises(UpstreamError):
            await res.call([A], up, 30)
    assert res.metrics.transitions[("a/m-a", "CLOSED", "OPEN")] == 1
    assert res.metrics.states["a/m-a"] == BreakerState.OPEN
    clock.now += 10
    with pytest.raises(CircuitOpenError) as info:
        await res.call([A], up, 30)
    assert info.value.headers["retry-after"] == "20"
    assert info.value.headers["x-attempts"] == "0"
    assert len(up.calls) == 4


async def test_every_target_open_answers_with_the_soonest_retry_after(clock: Clock) -> None:
    res = resilience(clock)
    await res.store.open_for("a/m-a", res.settings.default.breaker, 40)
    await res.store.open_for("b/m-b", res.settings.default.breaker, 7)
    await res.force_open("c/m-c")
    up = Upstreams(clock)
    with pytest.raises(CircuitOpenError) as info:
        await res.call(res.chain("gpt"), up, 30)
    assert info.value.headers["retry-after"] == "7" and up.calls == []


async def test_a_429_with_retry_after_opens_for_exactly_that_long(clock: Clock) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[error(429, **{"retry-after": "2"}), "ok"])
    with pytest.raises(UpstreamError) as info:
        await res.call([A], up, 30)
    assert info.value.status_code == 429 and up.calls == ["a"]  # not retried into the opening
    with pytest.raises(CircuitOpenError) as refused:
        await res.call([A], up, 30)
    assert refused.value.headers["retry-after"] == "2"
    clock.now += 2
    result = await res.call([A], up, 30)
    assert result.value == "a:m-a"
    assert res.metrics.states["a/m-a"] == BreakerState.HALF_OPEN


async def test_a_429_falls_back_to_the_next_target(clock: Clock) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[error(429, **{"retry-after": "2"})])
    result = await res.call(res.chain("gpt"), up, 30)
    assert up.calls == ["a", "b"] and result.target == B


async def test_slow_successes_are_recorded_as_slow(clock: Clock) -> None:
    res = resilience(clock, slow_call_duration_s=1, slow_call_rate_threshold=75)
    up = Upstreams(clock, a=[2.0, 2.0, 0.1, 2.0])
    for _ in range(4):
        await res.call([A], up, 30)
    await res.drain()
    snap = (await res.breakers())[0]
    assert (snap.state, snap.slow_calls, snap.failed_calls) == (BreakerState.OPEN, 3, 0)


async def test_no_retry_that_cannot_finish_before_the_deadline(clock: Clock) -> None:
    res = resilience(clock)

    async def slow_failure() -> str:
        clock.now += 9.9
        raise error(500)

    up = Upstreams(clock, a=[slow_failure])
    with pytest.raises(UpstreamError):
        await res.call([A], up, 10)
    assert up.calls == ["a"] and clock.slept == []


async def test_the_deadline_cuts_a_hanging_upstream() -> None:
    res = resilience(Clock())
    res = Resilience(res.settings, MemoryBreakerStore())  # real time for asyncio.timeout
    never = asyncio.Event()

    async def hang() -> str:
        await never.wait()
        return "never"

    with pytest.raises(UpstreamTimeoutError) as info:
        await res.call([A], Upstreams(Clock(), a=[hang]), 0.05)
    assert info.value.status_code == 504
    snap = (await res.breakers())[0]
    assert snap.calls == 0  # a short client deadline says nothing against the upstream


async def test_bulkhead_overflow_falls_back_or_answers_503(clock: Clock) -> None:
    res = resilience(clock)
    entered, leave = asyncio.Event(), asyncio.Event()

    async def busy() -> str:
        entered.set()
        await leave.wait()
        return "busy"

    up = Upstreams(clock, a=[busy])
    first = asyncio.create_task(res.call([A], up, 30))
    await entered.wait()
    result = await res.call([A, B], up, 30)
    assert result.target == B and res.metrics.bulkhead_rejected["a"] == 1
    with pytest.raises(ServiceUnavailableError) as info:
        await res.call([A], up, 30)
    assert info.value.code == "bulkhead_full" and info.value.headers["retry-after"] == "1"
    leave.set()
    assert (await first).value == "busy"


async def test_a_stream_holds_its_bulkhead_slot_until_released(clock: Clock) -> None:
    res = resilience(clock)
    result = await res.call([A], Upstreams(clock), 30, stream=True)
    assert res.bulkhead("a").active == 1
    result.release()
    result.release()
    assert res.bulkhead("a").active == 0


async def test_a_cancelled_probe_gives_its_permit_back(clock: Clock) -> None:
    res = resilience(clock, permitted_calls_in_half_open=1)
    cfg = res.settings.default.breaker
    await res.store.open_for("a/m-a", cfg, 1)
    clock.now += 1
    entered = asyncio.Event()

    async def hang() -> str:
        entered.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.create_task(res.call([A], Upstreams(clock, a=[hang]), 30))
    await entered.wait()
    assert not (await res.store.acquire("a/m-a", cfg, 30)).allowed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await res.drain()
    assert (await res.store.acquire("a/m-a", cfg, 30)).allowed


@pytest.mark.parametrize(
    ("action", "state"),
    [
        (Resilience.force_open, BreakerState.FORCED_OPEN),
        (Resilience.disable, BreakerState.DISABLED),
        (Resilience.metrics_only, BreakerState.METRICS_ONLY),
        (Resilience.force_close, BreakerState.CLOSED),
        (Resilience.reset, BreakerState.CLOSED),
    ],
)
async def test_admin_actions(
    clock: Clock,
    action: Callable[[Resilience, str], Awaitable[BreakerSnapshot]],
    state: BreakerState,
) -> None:
    res = resilience(clock)
    await res.store.open_for("b/m-b", res.settings.default.breaker, 30)
    snap = await action(res, "b/m-b")
    assert snap.state == state
    listed = {s.name: s.state for s in await res.breakers()}
    assert listed == {"a/m-a": BreakerState.CLOSED, "b/m-b": state, "c/m-c": BreakerState.CLOSED}


async def test_admin_refuses_an_unknown_breaker(clock: Clock) -> None:
    with pytest.raises(NotFoundError):
        await resilience(clock).force_open("nope")


async def test_one_breaker_per_upstream_when_so_scoped(clock: Clock) -> None:
    settings = ResilienceSettings(
        upstreams={"a": policy().model_copy(update={"breaker_scope": "upstream"})},
        fallbacks={"x": [A, Target(upstream="a", model="other")]},
    )
    res = Resilience(settings, MemoryBreakerStore(clock), clock=clock, sleep=clock.sleep)
    assert [s.name for s in await res.breakers()] == ["a"]


@pytest.mark.integration
async def test_replicas_sharing_redis_share_the_breaker(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    settings = ResilienceSettings(default=policy(), fallbacks={"gpt": [A, B]})
    other_client = aioredis.from_url(redis_url)
    one = Resilience.with_redis(settings, redis_client)
    two = Resilience.with_redis(settings, other_client)
    failing = Upstreams(Clock(), a=[error(500)])
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await one.call([A], failing, 30)
    healthy = Upstreams(Clock())
    result = await two.call(two.chain("gpt"), healthy, 30)
    assert healthy.calls == ["b"] and result.headers()["x-upstream"] == "b"
    assert two.metrics.refused["a/m-a"] == 1
    assert {s.name: s.state for s in await two.breakers()}["a/m-a"] == BreakerState.OPEN
    await other_client.aclose()


async def test_a_refusal_is_repeated_from_memory_for_a_second(clock: Clock) -> None:
    res = resilience(clock)
    cfg = res.settings.default.breaker
    await res.store.open_for("a/m-a", cfg, 30)
    up = Upstreams(clock)
    with pytest.raises(CircuitOpenError):
        await res.call([A], up, 30)
    clock.now += 0.5
    with pytest.raises(CircuitOpenError) as cached:
        await res.call([A], up, 30)
    assert cached.value.headers["retry-after-ms"] == "29500"
    assert (await res.store.snapshot("a/m-a", cfg)).not_permitted == 1  # Redis not asked
    clock.now += 0.5
    with pytest.raises(CircuitOpenError):
        await res.call([A], up, 30)
    assert (await res.store.snapshot("a/m-a", cfg)).not_permitted == 2
    assert res.metrics.refused["a/m-a"] == 3 and up.calls == []


async def test_the_refusal_memory_never_outlives_the_opening(clock: Clock) -> None:
    res = resilience(clock)
    await res.store.open_for("a/m-a", res.settings.default.breaker, 0.3)
    up = Upstreams(clock)
    with pytest.raises(CircuitOpenError):
        await res.call([A], up, 30)
    clock.now += 0.3
    assert (await res.call([A], up, 30)).value == "a:m-a"


async def test_an_admin_close_clears_the_refusal_memory(clock: Clock) -> None:
    res = resilience(clock)
    await res.force_open("a/m-a")
    up = Upstreams(clock)
    with pytest.raises(CircuitOpenError):
        await res.call([A], up, 30)
    await res.force_close("a/m-a")
    assert (await res.call([A], up, 30)).value == "a:m-a"


async def test_a_successful_probe_closes_the_breaker_off_the_response_path(clock: Clock) -> None:
    res = resilience(clock, permitted_calls_in_half_open=1)
    await res.store.open_for("a/m-a", res.settings.default.breaker, 1)
    clock.now += 1
    result = await res.call([A], Upstreams(clock), 30)
    await res.drain()
    assert result.value == "a:m-a"
    assert res.metrics.transitions[("a/m-a", "HALF_OPEN", "CLOSED")] == 1
    assert res.metrics.states["a/m-a"] == BreakerState.CLOSED


def test_a_model_without_fallbacks_uses_its_primary_alone(clock: Clock) -> None:
    res = resilience(clock)
    assert res.chain("gpt", primary=C) == [A, B, C]
    assert res.chain("other", primary=C) == [C]
    assert res.chain("other") == []


async def test_a_probe_cancelled_in_the_bulkhead_queue_gives_its_permit_back(
    clock: Clock,
) -> None:
    settings = ResilienceSettings(
        default=policy(permitted_calls_in_half_open=1).model_copy(
            update={"bulkhead": BulkheadSettings(max_concurrent=1, max_queued=1)}
        )
    )
    res = Resilience(settings, MemoryBreakerStore(clock), clock=clock, sleep=clock.sleep)
    cfg = settings.default.breaker
    await res.bulkhead("a").acquire(30)  # another call holds the only slot
    await res.store.open_for("a/m-a", cfg, 1)
    clock.now += 1
    task = asyncio.create_task(res.call([A], Upstreams(clock), 30))
    for _ in range(5):  # let the call reach the bulkhead queue
        await asyncio.sleep(0)
    assert res.bulkhead("a").queued == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await res.drain()
    assert (await res.store.acquire("a/m-a", cfg, 30)).allowed


class CountingStore(MemoryBreakerStore):
    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.acquired = 0

    async def acquire(self, name, cfg, lease_s):  # type: ignore[no-untyped-def]
        self.acquired += 1
        return await super().acquire(name, cfg, lease_s)


async def test_a_closed_permit_is_reused_briefly_and_dropped_on_failure() -> None:
    clock = Clock()
    store = CountingStore(clock)
    no_retry = UpstreamPolicy(retry=RetrySettings(max_attempts=1))
    settings = ResilienceSettings(permit_cache_s=0.5, default=no_retry)
    res = Resilience(settings, store, clock=clock, sleep=clock.sleep)
    upstreams = Upstreams(clock, a=["ok", "ok", error(500), "ok"])
    await res.call([A], upstreams, 30)
    await res.call([A], upstreams, 30)
    assert store.acquired == 1  # the second call reused the CLOSED permit
    with pytest.raises(UpstreamError):
        await res.call([A], upstreams, 30)
    await res.drain()
    await res.call([A], upstreams, 30)
    assert store.acquired == 2  # a failure makes the next call ask the store again
    clock.now += 1.0
    await res.call([A], upstreams, 30)
    assert store.acquired == 3  # and so does the passing of permit_cache_s


class RecordingStore(MemoryBreakerStore):
    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.batches: list[list[tuple[object, ...]]] = []

    async def record_many(self, items):  # type: ignore[no-untyped-def]
        self.batches.append([(item[3], item[5]) for item in items])
        return await super().record_many(items)


async def test_successes_under_one_closed_permit_are_recorded_as_one_counted_call() -> None:
    clock = Clock()
    store = RecordingStore(clock)
    settings = ResilienceSettings(
        permit_cache_s=60, default=policy(window_size=50, minimum_calls=50)
    )
    res = Resilience(settings, store, clock=clock, sleep=clock.sleep)
    upstreams = Upstreams(clock, a=["ok"] * 20)
    await asyncio.gather(*(res.call([A], upstreams, 30) for _ in range(20)))
    await res.drain()
    from deployments.breaker import Outcome

    assert store.batches == [[(Outcome.SUCCESS, 20)]]
    snapshot = await store.snapshot("a/m-a", settings.default.breaker)
    assert snapshot.calls == 20  # the count reached the breaker's window


async def test_retries_stay_within_the_upstreams_retry_budget(clock: Clock) -> None:
    """Under sustained failure, retries add at most budget_percent to the upstream's load."""
    retry = RetrySettings(max_attempts=3, jitter="none", budget_percent=0.2, budget_min_per_s=0)
    lenient = BreakerSettings(window_size=1000, minimum_calls=1000)
    settings = ResilienceSettings(default=UpstreamPolicy(breaker=lenient, retry=retry))
    res = Resilience(settings, MemoryBreakerStore(clock), clock=clock, sleep=clock.sleep)
    up = Upstreams(clock, a=[error(503)])
    for _ in range(50):
        with pytest.raises(UpstreamError):
            await res.call([A], up, 30)
    assert len(up.calls) == 50 + 10  # without the budget: 150
    assert res.metrics.retries["a"] == 10
    assert res.metrics.retries_over_budget["a"] == 50  # each request ended on a refusal


class RemoteStore(MemoryBreakerStore):
    """Asks for a permit over the network, as Redis does: the caller waits a turn."""

    async def acquire(self, name: str, cfg: BreakerSettings, lease_s: float):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return await super().acquire(name, cfg, lease_s)


def balanced(clock: Clock, strategy: str = "weighted", **extra: object) -> Resilience:
    """The model "gpt" balanced over a and b (b twice a's weight), falling back to c."""
    group = {
        "strategy": strategy,
        "targets": [{**A.model_dump(), "weight": 1}, {**B.model_dump(), "weight": 2}],
        **extra,
    }
    settings = ResilienceSettings.model_validate(
        {
            "default": {**policy().model_dump(), "bulkhead": {"max_concurrent": 8}},
            "balance": {"gpt": group},
            "fallbacks": {"gpt": [A.model_dump(), C.model_dump()]},
        }
    )
    return Resilience(settings, RemoteStore(clock), clock=clock, sleep=clock.sleep)


async def test_a_balanced_chain_is_its_group_then_the_fallbacks_not_in_it(clock: Clock) -> None:
    res = balanced(clock)
    chains = [res.chain("gpt") for _ in range(3000)]
    assert {tuple(c[2:]) for c in chains} == {(C,)}  # a, already in the group, once
    assert {frozenset(c[:2]) for c in chains} == {frozenset({A, B})}
    firsts = [c[0] for c in chains]
    assert firsts.count(B) / 3000 == pytest.approx(2 / 3, abs=0.03)
    assert res.metrics.picks[("gpt", "b/m-b")] == firsts.count(B)
    assert res.chain("other", primary=A) == [A]  # unbalanced models are untouched


async def test_a_failing_pick_is_followed_by_the_group_s_other_target(clock: Clock) -> None:
    res = balanced(clock, "least-busy")
    for _ in range(5):
        res.balancer.enter(B)  # a is picked: it has less in flight
    up = Upstreams(clock, a=[error(502)])  # retried once, then the next target
    chain = res.chain("gpt")
    for _ in range(5):
        res.balancer.leave(B)
    result = await res.call(chain, up, 30)
    assert up.calls == ["a", "a", "b"] and result.target == B
    assert res.metrics.fallbacks == {("a/m-a", "b/m-b"): 1}


async def test_least_busy_sends_the_next_call_past_a_stream_in_flight(clock: Clock) -> None:
    res = balanced(clock, "least-busy")
    up = Upstreams(clock)
    held = await res.call([B], up, 30, stream=True)  # holds b's bulkhead until released
    for _ in range(20):
        assert res.chain("gpt")[0] == A  # 0 in flight at a, 1 per 2 units of weight at b
    held.release()
    assert {res.chain("gpt")[0] for _ in range(50)} == {A, B}
    assert (res.balancer.inflight(A), res.balancer.inflight(B)) == (0, 0)
    with pytest.raises(UpstreamError):  # a failed call leaves too
        await res.call([A], Upstreams(clock, a=[error(400)]), 30)
    assert res.balancer.inflight(A) == 0


async def test_least_busy_spreads_calls_that_pick_at_once(clock: Clock) -> None:
    res = balanced(clock, "least-busy")
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "ok"

    up = Upstreams(clock, a=[held], b=[held])

    async def one() -> object:  # picks and calls with nothing in between, as the ingress does
        return await res.call(res.chain("gpt"), up, 30)

    calls = [asyncio.create_task(one()) for _ in range(3)]
    await asyncio.sleep(0)
    assert (res.balancer.inflight(A), res.balancer.inflight(B)) == (1, 2)  # b: twice a's weight
    for _ in range(5):  # each asks its breaker for a permit (a network turn), then calls
        await asyncio.sleep(0)
    assert sorted(up.calls) == ["a", "b", "b"]  # not all three on whichever looked idle first
    gate.set()
    await asyncio.gather(*calls)
    assert (res.balancer.inflight(A), res.balancer.inflight(B)) == (0, 0)


async def test_an_open_breaker_s_target_is_not_picked_while_its_refusal_is_known(
    clock: Clock,
) -> None:
    res = balanced(clock)
    await res.force_open("b/m-b")
    up = Upstreams(clock)
    results = [await res.call(res.chain("gpt"), up, 30) for _ in range(30)]
    assert all(r.target == A for r in results)
    assert up.calls.count("b") == 0
    assert res.metrics.refused["b/m-b"] == 1  # asked once; then known to be open
    clock.now += 31  # past wait_in_open_s and the refusal's memory: b is asked again
    await res.force_close("b/m-b")
    assert {(await res.call(res.chain("gpt"), up, 30)).target for _ in range(30)} == {A, B}


async def test_lowest_latency_learns_from_the_calls_made(clock: Clock) -> None:
    res = balanced(clock, "lowest-latency")
    up = Upstreams(clock, a=[0.05], b=[0.4])  # each call advances the clock this long
    for _ in range(2):  # one call each to measure both (the unmeasured go first)
        await res.call(res.chain("gpt")[:1], up, 30)
    assert res.balancer.latency_s(A) == pytest.approx(0.05)
    assert res.balancer.latency_s(B) == pytest.approx(0.4)
    served = [(await res.call(res.chain("gpt"), up, 30)).target for _ in range(20)]
    assert served == [A] * 20
    up.scripts["a"] = [error(400, **{"x-should-retry": "false"})]
    with pytest.raises(UpstreamError):  # not retried, not fallen back: a client error
        await res.call(res.chain("gpt"), up, 30)
    assert res.balancer.latency_s(A) == pytest.approx(0.05)  # the client's fault: no measure
    up.scripts["a"] = [error(500)]
    result = await res.call(res.chain("gpt"), up, 30)  # a failed twice: b served
    assert result.target == B and res.balancer.latency_s(A) == math.inf
    assert [(await res.call(res.chain("gpt"), up, 30)).target for _ in range(5)] == [B] * 5


def context_error() -> UpstreamError:
    body = b'{"error": {"code": "context_length_exceeded", "message": "too long"}}'
    return UpstreamError("too long", status_code=400, headers={}, upstream_body=body)


async def test_a_request_too_long_for_the_window_goes_to_the_context_fallbacks(
    clock: Clock,
) -> None:
    res = resilience(clock)  # "gpt": a, b, c
    up = Upstreams(clock, a=[context_error()])
    result = await res.call(res.chain("gpt"), up, 30, overflow=[C])
    assert (up.calls, result.target) == (["a", "c"], C)  # b, same window as a, is skipped
    assert res.metrics.context_fallbacks == {"a/m-a": 1}
    assert result.headers() == {"x-upstream": "c", "x-attempts": "2"}


async def test_other_client_errors_and_models_without_context_fallbacks_are_passed_on(
    clock: Clock,
) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[error(400)])
    with pytest.raises(UpstreamError) as plain:
        await res.call(res.chain("gpt"), up, 30, overflow=[C])
    assert plain.value.status_code == 400 and up.calls == ["a"]
    up = Upstreams(clock, a=[context_error()])
    with pytest.raises(UpstreamError) as overflowed:
        await res.call(res.chain("gpt"), up, 30)
    assert "too long" in str(overflowed.value) and up.calls == ["a"]


async def test_context_fallbacks_are_taken_once_and_their_own_failure_is_told(
    clock: Clock,
) -> None:
    res = resilience(clock)
    up = Upstreams(clock, a=[context_error()], c=[context_error()])
    with pytest.raises(UpstreamError) as still:
        await res.call(res.chain("gpt"), up, 30, overflow=[C])
    assert up.calls == ["a", "c"] and "too long" in str(still.value)
    await res.force_open("c/m-c")  # the larger window is unavailable: say why it was needed
    up = Upstreams(clock, a=[context_error()])
    with pytest.raises(UpstreamError) as told:
        await res.call(res.chain("gpt"), up, 30, overflow=[C])
    assert told.value.status_code == 400 and up.calls == ["a"]


async def test_lowest_latency_sends_one_call_at_a_time_to_an_unmeasured_target(
    clock: Clock,
) -> None:
    res = balanced(clock, "lowest-latency")
    res.balancer.finished(A, 0.1)  # a is measured; b is not, so b goes first, once
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "ok"

    up = Upstreams(clock, a=[held], b=[held])

    async def one() -> object:
        return await res.call(res.chain("gpt"), up, 30)

    calls = [asyncio.create_task(one()) for _ in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert sorted(up.calls) == ["a", "a", "a", "b"]  # not four calls on a maybe-slow b
    gate.set()
    await asyncio.gather(*calls)
    assert res.balancer.latency_s(B) == pytest.approx(0.0)  # measured now (the clock stood)
