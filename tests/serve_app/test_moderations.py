"""``/v1/moderations`` in process (no Ray) against the mock upstream and a real store:
through the official SDK (which names no model: the first moderation model serves),
cached with no opt-in, and bad requests refused."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest

from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from serve_app.settings import hash_key
from tests.support import LOCAL_KEY, MockServer, gateway_args, in_process

pytestmark = pytest.mark.integration


def _gateway(mock_server: MockServer, redis_url: str) -> Gateway:
    args = gateway_args(mock_server.base_url, redis_url)
    models = [*(m.model_dump() for m in args.models)]
    models.append({"name": "mock-moderation", "upstream": "mock", "kind": "moderation"})
    return Gateway(gateway_args(mock_server.base_url, redis_url, models=models))


async def test_the_sdk_gets_verdicts_from_the_default_model_and_the_cache(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    gateway = _gateway(mock_server, redis_url)
    async with in_process(gateway, LOCAL_KEY):
        transport = httpx.ASGITransport(app=gateway.asgi())
        async with httpx.AsyncClient(transport=transport) as http:
            sdk = openai.AsyncOpenAI(
                base_url="http://gw/v1", api_key=LOCAL_KEY, http_client=http, max_retries=0
            )
            nonce = uuid.uuid4().hex
            texts = [f"I hate Mondays {nonce}", f"a calm walk {nonce}"]
            verdict = await sdk.moderations.create(input=texts)
            assert [r.flagged for r in verdict.results] == [True, False]
            assert verdict.results[0].categories.hate
            assert verdict.model == "mock-moderation"
            raw = await sdk.moderations.with_raw_response.create(input=texts)
            assert raw.headers["x-cache"] == "HIT"
            assert mock_behaviour.stats.by_path == {"/v1/moderations": 1}
            with pytest.raises(openai.BadRequestError):
                await sdk.moderations.create(input=texts, model="mock-gpt")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": [3]}, "input"),
        ({"model": "mock-embed", "input": "x"}, "model"),
        ({"input": [{"type": "text"}]}, "input"),
        ({"input": [{"type": "image_url", "image_url": "x"}]}, "input"),
    ],
)
async def test_bad_moderations_get_a_400_and_no_upstream_call(
    mock_server: MockServer,
    mock_behaviour: MockBehaviour,
    redis_url: str,
    body: dict[str, Any],
    param: str,
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        refused = await client.post("/v1/moderations", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param
        assert mock_behaviour.stats.calls == 0


async def test_the_default_model_is_the_first_one_the_key_may_use(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    args = gateway_args(mock_server.base_url, redis_url)
    models = [*(m.model_dump() for m in args.models)]
    models += [{"name": f"mod-{x}", "upstream": "mock", "kind": "moderation"} for x in "ab"]
    keys = [{"name": "b-only", "key_sha256": hash_key("sk-b-only"), "models": ["mod-b"]}]
    gateway = Gateway(gateway_args(mock_server.base_url, redis_url, models=models, api_keys=keys))
    async with in_process(gateway, "sk-b-only") as client:
        verdict = await client.post("/v1/moderations", json={"input": "a calm walk"})
        assert verdict.status_code == 200, verdict.text
        assert verdict.json()["model"] == "mod-b"
