"""Wildcard models (``openai/*``): which entry serves a name, as which upstream
model; and, in process against the mock, that such a model is a model of its own
for the stages (allowlists, prices) while metric labels keep the entry's name."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from serve_app.ingress import Gateway
from serve_app.metrics import NullMetrics
from serve_app.mock_provider import MockBehaviour
from serve_app.model_routes import ModelRoutes
from serve_app.settings import GatewayArgs, ModelSettings, hash_key
from tests.support import LOCAL_KEY, MockServer, auth, gateway_args, in_process


def _routes(*entries: dict[str, Any]) -> ModelRoutes:
    return ModelRoutes(ModelSettings.model_validate(e) for e in entries)


def test_an_exact_entry_wins_then_the_longest_prefix() -> None:
    routes = _routes(
        {"name": "*", "upstream": "local"},
        {"name": "openai/*", "upstream": "openai"},
        {"name": "openai/gpt-4*", "upstream": "azure", "upstream_model": "eu-gpt-4*"},
        {"name": "openai/gpt-4o", "upstream": "pinned", "upstream_model": "gpt-4o-2024-08-06"},
    )
    cases = {
        "openai/gpt-4o": ("pinned", "gpt-4o-2024-08-06", "openai/gpt-4o"),
        "openai/gpt-4.1-mini": ("azure", "eu-gpt-4.1-mini", "openai/gpt-4*"),
        "openai/o3": ("openai", "o3", "openai/*"),
        "llama3.1:8b": ("local", "llama3.1:8b", "*"),
    }
    for name, (upstream, target, entry) in cases.items():
        model = routes.get(name)
        assert model is not None
        assert (model.name, model.upstream, model.target_model, routes.entry(name)) == (
            name,
            upstream,
            target,
            entry,
        )
    assert [m.name for m in routes.listed()] == ["openai/gpt-4o"]


def test_a_prefix_alone_or_an_unmatched_name_is_no_model() -> None:
    routes = _routes(
        {"name": "openai/*", "upstream": "openai"},
        {"name": "legacy/*", "upstream": "openai", "upstream_model": "gpt-4o-mini"},
    )
    assert routes.get("openai/") is None and routes.get("openai/  ") is None
    assert routes.get("anthropic/claude") is None
    legacy = routes.get("legacy/davinci")
    assert legacy is not None and legacy.target_model == "gpt-4o-mini"  # one model for all


def test_what_is_remembered_stays_bounded() -> None:
    routes = ModelRoutes([ModelSettings(name="*", upstream="u")], remembered=8)
    for i in range(100):
        assert routes.get(f"m{i}") is not None
    assert len(routes._resolved) <= 8
    assert routes.entry("m0") == "*"  # forgotten since, and still known


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "open*ai/*", "upstream": "u"}, "may only end a name"),
        ({"name": "openai/*", "upstream": "u", "upstream_model": "*-*"}, "one '[*]' at most"),
    ],
)
def test_a_misplaced_wildcard_is_refused(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSettings.model_validate(entry)


def test_a_wildcard_model_has_no_fallbacks_of_its_own() -> None:
    config = {
        "upstreams": {"u": {"base_url": "http://u.invalid/v1"}},
        "models": [{"name": "openai/*", "upstream": "u"}],
        "api_keys": [{"name": "k", "key_sha256": hash_key("sk-k")}],
        "resilience": {"fallbacks": {"openai/*": [{"upstream": "u", "model": "x"}]}},
    }
    with pytest.raises(ValidationError, match="a wildcard model has no fallbacks"):
        GatewayArgs.model_validate(config)


class LabelSink(NullMetrics):
    def __init__(self) -> None:
        self.models: set[str] = set()

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if name == "gateway_requests_total" and tags:
            self.models.add(tags["model"])


@pytest.mark.integration
async def test_a_wildcard_model_is_served_priced_and_allowed_by_its_entry(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    args = gateway_args(
        mock_server.base_url,
        redis_url,
        models=[
            {"name": "mock-gpt", "upstream": "mock"},
            {"name": "mock/*", "upstream": "mock"},
        ],
        api_keys=[
            {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "tenant": tenant},
            {"name": "only-wild", "key_sha256": hash_key("sk-wild"), "models": ["mock/*"]},
            {"name": "one", "key_sha256": hash_key("sk-one"), "models": ["mock/tiny"]},
        ],
        # Priced by the upstream's name; a $0.05 budget holds ~25 worst cases of 20 tokens.
        cost={
            "pricing": {"overrides": {"tiny": {"input_per_mtok": "100", "output_per_mtok": "100"}}}
        },
        budgets={"tenants": {tenant: {"daily_usd": "0.05"}}},
    )
    sink = LabelSink()
    gateway = Gateway(args, metrics=sink)
    async with in_process(gateway, LOCAL_KEY) as client:
        body = {
            "model": "mock/tiny",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
        }
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert orjson.loads(mock_behaviour.last_body)["model"] == "tiny"  # what * matched
        assert Decimal(answer.headers["x-request-cost"]) > 0  # tiny's price, not zero
        text = await client.post(
            "/v1/completions", json={"model": "mock/tiny", "prompt": "x", "max_tokens": 20}
        )
        assert text.status_code == 200
        # A budget hold covers the priced upstream model: 20 x $100/M each, $0.05 a day.
        big = {**body, "max_tokens": 100_000}
        refused = await client.post("/v1/chat/completions", json=big)
        assert (
            refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        )

        listed = await client.get("/v1/models")
        assert [m["id"] for m in listed.json()["data"]] == ["mock-gpt"]  # no "mock/*"
        retrieved = await client.get("/v1/models/mock/anything")
        assert retrieved.status_code == 200 and retrieved.json()["id"] == "mock/anything"

        # An allowlist names the entry (every match) or one match.
        for key, model, status in (
            ("sk-wild", "mock/tiny", 200),
            ("sk-wild", "mock-gpt", 404),
            ("sk-one", "mock/tiny", 200),
            ("sk-one", "mock/other", 404),
        ):
            got = await client.post(
                "/v1/chat/completions", json={**body, "model": model}, headers=auth(key)
            )
            assert got.status_code == status, (key, model, got.text)
        # Its matches share the wildcard's breaker (one deployment, as LiteLLM cools one down).
        breakers = set(gateway.stages.resilience._breakers)
        assert "mock/mock/*" in breakers and not any("tiny" in b for b in breakers)
    assert sink.models == {"mock/*", ""}  # never the client's "mock/tiny" ("": refused first)
