"""Balanced targets' rpm/tpm in process (no Ray), through HTTP against the mock:
calls move to the target with room, then 429 with retry-after, and a stream's
real usage, not its reservation, stays on the target's tpm."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from tests.support import LOCAL_KEY, MockServer, gateway_args, in_process

pytestmark = pytest.mark.integration


def _gateway(
    mock_server: MockServer,
    redis_url: str,
    targets: list[dict[str, Any]],
    strategy: str = "weighted",
    **overrides: Any,
) -> Gateway:
    """mock-gpt balanced over ``targets`` (upstreams ``mock`` and ``mock2``: one mock)."""
    args = gateway_args(mock_server.base_url, redis_url)
    upstreams = {
        **{n: u.model_dump() for n, u in args.upstreams.items()},
        "mock2": {"base_url": mock_server.base_url},
    }
    resilience = args.resilience.model_dump()
    resilience["balance"] = {"mock-gpt": {"strategy": strategy, "targets": targets}}
    return Gateway(
        gateway_args(
            mock_server.base_url,
            redis_url,
            upstreams=upstreams,
            resilience=resilience,
            **overrides,
        )
    )


def _same_model(upstreams: tuple[str, ...], **limits: Any) -> list[dict[str, Any]]:
    return [{"upstream": u, "model": "mock-gpt", **limits} for u in upstreams]


def _ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": content}], **extra}


async def test_calls_move_to_the_target_with_room_then_get_a_429(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(
        _gateway(mock_server, redis_url, _same_model(("mock", "mock2"), rpm=1)), LOCAL_KEY
    ) as client:
        first = await client.post("/v1/chat/completions", json=_ask("one"))
        second = await client.post("/v1/chat/completions", json=_ask("two"))
        third = await client.post("/v1/chat/completions", json=_ask("three"))
    assert (first.status_code, second.status_code) == (200, 200)
    assert {first.headers["x-upstream"], second.headers["x-upstream"]} == {"mock", "mock2"}
    assert third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert 0 < int(third.headers["retry-after"]) <= 60
    assert mock_behaviour.stats.calls == 2  # the refusal reached no upstream


async def test_a_stream_leaves_its_real_usage_on_the_target(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    # Each request holds ~1,000 tokens (max_tokens) of its one target's 1,500 tpm, and
    # uses ~25: the next fits only if the one before gave back what it did not use.
    gateway = _gateway(mock_server, redis_url, _same_model(("mock",), tpm=1500))
    async with in_process(gateway, LOCAL_KEY) as client:
        for content, stream in (("a streamed one", True), ("a plain one", False), ("x", True)):
            answer = await client.post(
                "/v1/chat/completions", json=_ask(content, max_tokens=1000, stream=stream)
            )
            assert answer.status_code == 200, (content, answer.text)
            await answer.aread()
    assert mock_behaviour.stats.calls == 3


async def test_lowest_cost_sends_calls_to_the_cheapest_target_until_its_rpm_is_used(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    targets = [
        {"upstream": "mock", "model": "dear-gpt"},
        {"upstream": "mock2", "model": "cheap-gpt", "rpm": 2},
    ]
    pricing = {
        "dear-gpt": {"input_per_mtok": "10", "output_per_mtok": "30"},
        "cheap-gpt": {"input_per_mtok": "0.1", "output_per_mtok": "0.4"},
    }
    cost = {"pricing": {"overrides": pricing}}
    gateway = _gateway(mock_server, redis_url, targets, "lowest-cost", cost=cost)
    async with in_process(gateway, LOCAL_KEY) as client:
        answers = [await client.post("/v1/chat/completions", json=_ask(f"q{i}")) for i in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["model"] for a in answers] == [
        "cheap-gpt",
        "cheap-gpt",
        "dear-gpt",
        "dear-gpt",
    ]
