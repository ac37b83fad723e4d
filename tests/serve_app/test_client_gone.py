"""A client that goes away during a coalesced (cacheable) answer: the flight goes on for
its followers and the cache, so the upstream call it started is still paid for. That
spend must reach the ledger and the budget, or leaving early would fill the cache for free.
In process (no Ray): Serve cancels the request's task when its client disconnects, as the
test does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal

import httpx
import orjson
import pytest

from deployments.provider import ProviderClient, UpstreamResponse
from serve_app.ingress import Gateway
from serve_app.settings import GatewayArgs, hash_key
from serve_app.ticket import drain_background
from tests.support import in_process

pytestmark = pytest.mark.integration

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)
# USD per million tokens: ANSWER's usage (3 prompt, 1 completion) costs 5e-6.
PRICE = {"input_per_mtok": "1.00", "output_per_mtok": "2.00"}
COST = Decimal("0.000005")
STREAM_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
STREAM_COST = Decimal("0.000007")


class GatedTransport:
    """An upstream that answers when the test says so, or fails."""

    def __init__(self) -> None:
        self.calls = 0
        self.called = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = False
        self.streams: list[_GatedStream] = []

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        self.calls += 1
        self.called.set()
        await self.release.wait()
        if self.fail:
            return UpstreamResponse(500, {}, b'{"error": {"message": "boom"}}')
        return UpstreamResponse(200, {}, ANSWER)

    async def stream(self, url: str, body: bytes, headers: Mapping[str, str]) -> _GatedStream:
        self.calls += 1
        return _GatedStream(self)

    async def aclose(self) -> None:
        pass


class _GatedStream:
    """Two content chunks, then nothing until released, then its usage; records its closing."""

    status, headers = 200, {"content-type": "text/event-stream"}

    def __init__(self, transport: GatedTransport) -> None:
        self.transport = transport
        self.closed = False
        transport.streams.append(self)

    async def chunks(self) -> AsyncIterator[bytes]:
        for word in ("one ", "two "):
            delta = {"choices": [{"index": 0, "delta": {"content": word}}]}
            yield b"data: " + orjson.dumps(delta) + b"\n\n"
        self.transport.called.set()
        await self.transport.release.wait()
        finish = {
            "id": "c1",
            "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        yield b"data: " + orjson.dumps(finish) + b"\n\n"
        yield b"data: " + orjson.dumps({"choices": [], "usage": STREAM_USAGE}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.closed = True


@contextlib.asynccontextmanager
async def serving(
    redis_url: str,
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient, GatedTransport]]:
    args = GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [{"name": "m", "upstream": "u"}],
            "api_keys": [{"name": "gone", "key_sha256": hash_key("sk-gone"), "tenant": "t"}],
            "store": {"url": redis_url},
            "cost": {"pricing": {"overrides": {"m": PRICE}}, "ledger": {"flush_interval_ms": 20}},
            "budgets": {"keys": {"gone": {"daily_usd": "1"}}},
        }
    )
    transport = GatedTransport()
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": transport}))
    async with in_process(gateway, "sk-gone") as client:
        yield gateway, client, transport


def _ask(
    client: httpx.AsyncClient, text: str, request_id: str, **extra: object
) -> asyncio.Task[httpx.Response]:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]}
    body |= extra
    return asyncio.create_task(
        client.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id})
    )


async def _leave(request: asyncio.Task[httpx.Response]) -> None:
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request


async def _follow_and_leave(
    gateway: Gateway,
    transport: GatedTransport,
    leader: asyncio.Task[httpx.Response],
    client: httpx.AsyncClient,
    text: str,
    request_id: str,
    **extra: object,
) -> asyncio.Task[httpx.Response]:
    """Once the leader's call is under way, a follower joins it; the leader's client
    leaves, and the upstream answers."""
    await asyncio.wait_for(transport.called.wait(), 5)
    follower = _ask(client, text, request_id, **extra)
    async with asyncio.timeout(5):  # the follower joins the flight
        while gateway.stages.dedup.stats.coalesced < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    await _leave(leader)
    transport.release.set()
    return follower


async def _find(gateway: Gateway, request_id: str) -> object | None:
    """The ledger's record of the request the client sent under ``request_id``."""
    ledger = gateway.stages.cost.ledger
    await ledger.flush()
    found = [r for r in await ledger.records(0, 2**62) if r.request_id == request_id]
    assert len(found) <= 1, found
    return found[0] if found else None


