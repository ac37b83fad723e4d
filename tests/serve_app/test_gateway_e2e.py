"""The serving path end to end: real HTTP into a real local Ray Serve app with
two gateway replicas, the mock provider as upstream, a real Redis."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable, Iterator

import httpx
import openai
import orjson
import pytest

from serve_app.embedded_store import EmbeddedStore
from serve_app.mock_provider import Faults, MockBehaviour
from tests.support import (
    LOCAL_KEY,
    OTHER_KEY,
    MockServer,
    auth,
    chat_body,
    client,
    deploy_gateway,
    gateway_args,
    wait_until,
)

pytestmark = [pytest.mark.ray, pytest.mark.integration]


@pytest.fixture(scope="module")
def base_url(serve_port: int, mock_server: MockServer, redis_url: str) -> Iterator[str]:
    deploy_gateway(gateway_args(mock_server.base_url, redis_url), "e2e", "/e2e")
    yield f"http://127.0.0.1:{serve_port}/e2e"
    from ray import serve

    serve.delete("e2e")


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with client(base_url) as c:
        yield c


@pytest.fixture
def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=LOCAL_KEY, max_retries=0)


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"]
    return error


def test_non_streaming_answer(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    response = http.post("/v1/chat/completions", json=chat_body("ping"), headers=auth())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0
    assert response.headers["x-request-id"]
    assert mock_behaviour.stats.calls == 1


def test_request_id_is_echoed(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    headers = {**auth(), "x-request-id": "trace-123"}
    response = http.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert response.headers.get_list("x-request-id") == ["trace-123"]


def _sse_payloads(text: str) -> list[bytes]:
    return [line[6:].encode() for line in text.splitlines() if line.startswith("data: ")]


def test_streaming_answer_ends_with_done(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    response = http.post(
        "/v1/chat/completions", json=chat_body("stream me", stream=True), headers=auth()
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = _sse_payloads(response.text)
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # The client did not ask for usage: the gateway's own usage chunk is not shown.
    assert not any(c.get("usage") for c in chunks)


def test_streaming_usage_chunk_when_asked(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    body = chat_body("usage please", stream=True, stream_options={"include_usage": True})
    response = http.post("/v1/chat/completions", json=body, headers=auth())
    chunks = [orjson.loads(p) for p in _sse_payloads(response.text)[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] > 0


def test_openai_sdk_chat_stream_and_models(
    sdk: openai.OpenAI, mock_behaviour: MockBehaviour
) -> None:
    completion = sdk.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "sdk"}]
    )
    text = completion.choices[0].message.content
    assert text
    stream = sdk.chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "sdk"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == text  # same request, same deterministic answer
    assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens
    assert {m.id for m in sdk.models.list()} == {"mock-gpt", "mock-embed", "dead-gpt"}
    assert sdk.models.retrieve("mock-embed").id == "mock-embed"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


def test_openai_sdk_legacy_completions(sdk: openai.OpenAI, mock_behaviour: MockBehaviour) -> None:
    """``/v1/completions`` through Ray and the SDK: answered by the upstream's own
    completions route, streamed as ``text_completion`` chunks with the same text."""
    completion = sdk.completions.create(model="mock-gpt", prompt="Once upon a time", max_tokens=12)
    assert completion.object == "text_completion"
    text = completion.choices[0].text
    assert text and completion.usage is not None and completion.usage.completion_tokens > 0
    assert mock_behaviour.stats.by_path["/v1/completions"] == 1
    stream = sdk.completions.create(
        model="mock-gpt",
        prompt="Once upon a time",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        parts.extend(choice.text for choice in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(parts) == text  # same prompt, same deterministic answer
    assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):  # an embeddings model writes no text
        sdk.completions.create(model="mock-embed", prompt="x")


def test_openai_sdk_responses(sdk: openai.OpenAI, mock_behaviour: MockBehaviour) -> None:
    """``/v1/responses`` through Ray and the SDK: made, continued, streamed as typed
    events, read back and deleted; another tenant's key cannot see it."""
    first = sdk.responses.create(model="mock-gpt", input="Name a city.", max_output_tokens=8)
    assert first.status == "completed" and first.output_text
    assert first.usage is not None and first.usage.output_tokens == 8
    second = sdk.responses.create(model="mock-gpt", input="Another?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    with sdk.responses.stream(
        model="mock-gpt", input="Name a city.", max_output_tokens=8
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == first.output_text  # deterministic answer
    assert sdk.responses.retrieve(first.id).id == first.id
    other = openai.OpenAI(base_url=str(sdk.base_url), api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(first.id)
    assert mock_behaviour.stats.by_path["/v1/responses"] == 3


def test_openai_sdk_exceptions(
    base_url: str, sdk: openai.OpenAI, mock_behaviour: MockBehaviour
) -> None:
    messages = [{"role": "user", "content": "x"}]
    bad_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="mock-gpt", messages=messages)
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.chat.completions.create(model="no-such-model", messages=messages)
    assert not_found.value.code == "model_not_found"
    mock_behaviour.config.faults["*"] = Faults(error_rate=1.0, error_status=429, retry_after_s=3)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(model="mock-gpt", messages=messages)
    assert limited.value.response.headers["retry-after"] == "3"


def test_embeddings(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    body = {"model": "mock-embed", "input": ["a", "b"]}
    response = http.post("/v1/embeddings", json=body, headers=auth())
    assert response.status_code == 200
    assert len(response.json()["data"]) == 2


def test_embeddings_are_served_from_the_exact_cache(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    text = f"embed me {uuid.uuid4().hex}"
    body = {"model": "mock-embed", "input": [text]}  # deterministic: cached by default
    first = http.post("/v1/embeddings", json=body, headers=auth())
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS", first.text
    calls = mock_behaviour.stats.calls
    again = http.post("/v1/embeddings", json=body, headers=auth())
    assert again.status_code == 200 and again.headers["x-cache"] == "HIT"
    assert again.headers["x-cache-key"] == first.headers["x-cache-key"] and "age" in again.headers
    assert again.json() == first.json() and mock_behaviour.stats.calls == calls
    other = http.post("/v1/embeddings", json={**body, "dimensions": 8}, headers=auth())
    assert other.headers["x-cache"] == "MISS"  # another question, another answer
    fresh = http.post("/v1/embeddings", json={**body, "cache": {"no-cache": True}}, headers=auth())
    assert fresh.headers["x-cache"] == "BYPASS" and mock_behaviour.stats.calls == calls + 2
    assert "cache" not in orjson.loads(mock_behaviour.last_body)  # the gateway's own field


@pytest.mark.parametrize(
    ("content", "headers", "status", "code", "param"),
    [
        (b"{not json", auth(), 400, None, None),
        (b"[1, 2]", auth(), 400, None, None),
        (orjson.dumps({"model": "mock-gpt"}), auth(), 400, None, "messages"),
        (orjson.dumps(chat_body(temperature=9)), auth(), 400, None, "temperature"),
        (orjson.dumps({**chat_body(), "stream": "yes"}), auth(), 400, None, "stream"),
        (
            orjson.dumps({"model": "mock-gpt", "messages": [{"role": "robot"}]}),
            auth(),
            400,
            None,
            "messages.0.role",
        ),
        (orjson.dumps(chat_body()), {}, 401, "missing_api_key", None),
        (orjson.dumps(chat_body()), auth("sk-nope"), 401, "invalid_api_key", None),
        (orjson.dumps(chat_body()), {"authorization": "Basic abc"}, 401, None, None),
        (orjson.dumps({**chat_body(), "model": "gpt-9"}), auth(), 404, "model_not_found", "model"),
        (orjson.dumps({**chat_body(), "model": "mock-embed"}), auth(), 400, None, "model"),
    ],
)
def test_bad_input_gets_an_envelope(
    http: httpx.Client,
    mock_behaviour: MockBehaviour,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    response = http.post("/v1/chat/completions", content=content, headers=headers)
    error = assert_envelope(response, status, code)
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
        assert param in error["message"]
    assert mock_behaviour.stats.calls == 0
    # The replica survived: the next good request still succeeds.
    ok = http.post("/v1/chat/completions", json=chat_body(), headers=auth())
    assert ok.status_code == 200


def test_body_over_limit_is_413(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    big = chat_body("x" * 70_000)
    assert_envelope(http.post("/v1/chat/completions", json=big, headers=auth()), 413)
    assert http.post("/v1/chat/completions", json=chat_body(), headers=auth()).status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_envelope(http.get("/v1/nothing-here", headers=auth()), 404)
    assert_envelope(http.get("/v1/chat/completions", headers=auth()), 405)


def test_upstream_error_body_passed_on(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    mock_behaviour.config.faults["*"] = Faults(error_rate=1.0, error_status=503)
    response = http.post("/v1/chat/completions", json=chat_body(), headers=auth())
    assert_envelope(response, 503, "mock_503")


def test_upstream_malformed_body_is_502(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    mock_behaviour.config.faults["*"] = Faults(malformed_rate=1.0)
    response = http.post("/v1/chat/completions", json=chat_body(), headers=auth())
    assert_envelope(response, 502, "upstream_malformed_response")


def test_upstream_unreachable_is_502(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", json={**chat_body(), "model": "dead-gpt"}, headers=auth()
    )
    assert_envelope(response, 502, "upstream_unreachable")


def test_upstream_timeout_is_504(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    mock_behaviour.config.faults["*"] = Faults(hang_s=3.0)  # the test profile reads for 2 s
    response = http.post("/v1/chat/completions", json=chat_body(), headers=auth())
    assert_envelope(response, 504, "upstream_timeout")
    mock_behaviour.config.faults.clear()
    assert http.post("/v1/chat/completions", json=chat_body(), headers=auth()).status_code == 200


def test_stream_cut_midway_reports_an_error_event(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.faults["*"] = Faults(cut_stream_after=2)
    response = http.post("/v1/chat/completions", json=chat_body(stream=True), headers=auth())
    payloads = _sse_payloads(response.text)
    assert payloads[-1] != b"[DONE]"
    assert "error" in orjson.loads(payloads[-1])


def test_two_streams_at_once(base_url: str, mock_behaviour: MockBehaviour) -> None:
    mock_behaviour.config.latency.per_token_ms = 20

    def run(content: str) -> list[bytes]:
        with client(base_url) as c:
            r = c.post("/v1/chat/completions", json=chat_body(content, stream=True), headers=auth())
            return _sse_payloads(r.text)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, second = pool.map(run, ["first stream", "second stream"])
    assert first[-1] == second[-1] == b"[DONE]"
    assert first[1:-1] != second[1:-1]


def test_a_key_created_at_run_time_works_on_every_replica_until_revoked(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    name = f"team-{uuid.uuid4().hex[:8]}"
    made = http.post("/admin/keys", json={"name": name, "tenant": "runtime"}, headers=auth())
    assert made.status_code == 201, made.text
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=made.json()["key"], max_retries=0)

    def ask() -> None:
        sdk.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "who am I?"}]
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # both replicas answer it
        list(pool.map(lambda _: ask(), range(16)))
    revoked = http.delete(f"/admin/keys/{name}", headers=auth())
    assert revoked.status_code == 200, revoked.text

    def refused_everywhere() -> bool:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda _: _refused(ask), range(16)))
        return all(outcomes)

    # Announced: well within the 5 s a replica remembers a key. (Before the store test
    # below: a replica that missed the announcement while resubscribing may take those 5 s.)
    wait_until(refused_everywhere, timeout_s=3)


def _refused(call: Callable[[], None]) -> bool:
    try:
        call()
    except openai.AuthenticationError:
        return True
    return False


def test_readiness_follows_the_store(
    http: httpx.Client, embedded_store: EmbeddedStore | None
) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    if embedded_store is None:
        pytest.skip("REDIS_URL points at an external Redis this test must not kill")
    embedded_store.kill()
    try:
        assert_envelope(http.get("/readyz"), 503, "store_unavailable")
        assert http.get("/healthz").status_code == 200
    finally:
        embedded_store.start()
    wait_until(lambda: http.get("/readyz").status_code == 200, timeout_s=10)
