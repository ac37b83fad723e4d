"""Requests in flight at once per key and tenant (LiteLLM's max_parallel_requests),
in process against the mock and a real store, shared by two gateways as by two
replicas; a slot comes back when its request settles, or lapses on its own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments.concurrency import PREFIX, ConcurrencyLimiter, ConcurrencySettings
from serve_app.context import Principal, RequestContext
from serve_app.errors import RateLimitError
from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from serve_app.settings import hash_key
from tests.support import LOCAL_KEY, MockServer, auth, gateway_args, in_process

pytestmark = pytest.mark.integration


async def _given_back(redis_url: str, key: str) -> None:
    """Wait until every slot of ``key`` came back (released in the background)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        for _ in range(250):
            if await client.zcard(key) == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{key} still holds slots")
    finally:
        await client.aclose()


def _ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": content}], **extra}


async def test_a_key_gets_its_cap_across_replicas_and_its_slots_back(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    name = f"busy-{uuid.uuid4().hex[:8]}"
    args = gateway_args(
        mock_server.base_url,
        redis_url,
        api_keys=[
            {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "admin": True},
            {"name": name, "key_sha256": hash_key(f"sk-{name}"), "tenant": name},
        ],
        limits={"max_parallel": {"per_key": {"overrides": {name: 2}}}},
    )
    mock_behaviour.config.latency.fixed_ms = 300
    key = auth(f"sk-{name}")
    async with (
        in_process(Gateway(args), LOCAL_KEY) as one,
        in_process(Gateway(args), LOCAL_KEY) as two,
    ):
        calls = [
            client.post("/v1/chat/completions", json=_ask(f"q{i}", stream=i % 2 == 0), headers=key)
            for i, client in enumerate((one, two, one, two))
        ]
        answers = await asyncio.gather(*calls)
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 200, 429, 429], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.json()["error"]["code"] == "too_many_concurrent_requests"
        assert refused.headers["retry-after"] == "1"
        assert mock_behaviour.stats.calls == 2
        await _given_back(redis_url, f"{PREFIX}:key:{name}")
        again = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=_ask("again"), headers=key) for c in (one, two))
        )
        assert [a.status_code for a in again] == [200, 200]
        # The admin key has no cap.
        free = await asyncio.gather(*(one.post("/v1/chat/completions", json=_ask(f"f{i}"))
                                      for i in range(4)))  # fmt: skip
        assert all(a.status_code == 200 for a in free)


async def test_a_key_made_at_run_time_carries_its_own_cap(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    mock_behaviour.config.latency.fixed_ms = 300
    async with in_process(Gateway(gateway_args(mock_server.base_url, redis_url)), LOCAL_KEY) as c:
        spec = {"name": f"one-{uuid.uuid4().hex[:8]}", "max_parallel_requests": 1}
        made = await c.post("/admin/keys", json=spec)
        assert made.status_code == 201, made.text
        key = auth(made.json()["key"])
        answers = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=_ask(f"r{i}"), headers=key) for i in range(3))
        )
        assert sorted(a.status_code for a in answers) == [200, 429, 429]


async def test_a_slot_lapses_when_its_replica_never_gives_it_back(
    redis_client: aioredis.Redis,
) -> None:
    limiter = ConcurrencyLimiter(redis_client)
    settings = ConcurrencySettings.model_validate({"per_tenant": {"default": 1}, "lease_s": 0.2})
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    def ctx(request_id: str) -> RequestContext:
        principal = Principal(key_id="k", tenant=tenant)
        return RequestContext(request_id, principal, "chat", "m", {})

    held = await limiter.acquire(ctx("a"), settings)
    assert held is not None
    with pytest.raises(RateLimitError):
        await limiter.acquire(ctx("b"), settings)
    await asyncio.sleep(0.3)  # its replica died: the slot lapses
    assert await limiter.acquire(ctx("c"), settings) is not None
    assert await limiter.acquire(ctx("d"), ConcurrencySettings()) is None  # no limit applies