async def _record(gateway: Gateway, request_id: str) -> object:
    async with asyncio.timeout(5):
        while (record := await _find(gateway, request_id)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return record


async def _spent(gateway: Gateway) -> Decimal:
    statuses = await gateway.stages.cost.guard.status("t", "gone")
    return sum((s.spent for s in statuses if s.period == "daily"), Decimal(0))


async def _spent_reaches(gateway: Gateway, amount: Decimal) -> None:
    """The key's daily spend becomes ``amount`` (settled in the background)."""
    async with asyncio.timeout(5):
        while await _spent(gateway) != amount:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_the_upstream_call_of_a_client_that_left_is_billed_to_it(
    redis_url: str, redis_client: object
) -> None:
    async with serving(redis_url) as (gateway, client, transport):
        text = "who pays when the asker leaves?"
        leader = _ask(client, text, "req-gone-leader")
        follower = await _follow_and_leave(
            gateway, transport, leader, client, text, "req-gone-follower"
        )
        answer = await follower
        assert answer.status_code == 200 and answer.headers["x-dedup"] == "FOLLOWER"
        assert transport.calls == 1

        record = await _record(gateway, "req-gone-leader")
        assert record.upstream == "u" and record.cost_pico > 0  # type: ignore[attr-defined]
        assert record.status == "error"  # type: ignore[attr-defined]  # the client got nothing
        await _spent_reaches(gateway, COST)
        # The answer it paid for was cached: asking again is a hit, at no cost.
        again = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]},
        )
        assert again.headers["x-cache"] == "HIT" and transport.calls == 1
        assert await _spent(gateway) == COST


async def test_a_flight_that_fails_after_its_client_left_refunds_it(
    redis_url: str, redis_client: object
) -> None:
    async with serving(redis_url) as (gateway, client, transport):
        transport.fail = True
        leader = _ask(client, "this one will fail", "req-gone-failed")
        await asyncio.wait_for(transport.called.wait(), 5)
        await _leave(leader)
        transport.release.set()
        guard = gateway.stages.cost.guard
        async with asyncio.timeout(10):  # the hold lasts until the flight (and its retries) ends
            while any(s.held for s in await guard.status("t", "gone")):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        statuses = await guard.status("t", "gone")
        assert statuses and all(s.spent == 0 for s in statuses)
        assert await _find(gateway, "req-gone-failed") is None


async def test_a_stream_whose_client_left_is_billed_what_it_was_sent(
    redis_url: str, redis_client: object
) -> None:
    async with serving(redis_url) as (gateway, client, transport):
        request = _ask(client, "stream to nobody", "req-gone-stream", temperature=1, stream=True)
        await asyncio.wait_for(transport.called.wait(), 5)
        await _leave(request)
        assert transport.streams[0].closed
        record = await _record(gateway, "req-gone-stream")
        assert record.status == "error" and record.estimated  # type: ignore[attr-defined]
        assert record.completion_tokens > 0 and record.cost_pico > 0  # type: ignore[attr-defined]


async def test_a_coalesced_stream_nobody_reads_any_more_is_closed(
    redis_url: str, redis_client: object
) -> None:
    async with serving(redis_url) as (gateway, client, transport):
        request = _ask(client, "coalesced, to nobody", "req-gone-alone", stream=True)
        await asyncio.wait_for(transport.called.wait(), 5)
        await _leave(request)
        async with asyncio.timeout(5):  # stopped in the background, not read to its end
            while not transport.streams[0].closed:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert gateway.stages.dedup.stats.streams_stopped == 1
        record = await _record(gateway, "req-gone-alone")
        assert record.status == "error" and record.estimated  # type: ignore[attr-defined]
        assert record.completion_tokens > 0  # type: ignore[attr-defined]


async def test_a_coalesced_stream_its_leader_left_is_billed_whole_and_cached(
    redis_url: str, redis_client: object
) -> None:
    """It goes on for its follower: the leader's client pays for the whole call, as if it
    had stayed (or leaving early would be a discount), and the answer is stored."""
    async with serving(redis_url) as (gateway, client, transport):
        text = "who pays for the rest of the stream?"
        leader = _ask(client, text, "req-stream-leader", stream=True)
        follower = await _follow_and_leave(
            gateway, transport, leader, client, text, "req-stream-follower", stream=True
        )
        answer = await follower
        assert answer.status_code == 200 and answer.headers["x-dedup"] == "FOLLOWER"
        assert "two" in answer.text and answer.text.endswith("data: [DONE]\n\n")

        record = await _record(gateway, "req-stream-leader")
        assert record.status == "error" and not record.estimated  # type: ignore[attr-defined]
        assert record.completion_tokens == 2  # type: ignore[attr-defined]
        await _spent_reaches(gateway, STREAM_COST)
        await drain_background()  # the leader's unseen read stores the answer when it ends
        again = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]},
        )
        assert again.headers["x-cache"] == "HIT" and transport.calls == 1
        assert await _spent(gateway) == STREAM_COST
        assert gateway.stages.dedup.stats.streams_stopped == 0
