"""``GET /admin/health`` in process (no Ray): the mock upstream answers and lists
its models, the dead one is reported down, and ``call=true`` proves each model
with a one-token call."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.ingress import Gateway
from serve_app.mock_provider import Faults, MockBehaviour
from tests.support import LOCAL_KEY, OTHER_KEY, MockServer, auth, gateway_args, in_process

pytestmark = pytest.mark.integration


def _gateway(mock_server: MockServer, redis_url: str) -> Gateway:
    models: list[dict[str, Any]] = [
        {"name": "mock-gpt", "upstream": "mock"},
        {"name": "mock-embed", "upstream": "mock", "kind": "embeddings"},
        {"name": "renamed", "upstream": "mock", "upstream_model": "not-served-here"},
        {"name": "mock/*", "upstream": "mock"},
        {"name": "dead-gpt", "upstream": "dead"},
    ]
    return Gateway(gateway_args(mock_server.base_url, redis_url, models=models))


async def test_each_upstream_is_asked_and_each_model_looked_for(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        answer = await client.get("/admin/health", params={"timeout_s": "5"})
        assert answer.status_code == 200, answer.text
        report = answer.json()
        upstreams = {u["upstream"]: u for u in report["upstreams"]}
        assert upstreams["mock"]["ok"] and upstreams["mock"]["status"] == 200
        assert not upstreams["dead"]["ok"] and upstreams["dead"]["error"]
        models = {m["model"]: m for m in report["models"]}
        assert set(models) == {"mock-gpt", "mock-embed", "renamed", "dead-gpt"}  # no wildcard
        assert models["mock-gpt"]["listed"] is True and models["mock-embed"]["listed"] is True
        assert models["renamed"]["listed"] is False  # a typo in upstream_model shows here
        assert models["dead-gpt"]["listed"] is None and models["mock-gpt"]["call"] is None
        assert report["healthy"] is False
        assert mock_behaviour.stats.calls == 0  # listing models is no model call


async def test_a_call_proves_each_model_for_a_token(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    mock_behaviour.config.faults["not-served-here"] = Faults(error_rate=1.0, error_status=404)
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        answer = await client.get("/admin/health", params={"call": "true", "timeout_s": "5"})
        models = {m["model"]: m for m in answer.json()["models"]}
        assert models["mock-gpt"]["call"]["ok"] and models["mock-embed"]["call"]["ok"]
        assert models["renamed"]["call"] == {
            **models["renamed"]["call"],
            "ok": False,
            "status": 404,
        }
        assert models["dead-gpt"]["call"]["ok"] is False
        assert mock_behaviour.stats.by_path == {"/v1/chat/completions": 2, "/v1/embeddings": 1}


async def test_only_an_admin_may_ask_and_bad_parameters_are_refused(
    mock_server: MockServer, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        assert (await client.get("/admin/health", headers=auth(OTHER_KEY))).status_code == 403
        for params in ({"call": "maybe"}, {"timeout_s": "0"}, {"timeout_s": "x"}):
            refused = await client.get("/admin/health", params=params)
            assert refused.status_code == 400, params
