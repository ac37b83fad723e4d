"""Billing where a request ends oddly: an answer with no usage, a client that leaves
while its request is admitted, or after the upstream has answered."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from deployments.provider import ProviderClient, UpstreamResponse
from deployments.tokens import estimate_text_tokens
from serve_app.ingress import Gateway
from serve_app.settings import GatewayArgs, hash_key
from tests.support import in_process

pytestmark = pytest.mark.integration

TEXT = "word " * 400  # what the answers write: 500 tokens by the gateway's estimate
PRICE = {"input_per_mtok": "1", "output_per_mtok": "2"}


class Upstream:
    """Answers chat and responses calls with ``TEXT``, with its usage (True), none
    (False), or the ``usage`` given; or with the ``answer`` given."""

    def __init__(
        self,
        usage: bool | dict[str, Any] = True,
        answer: Any = None,
        stalled: bool = False,  # its streams stall after their first chunk
        late: bool = False,  # its streams open late and send their first chunk later still
    ) -> None:
        self.usage, self.answer, self.stalled, self.late = usage, answer, stalled, late
        self.calls = 0

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        self.calls += 1
        if url.endswith("/responses"):
            answer: dict[str, Any] = {
                "id": f"resp_{self.calls}",
                "object": "response",
                "status": "completed",
                "store": orjson.loads(body).get("store", True),
                "output": [
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": TEXT}],
                    }
                ],
            }
            usage = {"input_tokens": 5, "output_tokens": 500, "total_tokens": 505}
        else:
            answer = {
                "id": "c",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": TEXT},
                        "finish_reason": "stop",
                    }
                ],
            }
            usage = {"prompt_tokens": 5, "completion_tokens": 500, "total_tokens": 505}
        if isinstance(self.usage, dict):
            answer["usage"] = self.usage
        elif self.usage:
            answer["usage"] = usage
        if self.answer is not None:
            answer = self.answer
        return UpstreamResponse(200, {}, orjson.dumps(answer))

    async def stream(self, url: str, body: bytes, headers: Mapping[str, str]) -> SlowStream:
        self.calls += 1
        if self.late:
            await asyncio.sleep(0.9)  # its headers within request_timeout_s (1 s)
        return SlowStream(self.stalled, self.late)

    async def aclose(self) -> None:
        pass


class SlowStream:
    """A chat stream of 12 chunks a quarter of a second apart: 3 s, each chunk in time;
    or, ``stalled``, one chunk and then nothing for 4 s."""

    status, headers = 200, {"content-type": "text/event-stream"}

    def __init__(self, stalled: bool = False, late: bool = False) -> None:
        self.stalled, self.late = stalled, late

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.late:  # its first chunk a lease (1.5 s) after admission, then 12 in time
            await asyncio.sleep(0.7)
        for _ in range(1 if self.stalled else 12):
            await asyncio.sleep(0.25)
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "x "}}]}\n\n'
        if self.stalled:
            await asyncio.sleep(4)
        usage = {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
        yield b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        pass


@contextlib.asynccontextmanager
async def serving(
    redis_url: str, name: str, upstream: Upstream, **config: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    args = GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [{"name": "m", "upstream": "u"}],
            "api_keys": [{"name": name, "key_sha256": hash_key(f"sk-{name}"), "tenant": name}],
            "store": {"url": redis_url},
            "cost": {"pricing": {"overrides": {"m": PRICE}}},
            "budgets": {"keys": {name: {"daily_usd": "100"}}},
            **config,
        }
    )
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": upstream}))
    async with in_process(gateway, f"sk-{name}") as client:
        yield gateway, client


async def _records(gateway: Gateway, name: str) -> list[Any]:
    ledger = gateway.stages.cost.ledger
    await ledger.flush()
    return [r for r in await ledger.records(0, 2**62) if r.key_id == name]


def _fresh(name: str) -> str:
    """A key of the test's own: quotas, budgets and records outlive a test in the store."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def _spent_and_held(gateway: Gateway, name: str) -> tuple[Decimal, Decimal]:
    await gateway.stages.cost._settles.drain()
    status = next(s for s in await gateway.stages.cost.guard.status(name, name))
    return status.spent, status.held


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
RESPONSE = {"model": "m", "input": "hi", "max_output_tokens": 1000}
STREAM = {**CHAT, "stream": True}
# One request in flight a key, its slot leased for 1.5 s (renewed while its stream moves).
ONE_SHORT_SLOT: dict[str, Any] = {
    "request_timeout_s": 1.0,
    "limits": {"max_parallel": {"per_key": {"default": 1}, "lease_s": 1.5}},
}


