"""Prompt templates (Kong's AI Prompt Template): a request names a template and
gives properties; the gateway fills the template in before anything else sees it."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from serve_app.errors import InvalidRequestError
from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from serve_app.prompt_templates import PromptTemplates, PromptTemplateSettings
from serve_app.settings import hash_key
from tests.support import LOCAL_KEY, OTHER_KEY, MockServer, auth, gateway_args, in_process

SUMMARISE = {
    "messages": [
        {"role": "system", "content": "You summarise {{style}}."},
        {"role": "user", "content": "Summarise: {{ text }}"},
    ],
    "defaults": {"style": "briefly"},
}
STORY = {"prompt": "Once upon a time, {{hero}} met {{hero}}'s match."}
LIBRARY = {"templates": {"summarise": SUMMARISE, "story": STORY}}


def _templates(settings: dict[str, Any]) -> PromptTemplates:
    return PromptTemplates(PromptTemplateSettings.model_validate(settings))


def _refusal(templates: PromptTemplates, route: str, body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as refused:
        templates.expand(route, body, "any")
    return refused.value


def test_a_named_template_is_filled_in_with_properties_and_defaults() -> None:
    templates = _templates({"default": LIBRARY})
    body = {"messages": "{template://summarise}", "properties": {"text": 'a "quoted" }} text'}}
    assert templates.expand("chat", body, "any")
    assert body == {
        "messages": [
            {"role": "system", "content": "You summarise briefly."},
            {"role": "user", "content": 'Summarise: a "quoted" }} text'},
        ]
    }  # properties are gone: they are the gateway's, not the upstream's
    text = {"prompt": " {template://story} ", "properties": {"hero": 7}}
    assert templates.expand("completions", text, "any")
    assert text == {"prompt": "Once upon a time, 7 met 7's match."}
    response = {"input": "{template://summarise}", "properties": {"text": "x"}}
    assert templates.expand("responses", response, "any")
    assert response["input"][1] == {"role": "user", "content": "Summarise: x"}
    plain = {"messages": [{"role": "user", "content": "{{text}}"}], "properties": {"a": "b"}}
    assert not templates.expand("chat", plain, "any")
    assert "properties" not in plain  # never sent upstream, named template or not
    assert plain["messages"][0]["content"] == "{{text}}"  # only named templates are filled


def test_what_cannot_be_filled_in_is_refused_naming_the_field() -> None:
    templates = _templates({"default": LIBRARY})
    missing = _refusal(templates, "chat", {"messages": "{template://summarise}"})
    assert (missing.code, missing.param) == ("template_property_missing", "properties.text")
    unknown = _refusal(templates, "chat", {"messages": "{template://nope}"})
    assert (unknown.code, unknown.param) == ("template_not_found", "messages")
    wrong_kind = _refusal(templates, "chat", {"messages": "{template://story}"})
    assert wrong_kind.code == "template_not_found"
    bad_value = _refusal(
        templates,
        "chat",
        {"messages": "{template://summarise}", "properties": {"text": ["x"]}},
    )
    assert bad_value.param == "properties.text"
    not_object = _refusal(
        templates, "completions", {"prompt": "{template://story}", "properties": "x"}
    )
    assert not_object.param == "properties"


def test_a_tenant_may_be_held_to_templates_and_another_have_none() -> None:
    templates = _templates(
        {"default": {**LIBRARY, "allow_untemplated": False}, "tenants": {"free": None}}
    )
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    refused = _refusal(templates, "chat", plain)
    assert (refused.code, refused.param) == ("template_required", "messages")
    free_text = _refusal(templates, "responses", {"input": "free text"})
    assert (free_text.code, free_text.param) == ("template_required", "input")
    story = _refusal(templates, "responses", {"input": "{template://story}"})
    assert story.code == "template_not_found"  # a completions prompt is no response input
    assert not templates.expand("chat", plain, "free")
    named = {"messages": "{template://summarise}", "properties": {"text": "x"}}
    assert not templates.expand("chat", named, "free")  # no library: left to validation
    assert not templates.expand("embeddings", {"input": "{template://story}"}, "any")


@pytest.mark.parametrize(
    "library",
    [
        {"templates": {"t": {"messages": [{"role": "user", "content": "x"}], "prompt": "y"}}},
        {"templates": {"t": {}}},
        {"templates": {"bad name": {"prompt": "x"}}},
        {"templates": {"t": {"messages": [{"role": "tool", "content": "x"}]}}},
    ],
)
def test_a_library_is_checked_at_start(library: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PromptTemplateSettings.model_validate({"default": library})


@pytest.mark.integration
async def test_the_guard_the_cache_and_the_upstream_see_the_filled_in_request(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    args = gateway_args(
        mock_server.base_url,
        redis_url,
        api_keys=[
            {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "tenant": "apps"},
            {"name": "other", "key_sha256": hash_key(OTHER_KEY), "tenant": "free"},
        ],
        prompt_templates={
            "tenants": {"apps": {**LIBRARY, "allow_untemplated": False}},
        },
        prompt_guard={"default": {"deny": ["(?i)forbidden"]}},
    )
    text = f"the minutes of {uuid.uuid4().hex}"
    named = {
        "model": "mock-gpt",
        "temperature": 0,
        "messages": "{template://summarise}",
        "properties": {"text": text},
    }
    async with in_process(Gateway(args), LOCAL_KEY) as client:
        first = await client.post("/v1/chat/completions", json=named)
        assert first.status_code == 200, first.text
        sent = orjson.loads(mock_behaviour.last_body)
        assert sent["messages"][1]["content"] == f"Summarise: {text}"
        assert "properties" not in sent
        again = await client.post("/v1/chat/completions", json=named)
        assert again.headers["x-cache"] == "HIT"  # same properties, same filled-in request
        other = {**named, "properties": {"text": text, "style": "at length"}}
        assert (await client.post("/v1/chat/completions", json=other)).headers["x-cache"] == "MISS"

        blocked = {**named, "properties": {"text": "the forbidden plans"}}
        refused = await client.post("/v1/chat/completions", json=blocked)
        assert refused.json()["error"]["code"] == "prompt_blocked"
        plain = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
        required = await client.post("/v1/chat/completions", json=plain)
        assert required.status_code == 400
        assert required.json()["error"]["code"] == "template_required"
        free = await client.post("/v1/chat/completions", json=plain, headers=auth(OTHER_KEY))
        assert free.status_code == 200
        assert mock_behaviour.stats.calls == 3
