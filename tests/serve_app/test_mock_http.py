"""The mock provider over HTTP, on both of its surfaces: the lean standalone
server (real loopback sockets) and the Starlette app that runs inside Serve
(in process). The same cases hold for both; the framing cases are the lean
server's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from serve_app.embedded_store import free_port
from serve_app.mock_provider import Faults, MockBehaviour, MockProvider, create_app
from serve_app.mock_provider import server as lean
from tests.serve_app.e2e_calls import sse_chunks

CHAT = "/v1/chat/completions"
BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello mock"}]}


@pytest.fixture
async def lean_port() -> AsyncIterator[tuple[int, MockBehaviour]]:
    behaviour = MockBehaviour()
    port = free_port()
    server = await lean.start(MockProvider(behaviour), "127.0.0.1", port)
    async with server:
        yield port, behaviour


@pytest.fixture(params=["lean", "starlette"])
async def mock(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[httpx.AsyncClient, MockBehaviour]]:
    behaviour = MockBehaviour()
    if request.param == "starlette":
        transport = httpx.ASGITransport(app=create_app(behaviour))
        async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
            yield client, behaviour
        return
    port = free_port()
    server = await lean.start(MockProvider(behaviour), "127.0.0.1", port)
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield client, behaviour


async def test_a_chat_answer_is_counted_and_deterministic(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
) -> None:
    client, _ = mock
    first = await client.post(CHAT, json=BODY)
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    answer = first.json()
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["total_tokens"] == sum(
        answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )
    second = await client.post(CHAT, json=BODY)
    assert second.json() == answer | {"created": second.json()["created"]}
    stats = (await client.get("/_mock/stats")).json()
    assert stats["calls"] == 2
    assert stats["by_path"] == {CHAT: 2}


async def test_a_stream_ends_with_usage_and_done(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
) -> None:
    client, _ = mock
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    chunks = sse_chunks(response.text)
    whole = (await client.post(CHAT, json=BODY)).json()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/nowhere", b"{}", 404),
        ("GET", CHAT, b"", 405),
        ("POST", CHAT, b"{not json", 400),
        ("POST", CHAT, b"[1, 2]", 400),
        ("POST", "/_mock/faults", b'{"latency": {"fixed_ms": -1}}', 400),
    ],
)
async def test_bad_calls_get_an_error(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
    method: str,
    path: str,
    content: bytes,
    status: int,
) -> None:
    client, behaviour = mock
    response = await client.request(method, path, content=content)
    assert response.status_code == status
    assert response.json()["error"]["message"].startswith("mock: ")
    assert behaviour.stats.calls == 0


async def test_faults_set_over_http_apply_with_their_retry_after(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
) -> None:
    client, _ = mock
    faults = {"faults": {"*": {"error_rate": 1.0, "error_status": 429, "retry_after_s": 2}}}
    assert (await client.post("/_mock/faults", json=faults)).status_code == 200
    refused = await client.post(CHAT, json=BODY)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert (await client.post("/_mock/reset")).json() == {"reset": True}
    assert (await client.post(CHAT, json=BODY)).status_code == 200


async def test_a_chat_too_long_for_the_context_window_gets_openai_s_400(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
) -> None:
    client, behaviour = mock
    behaviour.config.faults["mock-gpt"] = Faults(context_tokens=20)
    assert (await client.post(CHAT, json=BODY)).status_code == 200  # a few tokens: it fits
    long = {**BODY, "messages": [{"role": "user", "content": "word " * 40}]}
    for body in (long, {**long, "stream": True}, {**BODY, "max_tokens": 30}):
        refused = await client.post(CHAT, json=body)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
        assert "maximum context length is 20 tokens" in error["message"]


async def test_a_fault_set_during_the_latency_applies_to_the_waiting_call(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
) -> None:
    client, behaviour = mock
    behaviour.config.latency.fixed_ms = 300
    admitted = asyncio.Event()
    record = behaviour.record
    behaviour.record = lambda *args: (record(*args), admitted.set())[0]  # type: ignore[method-assign]
    waiting = asyncio.create_task(client.post(CHAT, json=BODY))
    await asyncio.wait_for(admitted.wait(), timeout=5)  # counted: now in its wait
    behaviour.config.faults["*"] = Faults(error_rate=1.0, error_status=503)
    assert (await waiting).status_code == 503


# The lean server's own framing.


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)  # until the server closes
    writer.close()
    return data


def _post(body: bytes, *headers: str, path: str = CHAT) -> bytes:
    head = [f"POST {path} HTTP/1.1", "host: mock", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_pipelined_calls_are_answered_in_order(
    lean_port: tuple[int, MockBehaviour],
) -> None:
    port, behaviour = lean_port
    behaviour.config.faults["slow"] = Faults(hang_s=0.2)
    slow = orjson.dumps({**BODY, "model": "slow"})
    fast = orjson.dumps(BODY)
    data = await _exchange(port, _post(slow) + _post(fast, "connection: close"))
    first, second = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b'"model":"slow"' in first and b'"model":"mock-gpt"' in second
    assert b"connection: close" in second


async def test_many_pipelined_calls_behind_a_slow_one_are_all_answered_in_order(
    lean_port: tuple[int, MockBehaviour],
) -> None:
    # More than the server holds before it pauses reading, then one more call once the slow
    # one is answered: reading must have resumed for that one to be answered at all.
    port, behaviour = lean_port
    behaviour.config.faults["slow"] = Faults(hang_s=0.2)
    held = [f"m{i}" for i in range(2 * lean._QUEUE_LIMIT)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(_post(orjson.dumps({**BODY, "model": m})) for m in ["slow", *held]))
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    writer.write(_post(orjson.dumps({**BODY, "model": "last"}), "connection: close"))
    data = first + await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    answers = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    models = [orjson.loads(a.split(b"\r\n\r\n", 1)[1])["model"] for a in answers]
    assert models == ["slow", *held, "last"]


async def test_one_write_per_whole_answer_and_keep_alive(
    lean_port: tuple[int, MockBehaviour],
) -> None:
    port, _ = lean_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # the same connection twice
        writer.write(_post(orjson.dumps(BODY)))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" not in head
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        assert orjson.loads(await reader.readexactly(length))["object"] == "chat.completion"
    writer.close()


async def test_malformed_http_gets_a_400_and_the_connection_closes(
    lean_port: tuple[int, MockBehaviour],
) -> None:
    port, _ = lean_port
    data = await _exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in data


async def test_a_body_over_the_limit_gets_a_413(
    lean_port: tuple[int, MockBehaviour], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, behaviour = lean_port
    monkeypatch.setattr(lean, "MAX_BODY", 64)
    data = await _exchange(port, _post(b"x" * 65))
    assert data.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert behaviour.stats.calls == 0


async def test_expect_100_continue_is_answered_before_the_body(
    lean_port: tuple[int, MockBehaviour],
) -> None:
    port, _ = lean_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = orjson.dumps(BODY)
    head = _post(body, "expect: 100-continue", "connection: close")[: -len(body)]
    writer.write(head)
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    assert (await asyncio.wait_for(reader.read(), timeout=5)).startswith(b"HTTP/1.1 200 OK")
    writer.close()


async def test_a_cut_stream_ends_without_its_last_chunk(
    lean_port: tuple[int, MockBehaviour],
) -> None:
    port, behaviour = lean_port
    behaviour.config.faults["*"] = Faults(cut_stream_after=2)
    data = await _exchange(port, _post(orjson.dumps({**BODY, "stream": True})))
    assert b"transfer-encoding: chunked" in data
    assert data.count(b"data: {") == 3  # the role chunk and two words
    assert not data.endswith(b"0\r\n\r\n")


async def test_a_failing_answer_is_a_500_and_the_connection_goes_on(
    lean_port: tuple[int, MockBehaviour], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, behaviour = lean_port

    def broken(body: object) -> list[str]:
        raise RuntimeError("a bug in the mock")

    monkeypatch.setattr(behaviour, "answer_words", broken)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        failed = await client.post(CHAT, json=BODY)
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "mock_500"
        monkeypatch.undo()
        assert (await client.post(CHAT, json=BODY)).status_code == 200


RESPONSES = "/v1/responses"


def _response_events(text: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in text.strip().split("\n\n"):
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        events.append((kind[7:], orjson.loads(data[6:])))
    return events


async def test_responses_are_stored_continued_listed_and_deleted(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
) -> None:
    client, _ = mock
    body = {"model": "mock-gpt", "input": "hello mock", "max_output_tokens": 4}
    first = (await client.post(RESPONSES, json=body)).json()
    assert first["object"] == "response" and first["status"] == "completed"
    assert len(first["output"][0]["content"][0]["text"].split()) == 4
    usage = first["usage"]
    assert usage["output_tokens"] == 4
    assert usage["total_tokens"] == usage["input_tokens"] + 4

    # A continuation carries the conversation's tokens, as an upstream bills them.
    follow = {**body, "input": "and then?", "previous_response_id": first["id"]}
    second = (await client.post(RESPONSES, json=follow)).json()
    assert second["usage"]["input_tokens"] > usage["total_tokens"]
    assert second["previous_response_id"] == first["id"]

    got = await client.get(f"{RESPONSES}/{first['id']}")
    assert got.status_code == 200 and got.json() == first
    items = (await client.get(f"{RESPONSES}/{first['id']}/input_items")).json()
    assert [i["content"][0]["text"] for i in items["data"]] == ["hello mock"]

    deleted = await client.delete(f"{RESPONSES}/{first['id']}")
    assert deleted.json() == {"id": first["id"], "object": "response.deleted", "deleted": True}
    assert (await client.get(f"{RESPONSES}/{first['id']}")).status_code == 404
    gone = await client.post(RESPONSES, json=follow)
    assert gone.status_code == 400
    assert gone.json()["error"]["code"] == "previous_response_not_found"

    unstored = (await client.post(RESPONSES, json={**body, "store": False})).json()
    assert (await client.get(f"{RESPONSES}/{unstored['id']}")).status_code == 404


async def test_a_streamed_response_is_typed_events_ending_completed(
    mock: tuple[httpx.AsyncClient, MockBehaviour],
) -> None:
    client, _ = mock
    body = {"model": "mock-gpt", "input": "stream me", "stream": True}
    streamed = await client.post(RESPONSES, json=body)
    events = _response_events(streamed.text)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "data: [DONE]" not in streamed.text
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert all(kind == e["type"] for kind, e in events)
    final = events[-1][1]["response"]
    deltas = "".join(e["delta"] for kind, e in events if kind == "response.output_text.delta")
    assert deltas == final["output"][0]["content"][0]["text"]
    assert (await client.get(f"{RESPONSES}/{final['id']}")).json() == final


async def test_a_cut_response_stream_stops_before_completed(
    lean_port: tuple[int, MockBehaviour],
) -> None:
    port, behaviour = lean_port
    behaviour.config.faults["*"] = Faults(cut_stream_after=2)
    body = {"model": "mock-gpt", "input": "stream me", "stream": True}
    data = await _exchange(port, _post(orjson.dumps(body), path=RESPONSES))
    assert data.count(b"event: response.output_text.delta") == 2
    assert b"response.completed" not in data
    assert not data.endswith(b"0\r\n\r\n")
