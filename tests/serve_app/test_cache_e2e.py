"""Issue 4 end to end (exact tier and single flight; the semantic tier is not
deployed here): real HTTP into a real local Ray Serve app with two gateway
replicas, the mock provider as upstream, a real Redis."""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

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

APP = "cache-e2e"
CHAT = "/v1/chat/completions"
CROWD = 20


@pytest.fixture(scope="module")
def base_url(serve_port: int, mock_server: MockServer, redis_url: str) -> Iterator[str]:
    # Cache entries of earlier modules must not answer for this one.
    redis.Redis.from_url(redis_url).flushdb()
    deploy_gateway(gateway_args(mock_server.base_url, redis_url), APP, f"/{APP}")
    yield f"http://127.0.0.1:{serve_port}/{APP}"
    from ray import serve

    serve.delete(APP)


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with client(base_url) as c:
        yield c


def fresh(label: str) -> str:
    """A prompt no other test (or earlier run) has cached."""
    return f"{label} {uuid.uuid4().hex[:12]}"


def greedy(content: str, **extra: Any) -> dict[str, Any]:
    """A cacheable request: temperature 0 (a missing temperature counts as sampled)."""
    return chat_body(content, temperature=0, **extra)


def sse_payloads(text: str) -> list[bytes]:
    return [line[6:].encode() for line in text.splitlines() if line.startswith("data: ")]


def streamed_text(payloads: list[bytes]) -> str:
    chunks = [orjson.loads(p) for p in payloads if p != b"[DONE]"]
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for chunk in chunks
        for choice in chunk.get("choices") or []
    )