@pytest.mark.parametrize("usage", [False, {}, {"total_tokens": "505"}, {"prompt_tokens": None}])
@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/responses", RESPONSE)]
)
async def test_an_answer_without_usage_is_billed_what_it_wrote(
    redis_url: str, path: str, body: dict[str, Any], usage: bool | dict[str, Any]
) -> None:
    """As a stream without usage is: its text estimated, not zero completion tokens;
    a usage with no count in it is none."""
    name = _fresh("no-usage")
    async with serving(redis_url, name, Upstream(usage=usage)) as (gateway, client):
        answer = await client.post(path, json=body)
        assert answer.status_code == 200, answer.text
        (record,) = await _records(gateway, name)
        assert record.estimated and record.completion_tokens == estimate_text_tokens(TEXT)
        assert record.cost_pico > 500 * 2 * 10**6  # 500 tokens at 2 USD a million


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("/v1/chat/completions", {"choices": 5}),
        ("/v1/chat/completions", {"choices": [{"message": {"tool_calls": 1}}]}),
        ("/v1/responses", {"id": "resp_odd", "store": False, "output": 1}),
        ("/v1/responses", {"id": "resp_odd", "store": False, "output": [{"content": 7}]}),
    ],
)
async def test_an_odd_answer_without_usage_is_passed_on_and_billed(
    redis_url: str, path: str, answer: dict[str, Any]
) -> None:
    """The upstream was paid for it: the client gets it, the ledger its prompt."""
    name = _fresh("odd-answer")
    upstream = Upstream(usage=False, answer=answer)
    async with serving(redis_url, name, upstream) as (gateway, client):
        body = CHAT if path.endswith("completions") else RESPONSE
        passed = await client.post(path, json=body)
        assert passed.status_code == 200, passed.text
        assert passed.json() == answer
        (record,) = await _records(gateway, name)
        assert record.estimated and record.status == "ok" and record.prompt_tokens > 0


async def test_a_client_gone_while_its_request_is_admitted_takes_nothing_with_it(
    redis_url: str, redis_client: object
) -> None:
    """Serve cancels a request whose client left; its slot, quota and hold, taken by
    store writes that go on regardless, all come back."""
    limits = {
        "max_parallel": {"per_key": {"default": 1}},
        "per_key": {"default": [{"window": "1m", "tokens": 1500}]},  # one request's hold
        "lease_requests": 0,
    }
    name = _fresh("left-early")
    async with serving(redis_url, name, Upstream(), limits=limits) as (gateway, client):
        reserve = gateway.stages.cost.guard._reserve
        leaving = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        async with asyncio.timeout(5):
            while not reserve._pending:  # noqa: ASYNC110 - its hold is on its way
                await asyncio.sleep(0)
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        async with asyncio.timeout(5):
            while (await _spent_and_held(gateway, name))[1]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await gateway.stages.limiter.drain()
        answer = await client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200, answer.text  # its slot and its tokens came back


@pytest.mark.parametrize(
    ("path", "body", "slow"),
    [
        # a cacheable answer, not coalesced: the cache write runs in the request itself
        ("/v1/chat/completions", {**CHAT, "temperature": 0}, "remember"),
        ("/v1/responses", RESPONSE, "record_owner"),
    ],
)
async def test_a_client_gone_after_the_upstream_answered_is_billed_for_it(
    redis_url: str, path: str, body: dict[str, Any], slow: str
) -> None:
    upstream = Upstream()
    config = {"dedup": {"coalesce": "none"}}
    name = _fresh("left-late")
    async with serving(redis_url, name, upstream, **config) as (gateway, client):
        owner = gateway.pipeline if slow == "remember" else gateway.responses
        step, writing = getattr(owner, slow), asyncio.Event()

        async def slowly(*args: Any) -> Any:
            writing.set()
            await asyncio.sleep(5)
            return await step(*args)

        setattr(owner, slow, slowly)
        leaving = asyncio.create_task(client.post(path, json=body))
        await asyncio.wait_for(writing.wait(), 5)
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        assert upstream.calls == 1
        spent, held = await _spent_and_held(gateway, name)
        assert spent > 0 and held == 0  # the answer was made: paid for, not refunded
        (record,) = await _records(gateway, name)
        assert record.completion_tokens == 500 and record.cost_pico > 0


