"""The semantic tier end to end: the gateway's replicas reach the semantic cache
deployment (MiniLM + faiss) through a handle after an exact-cache miss."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from serve_app.mock_provider import MockBehaviour
from tests.support import (
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
    from ray import serve

    args = gateway_args(mock_server.base_url, redis_url)
    deploy_gateway(args, "semantic-e2e", "/semantic-e2e", semantic=True)
    yield f"http://127.0.0.1:{serve_port}/semantic-e2e"
    serve.delete("semantic-e2e")


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with client(base_url) as c:
        yield c


def ask(http: httpx.Client, text: str, key: str | None = None, **extra: object) -> httpx.Response:
    body = chat_body(text, temperature=0, **extra)
    response = http.post("/v1/chat/completions", json=body, headers=auth(key) if key else auth())
    assert response.status_code == 200, response.text
    return response


def stored(http: httpx.Client, text: str) -> None:
    """Ask, then wait until the semantic tier has the answer (it stores off the path)."""
    assert ask(http, text).headers["x-cache"] == "MISS"


def test_a_rewording_is_a_semantic_hit(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    stored(http, "What is the capital city of France?")
    calls = mock_behaviour.stats.calls

    def semantic_hit() -> bool:
        return ask(http, "What's the capital city of France?").headers["x-cache"] == "SEMANTIC_HIT"

    wait_until(semantic_hit, timeout_s=20)
    response = ask(http, "What's the capital city of France?")
    assert float(response.headers["x-cache-similarity"]) > 0.9
    assert mock_behaviour.stats.calls == calls  # hits never went upstream


def test_a_near_miss_is_not_served(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    stored(http, "How do I convert 100 Fahrenheit to Celsius?")
    wait_until(
        lambda: ask(http, "How do I convert 100 Fahrenheit to Celsius?").headers["x-cache"] == "HIT"
    )
    for other in (
        "How do I convert 100 Celsius to Fahrenheit?",
        "How do I convert 250 Fahrenheit to Celsius?",
    ):
        assert ask(http, other).headers["x-cache"] == "MISS", other


def test_tenants_never_share_semantic_entries(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    stored(http, "Which planet is the largest in the solar system?")
    wait_until(
        lambda: (
            ask(http, "Which planet is the biggest in the solar system?").headers["x-cache"]
            == "SEMANTIC_HIT"
        ),
        timeout_s=20,
    )
    other = ask(http, "Which planet is the biggest in the solar system?", key=OTHER_KEY)
    assert other.headers["x-cache"] == "MISS"


def test_a_streamed_semantic_hit_replays_as_sse(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    stored(http, "Name three primary colours.")
    wait_until(
        lambda: ask(http, "Name three primary colors.").headers["x-cache"] == "SEMANTIC_HIT",
        timeout_s=20,
    )
    body = chat_body("Name three primary colors.", temperature=0, stream=True)
    response = http.post("/v1/chat/completions", json=body, headers=auth())
    assert response.headers["x-cache"] == "SEMANTIC_HIT"
    assert response.text.rstrip().endswith("data: [DONE]")
