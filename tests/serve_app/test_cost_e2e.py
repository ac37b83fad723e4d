"""Cost tracking end to end (issue 6): real HTTP into two gateway replicas on a
real local Ray Serve, the mock provider upstream (priced in config), one real
Redis holding budgets and the ledger.

The ledger is written off the answer's path, in batches: every check of it
polls. Each test bills a key or user of its own, so the summaries it reads
hold only its own requests.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from deployments.tokens import estimate_prompt_tokens
from serve_app.mock_provider import Faults, MockBehaviour
from serve_app.settings import GatewayArgs, hash_key
from tests.serve_app.e2e_calls import CHAT, burst, envelope, flush_store, sse_chunks
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

APP, PREFIX = "cost-e2e", "/cost-e2e"
MILLION = Decimal(1_000_000)
PRICES = {  # USD per million tokens
    "mock-gpt": (Decimal("1.00"), Decimal("2.00")),
    "mock-gpt-big": (Decimal("30.00"), Decimal("60.00")),
}
BUDGET_KEY, RELEASE_KEY = "sk-cost-budget", "sk-cost-release"
# The mock answers with 8 to 16 words, one token each, capped by max_tokens: with
# max_tokens 8 a call costs exactly its reservation (the prompt estimate is the
# mock's own count), so a budget of N reservations admits exactly N calls.
MAX_TOKENS = 8
FITS = 10


def _cost(model: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
    rate_in, rate_out = PRICES[model]
    return (prompt_tokens * rate_in + completion_tokens * rate_out) / MILLION


def _capped_body(content: str) -> dict[str, Any]:
    return chat_body(content, max_tokens=MAX_TOKENS)


def _reservation(content: str) -> Decimal:
    """The worst case reserved for ``_capped_body(content)`` on mock-gpt."""
    prompt = estimate_prompt_tokens(_capped_body(content)["messages"])
    return _cost("mock-gpt", prompt, MAX_TOKENS)


def _budget_content(i: int) -> str:
    return f"budget request {i:03d}"  # one length: one reservation for all


def _release_content(i: int) -> str:
    return f"release request {i:03d}"


def _args(mock_url: str, redis_url: str) -> GatewayArgs:
    config = gateway_args(mock_url, redis_url).model_dump(mode="json")
    models = [
        *config["models"],
        {"name": "mock-gpt-big", "upstream": "mock"},
        {"name": "dear-gpt", "upstream": "mock", "upstream_model": "mock-gpt-big"},
    ]
    # dear-gpt is mock-gpt-big under another name (priced as such), falling back to mock-gpt.
    fallbacks = {
        "dear-gpt": [
            {"upstream": "mock", "model": "mock-gpt-big"},
            {"upstream": "mock", "model": "mock-gpt"},
        ]
    }
    keys = [
        {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "tenant": "local", "admin": True},
        {"name": "other", "key_sha256": hash_key(OTHER_KEY), "tenant": "other"},
        {"name": "budget", "key_sha256": hash_key(BUDGET_KEY), "tenant": "budget"},
        {"name": "release", "key_sha256": hash_key(RELEASE_KEY), "tenant": "release"},
    ]
    overrides = {
        model: {"input_per_mtok": str(rate_in), "output_per_mtok": str(rate_out)}
        for model, (rate_in, rate_out) in PRICES.items()
    }
    cost = {
        "pricing": {"overrides": overrides},
        "recommendations": {"cheaper_models": {"mock-gpt-big": "mock-gpt"}},
        # Slow batches: records are still queued when the restart test deletes the app.
        "ledger": {"flush_interval_ms": 1000},
    }
    budgets = {
        "keys": {
            "budget": {"daily_usd": str(FITS * _reservation(_budget_content(0)))},
            "release": {"daily_usd": str(_reservation(_release_content(0)))},
        }
    }
    resilience = {**config["resilience"], "fallbacks": fallbacks}
    return GatewayArgs.model_validate(
        {
            **config,
            "models": models,
            "api_keys": keys,
            "cost": cost,
            "budgets": budgets,
            "resilience": resilience,
        }
    )


def _deploy(serve_port: int, mock_server: MockServer, redis_url: str) -> str:
    deploy_gateway(_args(mock_server.base_url, redis_url), APP, PREFIX)
    return f"http://127.0.0.1:{serve_port}{PREFIX}"


@pytest.fixture(scope="module")
def base_url(serve_port: int, mock_server: MockServer, redis_url: str) -> Iterator[str]:
    from ray import serve

    flush_store(redis_url)
    yield _deploy(serve_port, mock_server, redis_url)
    serve.delete(APP)


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with client(base_url) as c:
        yield c


def _summary(http: httpx.Client, group_by: str) -> dict[str, dict[str, Any]]:
    response = http.get("/v1/cost/summary", params={"group_by": group_by}, headers=auth())
    assert response.status_code == 200, response.text
    return {row["group"]: row for row in response.json()["rows"]}


def _recorded(http: httpx.Client, group_by: str, group: str, requests: int) -> dict[str, Any]:
    """The summary row of ``group`` once it holds ``requests`` records."""
    wait_until(
        lambda: _summary(http, group_by).get(group, {}).get("requests") == requests, timeout_s=10
    )
    return _summary(http, group_by)[group]


@pytest.mark.parametrize("model", sorted(PRICES))
def test_cost_header_and_stream_cost_follow_the_price(
    http: httpx.Client, mock_behaviour: MockBehaviour, model: str
) -> None:
    body = {**chat_body(f"what does {model} cost?"), "model": model}
    answer = http.post(CHAT, json=body, headers=auth())
    assert answer.status_code == 200
    usage = answer.json()["usage"]
    expected = _cost(model, usage["prompt_tokens"], usage["completion_tokens"])
    assert expected > 0
    assert Decimal(answer.headers["x-request-cost"]) == expected

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    response = http.post(CHAT, json=streamed, headers=auth())
    assert response.status_code == 200
    assert "x-request-cost" not in response.headers  # sent before the cost is known
    final = sse_chunks(response.text)[-1]
    assert final["choices"] == []
    assert final["usage"]["total_tokens"] == usage["total_tokens"]
    assert Decimal(final["usage"]["cost"]) == expected
    assert mock_behaviour.stats.calls == 2  # both went upstream: nothing came from a cache
    # Each model's first two calls: later tests read totals that must hold these records.
    row = _recorded(http, "model", model, 2)
    assert Decimal(row["cost"]) == 2 * expected


def test_a_fallback_is_billed_at_the_price_of_the_model_that_answered(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    body = {**chat_body("which model answers?"), "model": "dear-gpt"}
    mock_behaviour.config.faults["mock-gpt-big"] = Faults(error_rate=1.0, error_status=500)
    try:
        answer = http.post(CHAT, json=body, headers=auth())
    finally:
        mock_behaviour.config.faults.clear()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "mock-gpt"  # the fallback answered
    usage = answer.json()["usage"]
    cost = Decimal(answer.headers["x-request-cost"])
    assert cost == _cost("mock-gpt", usage["prompt_tokens"], usage["completion_tokens"])
    assert cost < _cost("mock-gpt-big", usage["prompt_tokens"], usage["completion_tokens"])
    big = {**body, "messages": [{"role": "user", "content": "big?"}]}
    healthy = http.post(CHAT, json=big, headers=auth())
    assert healthy.status_code == 200 and healthy.json()["model"] == "mock-gpt-big"
    usage = healthy.json()["usage"]
    expected = _cost("mock-gpt-big", usage["prompt_tokens"], usage["completion_tokens"])
    assert Decimal(healthy.headers["x-request-cost"]) == expected


def test_concurrent_requests_never_overshoot_the_budget(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    reservation = _reservation(_budget_content(0))
    budget = FITS * reservation
    mock_behaviour.config.latency.fixed_ms = 200  # the admitted calls overlap
    bodies = [_capped_body(_budget_content(i)) for i in range(50)]
    responses = burst(base_url, bodies, key=BUDGET_KEY)
    admitted = [r for r in responses if r.status_code == 200]
    assert len(admitted) == FITS
    for response in responses:
        if response.status_code != 200:
            error = envelope(response, 429, "insufficient_quota")
            assert error["type"] == "insufficient_quota"
            assert response.headers["x-should-retry"] == "false"
            assert "budget of key 'budget' exhausted" in error["message"]
    costs = [Decimal(r.headers["x-request-cost"]) for r in admitted]
    assert all(c == reservation for c in costs)  # max_tokens capped the answer exactly

    row = _recorded(http, "key", "budget", FITS)
    assert Decimal(row["cost"]) == sum(costs)
    assert Decimal(row["cost"]) <= budget + reservation
    # Spent in full: the next request is refused too, with nothing in flight.
    late = http.post(CHAT, json=_capped_body(_budget_content(99)), headers=auth(BUDGET_KEY))
    envelope(late, 429, "insufficient_quota")


def test_the_ledger_adds_up_across_groupings(http: httpx.Client) -> None:
    def totals(group_by: str) -> tuple[int, Decimal]:
        rows = _summary(http, group_by).values()
        return sum(r["requests"] for r in rows), sum((Decimal(r["cost"]) for r in rows), Decimal(0))

    def agree() -> bool:
        by_day = totals("day")
        assert by_day[0] > 0
        return all(totals(g) == by_day for g in ("key", "user", "tenant", "model"))

    # Every earlier test waited for its own records, but two replicas flush their batches
    # on their own timers: a record may still land between two of the reads.
    wait_until(agree, timeout_s=10)


def test_a_failed_call_releases_its_reservation(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    # The "release" key's budget holds exactly one reservation.
    mock_behaviour.config.faults["*"] = Faults(error_rate=1.0, error_status=500)
    failed = http.post(CHAT, json=_capped_body(_release_content(0)), headers=auth(RELEASE_KEY))
    assert failed.status_code == 500
    mock_behaviour.config.faults.clear()

    def fits() -> bool:
        body = _capped_body(_release_content(1))
        response = http.post(CHAT, json=body, headers=auth(RELEASE_KEY))
        if response.status_code != 200:
            envelope(response, 429, "insufficient_quota")  # the hold is not back yet
        return response.status_code == 200

    wait_until(fits, timeout_s=5)
    spent = http.post(CHAT, json=_capped_body(_release_content(2)), headers=auth(RELEASE_KEY))
    envelope(spent, 429, "insufficient_quota")


def test_summary_as_csv(http: httpx.Client) -> None:
    def as_csv() -> dict[str, tuple[int, Decimal]]:
        response = http.get(
            "/v1/cost/summary", params={"group_by": "key", "format": "csv"}, headers=auth()
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        rows = csv.DictReader(io.StringIO(response.text))
        return {r["group"]: (int(r["requests"]), Decimal(r["cost"])) for r in rows}

    def as_json() -> dict[str, tuple[int, Decimal]]:
        rows = _summary(http, "key").items()
        return {group: (r["requests"], Decimal(r["cost"])) for group, r in rows}

    # The previous test's last records may land between the two reads: read until they agree.
    wait_until(lambda: as_csv() == as_json() != {}, timeout_s=10)


def test_cost_routes_need_an_admin_key(http: httpx.Client) -> None:
    for path in ("/v1/cost/summary", "/v1/cost/recommendations"):
        envelope(http.get(path, headers=auth(OTHER_KEY)), 403, "permission_denied")


def _recommendations(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.get("/v1/cost/recommendations", headers=auth())
    assert response.status_code == 200
    found = response.json()["recommendations"]
    assert isinstance(found, list)
    return found


def _cheaper(http: httpx.Client, model: str) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in _recommendations(http)
            if r["rule"] == "cheaper_model" and r["subject"] == model
        ),
        None,
    )


def test_short_prompts_on_a_dear_model_bring_a_cheaper_model_recommendation(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    # Too few requests so far (the rule wants 20 short ones), and mock-gpt has no cheaper model.
    assert _cheaper(http, "mock-gpt-big") is None
    assert _cheaper(http, "mock-gpt") is None
    bodies = [{**chat_body(f"short question {i}"), "model": "mock-gpt-big"} for i in range(25)]
    assert all(r.status_code == 200 for r in burst(base_url, bodies))
    wait_until(lambda: _cheaper(http, "mock-gpt-big") is not None, timeout_s=10)
    found = _cheaper(http, "mock-gpt-big")
    assert found is not None
    figures = found["figures"]
    assert figures["alternative_model"] == "mock-gpt"
    spent = Decimal(_summary(http, "model")["mock-gpt-big"]["cost"])
    assert Decimal(figures["current_cost_usd"]) == spent  # every call was short
    # Both prices are per token, mock-gpt-big's 30 times mock-gpt's.
    assert Decimal(figures["alternative_cost_usd"]) * 30 == spent
    assert Decimal(figures["saving_usd"]) == spent - Decimal(figures["alternative_cost_usd"])
    assert _cheaper(http, "mock-gpt") is None


def test_the_ledger_survives_a_replica_restart(
    serve_port: int, mock_server: MockServer, redis_url: str, base_url: str
) -> None:
    from ray import serve

    bodies = [chat_body(f"before restart {i}", user="restart-user") for i in range(5)]
    with client(base_url) as c:
        costs = [
            Decimal(c.post(CHAT, json=b, headers=auth()).headers["x-request-cost"]) for b in bodies
        ]
    serve.delete(APP)  # at once: the last records may still wait for their batch
    _deploy(serve_port, mock_server, redis_url)
    with client(base_url) as c:
        row = _recorded(c, "user", "restart-user", 5)
    assert Decimal(row["cost"]) == sum(costs)


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/cost/summary", {"group_by": "colour"}, "group_by"),
        ("/v1/cost/summary", {"since": "last week"}, "since"),
        ("/v1/cost/summary", {"until": "tomorrow"}, "until"),
        ("/v1/cost/summary", {"format": "xml"}, "format"),
        ("/v1/cost/summary", {"since": "2026-12-01", "until": "2026-11-01"}, "since"),
        ("/v1/cost/recommendations", {"days": "a week"}, "days"),
    ],
)
def test_a_bad_query_is_a_400_naming_it(
    http: httpx.Client, path: str, params: dict[str, str], param: str
) -> None:
    error = envelope(http.get(path, params=params, headers=auth()), 400, None)
    assert error["param"] == param


def test_spend_is_summed_by_the_tags_a_request_carries(http: httpx.Client) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    tagged = {**auth(), "x-gateway-tags": f"{app},env=test"}
    for content in ("tagged one", "tagged two"):
        answer = http.post(CHAT, json=chat_body(content), headers=tagged)
        assert answer.status_code == 200, answer.text
    row = _recorded(http, "tag", app, 2)
    assert Decimal(row["cost"]) > 0
    refused = http.post(CHAT, json=chat_body("x"), headers={**auth(), "x-gateway-tags": "a b"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "x-gateway-tags")