def all_at_once(base_url: str, count: int, send: Callable[[httpx.Client], httpx.Response]) -> list:
    """``count`` requests released together (a barrier), each on its own connection."""
    barrier = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        with client(base_url) as c:
            barrier.wait()
            response = send(c)
            response.read()
            return response

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_identical_concurrent_requests_share_one_upstream_call(
    base_url: str, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.latency.fixed_ms = 800  # every request arrives while the leader waits
    body = greedy(fresh("coalesce me"))
    responses = all_at_once(base_url, CROWD, lambda c: c.post(CHAT, json=body, headers=auth()))
    assert [r.status_code for r in responses] == [200] * CROWD
    assert mock_behaviour.stats.calls == 1
    assert len({r.content for r in responses}) == 1
    roles = sorted(r.headers["x-dedup"] for r in responses)
    assert roles == ["FOLLOWER"] * (CROWD - 1) + ["LEADER"]
    assert {r.headers["x-cache"] for r in responses} == {"MISS"}
    assert len({r.headers["x-cache-key"] for r in responses}) == 1


def test_identical_concurrent_embeddings_share_one_upstream_call(
    base_url: str, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.latency.fixed_ms = 800
    body = {"model": "mock-embed", "input": [f"embed {uuid.uuid4().hex}"]}
    responses = all_at_once(
        base_url, CROWD, lambda c: c.post("/v1/embeddings", json=body, headers=auth())
    )
    assert [r.status_code for r in responses] == [200] * CROWD
    assert mock_behaviour.stats.calls == 1 and len({r.content for r in responses}) == 1
    roles = sorted(r.headers["x-dedup"] for r in responses)
    assert roles == ["FOLLOWER"] * (CROWD - 1) + ["LEADER"]
    with client(base_url) as c:
        again = c.post("/v1/embeddings", json=body, headers=auth())
    assert again.headers["x-cache"] == "HIT" and mock_behaviour.stats.calls == 1


def test_identical_concurrent_streams_share_one_upstream_call(
    base_url: str, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.latency.fixed_ms = 800
    mock_behaviour.config.latency.per_token_ms = 20
    body = greedy(fresh("coalesce my stream"), stream=True)
    responses = all_at_once(base_url, CROWD, lambda c: c.post(CHAT, json=body, headers=auth()))
    assert [r.status_code for r in responses] == [200] * CROWD
    assert mock_behaviour.stats.calls == 1
    streams = [sse_payloads(r.text) for r in responses]
    assert all(s[-1] == b"[DONE]" for s in streams)
    assert all(s == streams[0] for s in streams)  # every joiner got the stream from its start
    assert streamed_text(streams[0])
    roles = sorted(r.headers["x-dedup"] for r in responses)
    assert roles == ["FOLLOWER"] * (CROWD - 1) + ["LEADER"]


def test_repeat_is_a_hit_without_an_upstream_call(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    body = greedy(fresh("remember me"))
    first = http.post(CHAT, json=body, headers=auth())
    assert first.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    assert "age" not in first.headers
    again = http.post(CHAT, json=body, headers=auth())
    assert again.status_code == 200
    assert again.headers["x-cache"] == "HIT"
    assert again.headers["x-cache-key"] == first.headers["x-cache-key"]
    assert int(again.headers["age"]) >= 0
    assert "x-dedup" not in again.headers
    assert again.content == first.content
    assert mock_behaviour.stats.calls == 1


def test_streaming_request_for_a_cached_answer_replays_sse(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    content = fresh("replay me")
    answer = http.post(CHAT, json=greedy(content), headers=auth()).json()
    body = greedy(content, stream=True, stream_options={"include_usage": True})
    response = http.post(CHAT, json=body, headers=auth())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-cache"] == "HIT"
    payloads = sse_payloads(response.text)
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert streamed_text(payloads) == answer["choices"][0]["message"]["content"]
    replayed = chunks[-1]["usage"]
    assert {k: replayed[k] for k in answer["usage"]} == answer["usage"]
    assert float(replayed["cost"]) == 0  # a hit costs nothing upstream
    assert "x-request-cost" in response.headers
    assert mock_behaviour.stats.calls == 1


def test_completed_stream_is_cached_for_both_shapes(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    content = fresh("stream then ask")
    streamed = http.post(CHAT, json=greedy(content, stream=True), headers=auth())
    assert sse_payloads(streamed.text)[-1] == b"[DONE]"
    wait_until(
        lambda: http.post(CHAT, json=greedy(content), headers=auth()).headers["x-cache"] == "HIT"
    )
    answer = http.post(CHAT, json=greedy(content), headers=auth()).json()
    assert answer["choices"][0]["message"]["content"] == streamed_text(sse_payloads(streamed.text))
    assert mock_behaviour.stats.calls == 1


def test_sampled_request_without_opt_in_is_not_cached(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    body = chat_body(fresh("sample me"), temperature=0.7)
    first = http.post(CHAT, json=body, headers=auth())
    second = http.post(CHAT, json=body, headers=auth())
    for response in (first, second):
        assert response.status_code == 200
        assert response.headers["x-cache"] == "BYPASS"
        assert "x-dedup" not in response.headers  # not cacheable: not coalesced either
    assert mock_behaviour.stats.calls == 2
    # A missing temperature is the provider's default (1): sampled too.
    unset = chat_body(fresh("no temperature"))
    assert http.post(CHAT, json=unset, headers=auth()).headers["x-cache"] == "BYPASS"
    assert http.post(CHAT, json=unset, headers=auth()).headers["x-cache"] == "BYPASS"
    assert mock_behaviour.stats.calls == 4


def test_sampled_request_that_opts_in_is_cached(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    body = chat_body(fresh("sample me once"), temperature=0.7, cache={"ttl": 60})
    assert http.post(CHAT, json=body, headers=auth()).headers["x-cache"] == "MISS"
    assert http.post(CHAT, json=body, headers=auth()).headers["x-cache"] == "HIT"
    assert mock_behaviour.stats.calls == 1


def test_no_store_keeps_the_answer_out(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    content = fresh("forget me")
    for _ in range(2):
        response = http.post(CHAT, json=greedy(content, cache={"no-store": True}), headers=auth())
        assert response.status_code == 200
        assert response.headers["x-cache"] == "MISS"
    assert mock_behaviour.stats.calls == 2
    # Nothing was stored: a plain request still goes upstream.
    assert http.post(CHAT, json=greedy(content), headers=auth()).headers["x-cache"] == "MISS"
    assert mock_behaviour.stats.calls == 3
    headers = {**auth(), "cache-control": "no-store"}
    fresh_content = fresh("forget me by header")
    http.post(CHAT, json=greedy(fresh_content), headers=headers)
    assert http.post(CHAT, json=greedy(fresh_content), headers=auth()).headers["x-cache"] == "MISS"
    assert mock_behaviour.stats.calls == 5


def test_no_cache_skips_the_entry_but_refreshes_it(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    body = greedy(fresh("revalidate me"))
    http.post(CHAT, json=body, headers=auth())
    assert http.post(CHAT, json=body, headers=auth()).headers["x-cache"] == "HIT"
    assert mock_behaviour.stats.calls == 1
    skipped = http.post(CHAT, json=body, headers={**auth(), "cache-control": "no-cache"})
    assert skipped.status_code == 200
    assert skipped.headers["x-cache"] == "BYPASS"
    assert mock_behaviour.stats.calls == 2
    in_body = http.post(CHAT, json={**body, "cache": {"no-cache": True}}, headers=auth())
    assert in_body.headers["x-cache"] == "BYPASS"
    assert mock_behaviour.stats.calls == 3
    # The refreshed entry serves the next plain request, and it is young.
    hit = http.post(CHAT, json=body, headers=auth())
    assert hit.headers["x-cache"] == "HIT"
    assert int(hit.headers["age"]) <= 1
    assert mock_behaviour.stats.calls == 3


def test_tenants_never_share_an_entry(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    body = greedy(fresh("same question, two tenants"))
    mine = http.post(CHAT, json=body, headers=auth(LOCAL_KEY))
    theirs = http.post(CHAT, json=body, headers=auth(OTHER_KEY))
    assert mine.headers["x-cache"] == theirs.headers["x-cache"] == "MISS"
    assert mine.headers["x-cache-key"] != theirs.headers["x-cache-key"]
    assert mock_behaviour.stats.calls == 2
    for key, first in ((LOCAL_KEY, mine), (OTHER_KEY, theirs)):
        again = http.post(CHAT, json=body, headers=auth(key))
        assert again.headers["x-cache"] == "HIT"
        assert again.headers["x-cache-key"] == first.headers["x-cache-key"]
    assert mock_behaviour.stats.calls == 2


def test_concurrent_requests_of_two_tenants_do_not_coalesce(
    base_url: str, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.latency.fixed_ms = 500
    body = greedy(fresh("two tenants at once"))
    keys = [LOCAL_KEY, OTHER_KEY] * 3
    barrier = threading.Barrier(len(keys))

    def one(key: str) -> httpx.Response:
        with client(base_url) as c:
            barrier.wait()
            return c.post(CHAT, json=body, headers=auth(key))

    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        responses = list(pool.map(one, keys))
    assert all(r.status_code == 200 for r in responses)
    assert mock_behaviour.stats.calls == 2
    leaders = [r for r in responses if r.headers.get("x-dedup") == "LEADER"]
    assert len(leaders) == 2
    assert len({r.headers["x-cache-key"] for r in leaders}) == 2


def test_upstream_error_is_never_cached(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    body = greedy(fresh("fail then work"))
    mock_behaviour.config.faults["mock-gpt"] = Faults(error_rate=1.0, error_status=500)
    failed = http.post(CHAT, json=body, headers=auth())
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "mock_500"
    mock_behaviour.config.faults.clear()
    ok = http.post(CHAT, json=body, headers=auth())
    assert ok.status_code == 200
    assert ok.headers["x-cache"] == "MISS"
    assert mock_behaviour.stats.calls == 2
    assert http.post(CHAT, json=body, headers=auth()).headers["x-cache"] == "HIT"
    assert mock_behaviour.stats.calls == 2


def test_malformed_upstream_answer_is_never_cached(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    body = greedy(fresh("garbled then fine"))
    mock_behaviour.config.faults["mock-gpt"] = Faults(malformed_rate=1.0)
    assert http.post(CHAT, json=body, headers=auth()).status_code == 502
    mock_behaviour.config.faults.clear()
    ok = http.post(CHAT, json=body, headers=auth())
    assert ok.status_code == 200
    assert ok.headers["x-cache"] == "MISS"
    assert mock_behaviour.stats.calls == 2


def test_cut_stream_is_never_cached(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    content = fresh("cut me off")
    mock_behaviour.config.faults["mock-gpt"] = Faults(cut_stream_after=2)
    cut = http.post(CHAT, json=greedy(content, stream=True), headers=auth())
    payloads = sse_payloads(cut.text)
    assert payloads[-1] != b"[DONE]"
    assert "error" in orjson.loads(payloads[-1])
    mock_behaviour.config.faults.clear()
    # Neither shape may be served the broken answer.
    plain = http.post(CHAT, json=greedy(content), headers=auth())
    assert plain.headers["x-cache"] == "MISS"
    assert mock_behaviour.stats.calls == 2
    streamed = http.post(CHAT, json=greedy(content, stream=True), headers=auth())
    assert streamed.headers["x-cache"] == "HIT"  # the complete answer the plain request stored
    assert sse_payloads(streamed.text)[-1] == b"[DONE]"
    assert (
        streamed_text(sse_payloads(streamed.text))
        == plain.json()["choices"][0]["message"]["content"]
    )
    assert mock_behaviour.stats.calls == 2


def test_cut_stream_is_not_stored_by_a_later_stream(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    content = fresh("cut my stream, then stream again")
    mock_behaviour.config.faults["mock-gpt"] = Faults(cut_stream_after=1)
    cut = http.post(CHAT, json=greedy(content, stream=True), headers=auth())
    assert sse_payloads(cut.text)[-1] != b"[DONE]"
    mock_behaviour.config.faults.clear()
    again = http.post(CHAT, json=greedy(content, stream=True), headers=auth())
    assert again.headers["x-cache"] == "MISS"
    assert sse_payloads(again.text)[-1] == b"[DONE]"
    assert mock_behaviour.stats.calls == 2


def test_admin_cache_routes_need_the_admin_key(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    for method, path in (
        ("GET", "/admin/cache/stats"),
        ("DELETE", "/admin/cache?namespace=t/local"),
        ("POST", "/admin/cache/flush"),
    ):
        assert http.request(method, path).status_code == 401
        denied = http.request(method, path, headers=auth(OTHER_KEY))
        assert denied.status_code == 403, (method, path, denied.text)
        assert denied.json()["error"]["type"]


def test_admin_cache_stats_delete_and_flush(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    mine, theirs = greedy(fresh("admin mine")), greedy(fresh("admin theirs"))
    http.post(CHAT, json=mine, headers=auth(LOCAL_KEY))
    http.post(CHAT, json=theirs, headers=auth(OTHER_KEY))
    assert http.post(CHAT, json=mine, headers=auth(LOCAL_KEY)).headers["x-cache"] == "HIT"

    stats = http.get("/admin/cache/stats", params={"namespace": "t/local"}, headers=auth())
    assert stats.status_code == 200
    local = stats.json()
    assert local["entries"] >= 1 and local["hits"] >= 1 and local["stores"] >= 1
    overall = http.get("/admin/cache/stats", headers=auth()).json()
    assert overall["entries"] >= local["entries"] + 1  # the other tenant's entry too

    deleted = http.delete("/admin/cache", params={"namespace": "t/local"}, headers=auth())
    assert deleted.status_code == 200
    assert deleted.json()["deleted"] >= 1
    assert http.post(CHAT, json=mine, headers=auth(LOCAL_KEY)).headers["x-cache"] == "MISS"
    # Another tenant's namespace was left alone.
    assert http.post(CHAT, json=theirs, headers=auth(OTHER_KEY)).headers["x-cache"] == "HIT"

    flushed = http.post("/admin/cache/flush", headers=auth())
    assert flushed.status_code == 200
    assert flushed.json()["deleted"] >= 2
    assert http.post(CHAT, json=theirs, headers=auth(OTHER_KEY)).headers["x-cache"] == "MISS"
    assert http.get("/admin/cache/stats", headers=auth()).json()["entries"] == 1


def test_admin_delete_by_key(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    body = greedy(fresh("delete exactly me"))
    key = http.post(CHAT, json=body, headers=auth()).headers["x-cache-key"]
    params = {"namespace": "t/local", "key": key}
    assert http.delete("/admin/cache", params=params, headers=auth()).json() == {"deleted": 1}
    assert http.post(CHAT, json=body, headers=auth()).headers["x-cache"] == "MISS"
    assert mock_behaviour.stats.calls == 2


def test_redis_down_degrades_to_a_miss(
    http: httpx.Client, mock_behaviour: MockBehaviour, embedded_store: EmbeddedStore | None
) -> None:
    if embedded_store is None:
        pytest.skip("REDIS_URL points at an external Redis this test must not kill")
    body = greedy(fresh("cached before the outage"))
    http.post(CHAT, json=body, headers=auth())
    embedded_store.kill()
    try:
        for stream in (False, True):
            response = http.post(CHAT, json={**body, "stream": stream}, headers=auth())
            assert response.status_code == 200, response.text
            assert response.headers["x-cache"] == "MISS"
            if stream:
                assert sse_payloads(response.text)[-1] == b"[DONE]"
            else:
                assert response.json()["choices"][0]["message"]["content"]
        assert mock_behaviour.stats.calls == 3
    finally:
        embedded_store.start()
    wait_until(lambda: http.get("/readyz").status_code == 200, timeout_s=15)
    # Back to normal (the server may have lost its last second of writes).
    after = greedy(fresh("after the outage"))

    def cached_again() -> bool:
        http.post(CHAT, json=after, headers=auth())
        return http.post(CHAT, json=after, headers=auth()).headers["x-cache"] == "HIT"

    wait_until(cached_again, timeout_s=10)
