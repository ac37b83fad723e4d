"""When Redis is down, each replica keeps a local breaker instead of failing."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from deployments.breaker import BreakerSettings, BreakerState, Decision, Outcome
from deployments.breaker_store import FailoverBreakerStore, MemoryBreakerStore, RedisBreakerStore
from serve_app.embedded_store import free_port
from serve_app.errors import StoreUnavailableError

NAME = "up/model"
CFG = BreakerSettings(window_size=4, minimum_calls=4, wait_in_open_s=30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(MemoryBreakerStore):
    """A shared store that can be switched off like an unreachable Redis."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.down = False

    async def acquire(self, name: str, cfg: BreakerSettings, lease_s: float) -> Decision:
        if self.down:
            raise StoreUnavailableError("down")
        return await super().acquire(name, cfg, lease_s)

    async def record(
        self,
        name: str,
        cfg: BreakerSettings,
        permit: Decision,
        outcome: Outcome,
        open_for_s: float = 0.0,
    ) -> Decision:
        if self.down:
            raise StoreUnavailableError("down")
        return await super().record(name, cfg, permit, outcome, open_for_s)

    async def open_for(self, name: str, cfg: BreakerSettings, seconds: float) -> Decision:
        if self.down:
            raise StoreUnavailableError("down")
        return await super().open_for(name, cfg, seconds)


async def test_an_unreachable_redis_is_a_store_unavailable_error() -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    store = RedisBreakerStore(client)
    with pytest.raises(StoreUnavailableError):
        await store.acquire(NAME, CFG, 30)
    await client.aclose()


async def test_a_local_breaker_protects_the_upstream_while_redis_is_down() -> None:
    clock = Clock()
    primary = FlakyStore(clock)
    store = FailoverBreakerStore(primary, clock, retry_primary_after_s=1.0)
    primary.down = True
    for _ in range(4):
        permit = await store.acquire(NAME, CFG, 30)
        assert permit.allowed and permit.local
        await store.record(NAME, CFG, permit, Outcome.FAILURE)
    refused = await store.acquire(NAME, CFG, 30)
    assert not refused.allowed and refused.local and store.degraded
    assert store.failovers == 1


async def test_the_shared_state_rules_again_once_redis_answers() -> None:
    clock = Clock()
    primary = FlakyStore(clock)
    store = FailoverBreakerStore(primary, clock, retry_primary_after_s=1.0)
    primary.down = True
    await store.open_for(NAME, CFG, 60)  # opens the local breaker only
    primary.down = False
    assert not (await store.acquire(NAME, CFG, 30)).allowed  # not retried before 1 s
    clock.now += 1.0
    permit = await store.acquire(NAME, CFG, 30)
    assert permit.allowed and not permit.local and not store.degraded
    primary.down = True
    clock.now += 1.0
    local = await store.acquire(NAME, CFG, 30)
    assert local.allowed and local.local  # the old local opening was discarded
    assert local.state == BreakerState.CLOSED and store.failovers == 2


async def test_an_outcome_whose_record_fails_is_dropped_not_raised() -> None:
    clock = Clock()
    primary = FlakyStore(clock)
    store = FailoverBreakerStore(primary, clock)
    permit = await store.acquire(NAME, CFG, 30)
    primary.down = True
    decision = await store.record(NAME, CFG, permit, Outcome.FAILURE)
    assert decision.transition is None and store.degraded
