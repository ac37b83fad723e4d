"""Requests in flight at once per key and tenant (LiteLLM's max_parallel_requests),
in process against the mock and a real store, shared by two gateways as by two
replicas; a slot comes back when its request settles, or lapses on its own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from deployments.concurrency import PREFIX, ConcurrencyLimiter, ConcurrencySettings
from serve_app.context import Principal, RequestContext
from serve_app.errors import RateLimitError
from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from serve_app.settings import GatewayArgs, hash_key
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


def _capped(mock_server: MockServer, redis_url: str, name: str, cap: int) -> GatewayArgs:
    """The admin key, uncapped, and key ``sk-<name>`` (its own tenant) at ``cap``."""
    return gateway_args(
        mock_server.base_url,
        redis_url,
        api_keys=[
            {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "admin": True},
            {"name": name, "key_sha256": hash_key(f"sk-{name}"), "tenant": name},
        ],
        limits={"max_parallel": {"per_key": {"overrides": {name: cap}}}},
    )


def _ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": content}], **extra}


async def test_a_key_gets_its_cap_across_replicas_and_its_slots_back(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    name = f"busy-{uuid.uuid4().hex[:8]}"
    args = _capped(mock_server, redis_url, name, 2)
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


async def _leave_as_the_stream_starts(app: Any, path: str, body: dict[str, Any], key: str) -> int:
    """A raw ASGI call whose client disconnects while the response's head is sent
    (ASGI 2.3, as Serve's proxy speaks it): the body is never read."""
    raw = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {key}".encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("gw", 80),
    }
    head_sent = asyncio.Event()
    statuses: list[int] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await head_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
            head_sent.set()
            await asyncio.sleep(0.05)  # the client leaves meanwhile

    await app(scope, receive, send)
    return statuses[0]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", _ask("hi", stream=True)),
        ("/v1/responses", {"model": "mock-gpt", "stream": True, "input": "hi"}),
    ],
)
async def test_a_client_gone_as_its_stream_starts_gives_its_slot_back(
    mock_server: MockServer,
    mock_behaviour: MockBehaviour,
    redis_url: str,
    path: str,
    body: dict[str, Any],
) -> None:
    """Its relay never ran: the slot, the upstream's bulkhead place and the bill are
    settled all the same, as if it had left after the first event."""
    name = f"gone-{uuid.uuid4().hex[:8]}"
    args = _capped(mock_server, redis_url, name, 1)
    mock_behaviour.config.latency.per_token_ms = 20  # the stream is still going when it leaves
    gateway = Gateway(args)
    async with in_process(gateway, LOCAL_KEY):
        app = gateway.asgi()
        assert await _leave_as_the_stream_starts(app, path, body, f"sk-{name}") == 200
        await _given_back(redis_url, f"{PREFIX}:key:{name}")
        for _ in range(100):
            if gateway.stages.resilience.bulkhead("mock").active == 0:
                break
            await asyncio.sleep(0.02)
        assert gateway.stages.resilience.bulkhead("mock").active == 0


async def test_requests_sharing_a_client_request_id_each_take_a_slot_and_a_record(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    """A client's x-request-id is echoed, never trusted as unique: requests sent under
    one id each take a slot and leave a ledger record of their own."""
    name = f"reuse-{uuid.uuid4().hex[:8]}"
    mock_behaviour.config.latency.fixed_ms = 300
    headers = {**auth(f"sk-{name}"), "x-request-id": "same-id"}
    gateway = Gateway(_capped(mock_server, redis_url, name, 2))
    async with in_process(gateway, LOCAL_KEY) as client:
        answers = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=_ask(f"q{i}"), headers=headers)
                for i in range(4)
            )
        )
        assert sorted(a.status_code for a in answers) == [200, 200, 429, 429]
        assert {a.headers["x-request-id"] for a in answers} == {"same-id"}
        ledger = gateway.stages.cost.ledger
        await ledger.flush()
        records = [r for r in await ledger.records(0, 2**62) if r.key_id == name]
        assert [r.request_id for r in records] == ["same-id", "same-id"]


async def test_requests_sharing_a_client_request_id_each_hold_their_budget(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    """Each request's hold fits the budget alone, not two at once: sent together under
    one x-request-id, one is admitted (a shared id once shared one hold, and all were)."""
    name = f"held-{uuid.uuid4().hex[:8]}"
    args = _capped(mock_server, redis_url, name, 100).model_dump()
    args["budgets"] = {"keys": {name: {"daily_usd": "2"}}}
    args["cost"] = {
        "pricing": {"overrides": {"mock-gpt": {"input_per_mtok": "100", "output_per_mtok": "0"}}}
    }
    mock_behaviour.config.latency.fixed_ms = 300
    headers = {**auth(f"sk-{name}"), "x-request-id": "same-id"}
    long = "word " * 8000  # ~1.3 USD held a request
    async with in_process(Gateway(GatewayArgs.model_validate(args)), LOCAL_KEY) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json=_ask(f"q{i} {long}", max_tokens=16),
                    headers=headers,
                )
                for i in range(3)
            )
        )
        assert sorted(a.status_code for a in answers) == [200, 429, 429], [a.text for a in answers]
        assert mock_behaviour.stats.calls == 1
