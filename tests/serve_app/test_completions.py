"""``/v1/completions`` in process (no Ray) against the mock upstream and a real
store: answers, streams, the exact cache and single flight, quotas that count
every completion a request asks for, and bad prompts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson
import pytest

from serve_app.ingress import Gateway
from serve_app.mock_provider import Faults, MockBehaviour
from tests.support import LOCAL_KEY, MockServer, gateway_args, in_process

pytestmark = pytest.mark.integration
ROUTE = "/v1/completions"


def _prompt() -> str:
    return f"Once upon a time {uuid.uuid4().hex}"


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", response.text
    return [orjson.loads(line[6:]) for line in lines[:-1]]


def _streamed_text(events: list[dict[str, Any]]) -> str:
    return "".join(c["text"] for e in events for c in e["choices"])


def _gateway(mock_server: MockServer, redis_url: str, **overrides: Any) -> Gateway:
    return Gateway(gateway_args(mock_server.base_url, redis_url, **overrides))


async def test_answered_and_streamed_from_the_upstreams_completions_route(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        body = {"model": "mock-gpt", "prompt": _prompt(), "max_tokens": 10}
        answer = await client.post(ROUTE, json=body)
        assert answer.status_code == 200, answer.text
        completion = answer.json()
        assert completion["object"] == "text_completion"
        text = completion["choices"][0]["text"]
        assert text and completion["usage"]["completion_tokens"] == len(text.split())
        assert answer.headers["x-cache"] == "BYPASS"  # temperature unset: sampled
        assert mock_behaviour.stats.by_path == {"/v1/completions": 1}
        assert orjson.loads(mock_behaviour.last_body)["prompt"] == body["prompt"]

        streamed = await client.post(ROUTE, json={**body, "stream": True})
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = _events(streamed)
        assert {e["object"] for e in events} == {"text_completion"}
        assert _streamed_text(events) == text
        assert all("usage" not in e or e["usage"] is None for e in events)  # not asked for

        with_usage = await client.post(
            ROUTE, json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        last = _events(with_usage)[-1]
        assert last["choices"] == [] and "cost" in last["usage"]  # the gateway's, as on chat
        assert {k: last["usage"][k] for k in completion["usage"]} == completion["usage"]


async def test_cached_answers_replay_as_text_completions_and_never_as_chat(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        prompt = _prompt()
        # One body both routes accept: a chat answer must never answer the completion.
        body = {
            "model": "mock-gpt",
            "prompt": prompt,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
        }
        chat = await client.post("/v1/chat/completions", json=body)
        assert chat.status_code == 200 and chat.headers["x-cache"] == "MISS"
        streamed_miss = await client.post(ROUTE, json={**body, "stream": True})
        assert streamed_miss.headers["x-cache"] == "MISS"
        text = _streamed_text(_events(streamed_miss))
        assert mock_behaviour.stats.by_path == {"/v1/chat/completions": 1, "/v1/completions": 1}

        # The stream was put back together and stored: a plain request is a hit.
        hit = await client.post(ROUTE, json=body)
        assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT", hit.text
        assert hit.json()["object"] == "text_completion"
        assert hit.json()["choices"][0]["text"] == text
        assert hit.json()["choices"][0]["finish_reason"] == "stop"
        replayed = await client.post(
            ROUTE, json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        assert replayed.headers["x-cache"] == "HIT"
        events = _events(replayed)
        assert {e["object"] for e in events} == {"text_completion"}
        assert _streamed_text(events) == text
        assert events[-1]["usage"]["completion_tokens"] == len(text.split())
        assert mock_behaviour.stats.calls == 2
        chat_again = await client.post("/v1/chat/completions", json=body)
        assert chat_again.headers["x-cache"] == "HIT"
        assert chat_again.json()["object"] == "chat.completion"


async def test_identical_completions_in_flight_share_one_upstream_call(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    mock_behaviour.config.latency.fixed_ms = 200
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        body = {"model": "mock-gpt", "prompt": _prompt(), "temperature": 0}
        answers = await asyncio.gather(*(client.post(ROUTE, json=body) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        assert sorted(a.headers["x-dedup"] for a in answers) == ["FOLLOWER"] * 3 + ["LEADER"]
        assert len({a.json()["choices"][0]["text"] for a in answers}) == 1
        assert mock_behaviour.stats.calls == 1


async def test_a_token_quota_counts_every_completion_the_request_asks_for(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    limits = {"per_key": {"default": [{"window": "1m", "tokens": 200}]}}
    gateway = _gateway(mock_server, redis_url, limits=limits)
    async with in_process(gateway, LOCAL_KEY) as client:
        prompt = f"hi {uuid.uuid4().hex[:6]}"
        ok = await client.post(
            ROUTE, json={"model": "mock-gpt", "prompt": prompt, "max_tokens": 60}
        )
        assert ok.status_code == 200, ok.text
        # 60 tokens each for 2 prompts x best_of 2: 240 held, past the 200 a minute.
        many = {"model": "mock-gpt", "prompt": [prompt, prompt], "max_tokens": 60, "best_of": 2}
        refused = await client.post(ROUTE, json=many)
        assert refused.status_code == 429, refused.text
        assert mock_behaviour.stats.calls == 1


async def test_a_prompt_too_long_for_the_model_goes_to_its_context_fallback(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    mock_behaviour.config.faults["mock-gpt"] = Faults(context_tokens=30)
    overrides = {
        "resilience": {
            "default": {"retry": {"max_attempts": 1}},
            "context_fallbacks": {"mock-gpt": [{"upstream": "mock", "model": "mock-gpt-long"}]},
        }
    }
    async with in_process(_gateway(mock_server, redis_url, **overrides), LOCAL_KEY) as client:
        short = await client.post(ROUTE, json={"model": "mock-gpt", "prompt": "a short one"})
        assert short.status_code == 200 and short.json()["model"] == "mock-gpt"
        long = await client.post(ROUTE, json={"model": "mock-gpt", "prompt": "a long one " * 40})
        assert long.status_code == 200, long.text
        assert long.json()["model"] == "mock-gpt-long" and long.headers["x-attempts"] == "2"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "mock-gpt"}, 400, "prompt"),
        ({"model": "mock-gpt", "prompt": []}, 400, "prompt"),
        ({"model": "mock-gpt", "prompt": [1, "a"]}, 400, "prompt"),
        ({"model": "mock-gpt", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "mock-gpt", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": "mock-embed", "prompt": "x"}, 400, "model"),
        ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ],
)
async def test_bad_requests_get_the_envelope(
    mock_server: MockServer,
    mock_behaviour: MockBehaviour,
    redis_url: str,
    body: dict[str, Any],
    status: int,
    param: str,
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        refused = await client.post(ROUTE, json=body)
        assert refused.status_code == status, refused.text
        assert refused.json()["error"]["param"] == param
        ok = await client.post(ROUTE, json={"model": "mock-gpt", "prompt": [1, 2, 3]})
        assert ok.status_code == 200  # and the next good request is served
    assert mock_behaviour.stats.calls == 1
