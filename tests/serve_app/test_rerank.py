"""``/v1/rerank`` in process (no Ray) against the mock upstream and a real store:
scored documents billed from the upstream's total tokens, cached and coalesced
with no opt-in (a rerank does not sample), and bad requests refused."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest

from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from tests.support import LOCAL_KEY, MockServer, gateway_args, in_process, tpm_key

pytestmark = pytest.mark.integration
PRICE = {"input_per_mtok": "1000", "output_per_mtok": "0"}


def _gateway(mock_server: MockServer, redis_url: str, **overrides: Any) -> Gateway:
    args = gateway_args(mock_server.base_url, redis_url)
    models = [*(m.model_dump() for m in args.models)]
    models.append({"name": "mock-rerank", "upstream": "mock", "kind": "rerank"})
    return Gateway(
        gateway_args(
            mock_server.base_url,
            redis_url,
            models=models,
            cost={"pricing": {"overrides": {"mock-rerank": PRICE}}},
            **overrides,
        )
    )


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-rerank",
        "query": f"capital of france {uuid.uuid4().hex}",
        "documents": [
            "Paris is the capital of France",
            "bananas",
            {"text": "Berlin capital of Germany"},
        ],
        **extra,
    }


async def test_documents_are_scored_billed_and_served_again_from_the_cache(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        body = _body(top_n=2)
        first = await client.post("/v1/rerank", json=body)
        assert first.status_code == 200, first.text
        ranked = first.json()
        assert [r["index"] for r in ranked["results"]] == [0, 2]
        assert first.headers["x-cache"] == "MISS"
        tokens = ranked["usage"]["total_tokens"]
        assert Decimal(first.headers["x-request-cost"]) == Decimal(tokens) * 1000 / 10**6
        assert mock_behaviour.stats.by_path == {"/v1/rerank": 1}

        again = await client.post("/v2/rerank", json=body)  # Cohere's path, the same call
        assert again.headers["x-cache"] == "HIT" and again.json() == ranked
        assert mock_behaviour.stats.calls == 1

        fresh = _body()
        together = await asyncio.gather(*(client.post("/v1/rerank", json=fresh) for _ in range(4)))
        assert {a.status_code for a in together} == {200}
        assert mock_behaviour.stats.calls == 2  # four identical calls in flight: one upstream


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"documents": []}, "documents"),
        ({"documents": [5]}, "documents.0"),
        ({"query": ""}, "query"),
        ({"top_n": 0}, "top_n"),
        ({"model": "mock-gpt"}, "model"),
    ],
)
async def test_bad_reranks_get_a_400_and_no_upstream_call(
    mock_server: MockServer,
    mock_behaviour: MockBehaviour,
    redis_url: str,
    change: dict[str, Any],
    param: str,
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        refused = await client.post("/v1/rerank", json={**_body(), **change})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param
        chat = {"model": "mock-rerank", "messages": [{"role": "user", "content": "hi"}]}
        wrong_route = await client.post("/v1/chat/completions", json=chat)
        assert wrong_route.status_code == 400
        assert mock_behaviour.stats.calls == 0
        assert orjson.loads((await client.post("/v1/rerank", json=_body())).content)["results"]


async def test_a_rerank_holds_its_pairs_and_no_answer_of_tokens(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    # 200 tokens a minute: a rerank's pairs (~40 tokens) fit; with default_max_tokens
    # (1024) held as if it wrote an answer, none would.
    key, overrides = tpm_key(200)
    async with in_process(_gateway(mock_server, redis_url, **overrides), key) as client:
        ranked = await client.post("/v1/rerank", json=_body())
        assert ranked.status_code == 200, ranked.text
        assert int(ranked.headers["x-ratelimit-remaining-tokens"]) >= 100
