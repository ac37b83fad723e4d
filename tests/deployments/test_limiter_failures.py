"""The limiter when its store fails: fail-open keeps serving and reports one
incident; fail-closed answers 503; nothing hangs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments import limiter as limiter_module
from deployments.limiter import RateLimiter
from deployments.limiter_decision import LimitDecision
from deployments.limiter_settings import LimiterSettings
from serve_app.context import Principal, RequestContext
from serve_app.embedded_store import EmbeddedStore, free_port
from serve_app.errors import StoreUnavailableError

pytestmark = pytest.mark.integration

HANG_GUARD_S = 10  # far above any bound the limiter sets: reaching it means a hang


def ctx() -> RequestContext:
    return RequestContext("r", Principal("k1", "t1"), "chat", "m1", {}, max_tokens=10)


def settings(mode: str) -> LimiterSettings:
    return LimiterSettings.model_validate(
        {
            "failure_mode": mode,
            "store_timeout_s": 0.5,
            "per_key": {"default": [{"window": "1m", "requests": 100}]},
            # One store call per decision: the tests count failed calls.
            "lease_requests": 0,
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.store_errors: list[str] = []

    def on_decision(self, decision: LimitDecision) -> None:
        self.outcomes.append(decision.outcome)

    def on_store_error(self, operation: str) -> None:
        self.store_errors.append(operation)

    def on_lease(self, granted: int, used: int) -> None:
        raise AssertionError("no leases here")


def incident_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "deployments.limiter" and "store failed" in r.getMessage()
    ]


@pytest.fixture
async def dead_client() -> AsyncIterator[aioredis.Redis]:
    """A client pointed at a port nobody listens on."""
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    yield client
    await client.aclose()


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    """A server of this test's own, to kill and restart."""
    store = EmbeddedStore(tmp_path / "valkey")
    store.start()
    yield store
    store.stop()


@pytest.fixture
async def own_client(own_store: EmbeddedStore) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(own_store.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    yield client
    await client.aclose()


async def test_fail_open_admits_and_reports_one_incident(
    dead_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    limiter = RateLimiter(dead_client, settings("open"), observer=recorder)
    caplog.set_level(logging.WARNING, logger="deployments.limiter")
    async with asyncio.timeout(HANG_GUARD_S):
        decisions = [await limiter.acquire(ctx()) for _ in range(4)]
    assert all(d.allowed and d.outcome == "fail_open" for d in decisions)
    assert limiter.incident_active and limiter.incidents == 1 and limiter.store_errors == 4
    assert recorder.store_errors == ["acquire"] * 4
    assert len(incident_lines(caplog)) == 1
    assert limiter.headers(decisions[0]) == {}


async def test_fail_closed_answers_503_with_the_envelope(dead_client: aioredis.Redis) -> None:
    recorder = Recorder()
    limiter = RateLimiter(dead_client, settings("closed"), observer=recorder)
    async with asyncio.timeout(HANG_GUARD_S):
        with pytest.raises(StoreUnavailableError) as caught:
            await limiter.acquire(ctx())
    assert caught.value.status_code == 503
    assert caught.value.to_dict()["error"]["code"] == "store_unavailable"
    assert recorder.outcomes == ["fail_closed"]


async def test_store_killed_and_restarted_fail_open(
    own_store: EmbeddedStore,
    own_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.WARNING, logger="deployments.limiter")
    limiter = RateLimiter(own_client, settings("open"))
    async with asyncio.timeout(HANG_GUARD_S * 3):
        served = await limiter.acquire(ctx())
        assert served.outcome == "allowed"
        own_store.kill()
        assert (await limiter.acquire(ctx())).outcome == "fail_open"
        await limiter.settle(served, 5)  # lost, but never raised
        own_store.start()
        assert (await limiter.acquire(ctx())).outcome == "allowed"
        # Back within the quiet period: a second failure is the same incident.
        own_store.kill()
        assert (await limiter.acquire(ctx())).outcome == "fail_open"
        assert limiter.incidents == 1 and len(incident_lines(caplog)) == 1

        monkeypatch.setattr(limiter_module, "INCIDENT_QUIET_S", 0.0)
        own_store.start()
        assert (await limiter.acquire(ctx())).outcome == "allowed"
        assert not limiter.incident_active
        own_store.kill()
        assert (await limiter.acquire(ctx())).outcome == "fail_open"
    assert limiter.incidents == 2 and len(incident_lines(caplog)) == 2
    assert limiter.store_errors == 4  # three acquires and one settlement


async def test_store_killed_and_restarted_fail_closed(
    own_store: EmbeddedStore, own_client: aioredis.Redis
) -> None:
    limiter = RateLimiter(own_client, settings("closed"))
    async with asyncio.timeout(HANG_GUARD_S * 2):
        await limiter.acquire(ctx())
        own_store.kill()
        with pytest.raises(StoreUnavailableError):
            await limiter.acquire(ctx())
        own_store.start()
        decision: Any = await limiter.acquire(ctx())
    assert decision.outcome == "allowed"


async def test_leases_outlive_the_store_for_their_lifetime_and_never_hang(
    own_store: EmbeddedStore, own_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deployments.limiter")
    busy = LimiterSettings.model_validate(
        {"store_timeout_s": 0.5, "per_key": {"default": [{"window": "1m", "requests": 10**6}]}}
    )
    limiter = RateLimiter(own_client, busy)
    async with asyncio.timeout(HANG_GUARD_S * 3):
        while not limiter.leased:  # steady traffic until a lease admits
            assert (await limiter.acquire(ctx())).outcome == "allowed"
            await asyncio.sleep(0.001)
        own_store.kill()
        # What the lease holds is admitted without the store; then fail-open.
        outcomes = [(await limiter.acquire(ctx())).outcome for _ in range(300)]
        assert outcomes[0] == "allowed" and outcomes[-1] == "fail_open"
        assert set(outcomes) == {"allowed", "fail_open"}
        await limiter.drain()  # the unused part cannot go back: counted, logged, no hang
    assert limiter.store_errors > 0 and len(incident_lines(caplog)) == 1