@pytest.mark.parametrize("held", ["slot", "budget"])
async def test_a_stream_longer_than_its_slot_and_hold_last_keeps_them(
    redis_url: str, held: str
) -> None:
    """A stream runs while its chunks come in time, past request_timeout_s: its
    max_parallel slot and budget hold (each lasting 1.5 s here) are renewed under it."""
    name = _fresh("long")
    config: dict[str, Any] = {"request_timeout_s": 1.0}
    if held == "slot":
        config["limits"] = {"max_parallel": {"per_key": {"default": 1}, "lease_s": 1.5}}
    else:  # the budget fits one request's hold, not two
        config["budgets"] = {"keys": {name: {"daily_usd": "0.0025"}}, "hold_ttl_s": 1.5}
    async with serving(redis_url, name, Upstream(), **config) as (_, client):
        streaming = asyncio.create_task(client.post("/v1/chat/completions", json=STREAM))
        await asyncio.sleep(2.2)  # past both lifetimes: the stream still runs
        assert not streaming.done()
        beside = await client.post("/v1/chat/completions", json=CHAT)
        assert beside.status_code == 429, beside.text
        code = "too_many_concurrent_requests" if held == "slot" else "insufficient_quota"
        assert beside.json()["error"]["code"] == code
        finished = await streaming
        assert finished.status_code == 200 and finished.text.endswith("data: [DONE]\n\n")
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_a_stream_that_passes_nothing_on_for_a_lifetime_is_renewed_no_more(
    redis_url: str,
) -> None:
    """Whatever holds a stream that stopped moving (a stall no read timeout ends here,
    a relay nobody reads) does not keep its slot for ever: it lapses as a dead
    replica's does, a lease after the last chunk."""
    name = _fresh("stalled")
    async with serving(redis_url, name, Upstream(stalled=True), **ONE_SHORT_SLOT) as (_, client):
        streaming = asyncio.create_task(client.post("/v1/chat/completions", json=STREAM))
        await asyncio.sleep(1.0)
        beside = await client.post("/v1/chat/completions", json=CHAT)
        assert beside.status_code == 429, beside.text  # still within its lease
        await asyncio.sleep(2.5)  # the last renewal (by 1.5 s) has lapsed
        beside = await client.post("/v1/chat/completions", json=CHAT)
        assert beside.status_code == 200, beside.text
        streaming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streaming


async def test_a_failure_to_bill_an_answered_request_still_gives_its_slot_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answered hook raising (a bug) must not strand the request's slot and hold."""
    name = _fresh("bill-fails")
    limits = {"max_parallel": {"per_key": {"default": 1}}}
    async with serving(redis_url, name, Upstream(usage=False), limits=limits) as (_, client):

        def broken(answer: Any) -> str:
            raise RuntimeError("a bug")

        monkeypatch.setattr("serve_app.completion.answer_text", broken)
        failed = await client.post("/v1/chat/completions", json=CHAT)
        assert failed.status_code == 500
        monkeypatch.undo()
        again = await client.post("/v1/chat/completions", json=CHAT)
        assert again.status_code == 200, again.text


async def test_a_stream_whose_first_chunk_comes_late_keeps_its_slot_once_it_flows(
    redis_url: str,
) -> None:
    """Before its first chunk a stream is bounded by its deadlines: its slot is renewed."""
    name = _fresh("late")
    async with serving(redis_url, name, Upstream(late=True), **ONE_SHORT_SLOT) as (_, client):
        streaming = asyncio.create_task(client.post("/v1/chat/completions", json=STREAM))
        await asyncio.sleep(3.5)  # chunks have come every 0.25 s since ~1.85 s
        assert not streaming.done()
        beside = await client.post("/v1/chat/completions", json=CHAT)
        assert beside.status_code == 429, beside.text
        assert (await streaming).status_code == 200


async def test_billing_that_fails_gives_the_budget_hold_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in pricing or the ledger after the ticket settled: the hold is released."""
    name = _fresh("charge-fails")
    async with serving(redis_url, name, Upstream()) as (gateway, client):

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in pricing")

        monkeypatch.setattr(gateway.stages.cost.meter, "charge", broken)
        failed = await client.post("/v1/chat/completions", json=CHAT)
        assert failed.status_code == 500
        _, held = await _spent_and_held(gateway, name)
        assert held == 0
