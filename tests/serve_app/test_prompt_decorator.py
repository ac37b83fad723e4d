"""The prompt decorator: the tenant's messages go first and last in every chat
request, the guard sees only the client's, and the cache tells decorations apart."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from serve_app.prompt_decorator import PromptDecorator, PromptDecoratorSettings
from serve_app.settings import hash_key
from tests.support import LOCAL_KEY, OTHER_KEY, MockServer, auth, gateway_args, in_process

SYSTEM = {"role": "system", "content": "Answer in English."}
REMINDER = {"role": "user", "content": "Never reveal internal codes."}


def _decorator(settings: dict[str, Any]) -> PromptDecorator:
    return PromptDecorator(PromptDecoratorSettings.model_validate(settings))


def test_messages_go_first_and_last_and_tenants_have_their_own() -> None:
    decorator = _decorator(
        {"default": {"prepend": [SYSTEM], "append": [REMINDER]}, "tenants": {"raw": None}}
    )
    body = {"messages": [{"role": "user", "content": "hi"}]}
    added = decorator.decorate(body, "any")
    assert body["messages"] == [SYSTEM, {"role": "user", "content": "hi"}, REMINDER]
    assert added == [SYSTEM, REMINDER]
    untouched = {"messages": [{"role": "user", "content": "hi"}]}
    assert decorator.decorate(untouched, "raw") == [] and len(untouched["messages"]) == 1
    body["messages"][0]["content"] = "changed"  # one body's copy, not the next one's
    again = {"messages": []}
    decorator.decorate(again, "any")
    assert again["messages"][0] == SYSTEM


def test_a_decoration_is_checked_at_start() -> None:
    with pytest.raises(ValidationError):
        PromptDecoratorSettings.model_validate({"default": {"prepend": [{"role": "tool"}]}})


@pytest.mark.integration
async def test_the_upstream_and_the_cache_see_the_request_as_decorated(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    args = gateway_args(
        mock_server.base_url,
        redis_url,
        api_keys=[
            {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "tenant": "plain"},
            {"name": "other", "key_sha256": hash_key(OTHER_KEY), "tenant": "decorated"},
        ],
        cache={"policy": {"tenant_isolation": False}},  # one namespace: keys must differ
        prompt_decorator={"tenants": {"decorated": {"prepend": [SYSTEM]}}},
        prompt_guard={"default": {"deny": ["(?i)english"], "check": "all"}},
    )
    async with in_process(Gateway(args), LOCAL_KEY) as client:
        body = {
            "model": "mock-gpt",
            "temperature": 0,
            "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex}"}],
        }
        plain = await client.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200 and plain.headers["x-cache"] == "MISS"
        assert orjson.loads(mock_behaviour.last_body)["messages"] == body["messages"]
        # The guard denies "english", but only the operator's message says it.
        decorated = await client.post("/v1/chat/completions", json=body, headers=auth(OTHER_KEY))
        assert decorated.status_code == 200, decorated.text
        assert decorated.headers["x-cache"] == "MISS"  # not the plain answer
        sent = orjson.loads(mock_behaviour.last_body)["messages"]
        assert sent == [SYSTEM, *body["messages"]]
        again = await client.post("/v1/chat/completions", json=body, headers=auth(OTHER_KEY))
        assert again.headers["x-cache"] == "HIT"
        assert again.headers["x-cache-key"] == decorated.headers["x-cache-key"]
        assert mock_behaviour.stats.calls == 2
