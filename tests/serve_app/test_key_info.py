"""``GET /v1/key`` in process (no Ray) against the mock upstream and a real store:
a key sees its own limits, budgets and spend, and nobody else's."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour
from serve_app.settings import hash_key
from tests.support import LOCAL_KEY, OTHER_KEY, MockServer, auth, gateway_args, in_process

pytestmark = pytest.mark.integration

PRICE = {"input_per_mtok": "1000", "output_per_mtok": "2000"}  # dear, so cents show


def _gateway(mock_server: MockServer, redis_url: str) -> Gateway:
    suffix = uuid.uuid4().hex[:8]  # the store outlives the test: fresh names, fresh spend
    mine, theirs, tenant = f"mine-{suffix}", f"theirs-{suffix}", f"t-{suffix}"
    args = gateway_args(
        mock_server.base_url,
        redis_url,
        api_keys=[
            {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "tenant": tenant, "admin": True},
            {
                "name": mine,
                "key_sha256": hash_key(f"sk-{mine}"),
                "tenant": tenant,
                "user": "ann",
                "models": ["mock-gpt"],
            },
            {"name": theirs, "key_sha256": hash_key(OTHER_KEY), "tenant": tenant},
        ],
        limits={
            "per_key": {"overrides": {mine: [{"window": "1m", "requests": 100}]}},
            "per_tenant": {"default": [{"window": "1h", "tokens": 1_000_000}]},
        },
        budgets={"keys": {mine: {"daily_usd": "5"}}, "default_tenant": {"monthly_usd": "100"}},
        cost={"pricing": {"overrides": {"mock-gpt": PRICE}}, "ledger": {"flush_interval_ms": 50}},
    )
    gateway = Gateway(args)
    gateway.test_names = (mine, theirs, tenant)  # type: ignore[attr-defined]
    return gateway


async def _info(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    answer = await client.get("/v1/key", headers=auth(key))
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


async def _spent_today(client: httpx.AsyncClient, key: str, requests: int) -> dict[str, Any]:
    for _ in range(100):  # the ledger is written in batches, a moment after the answer
        info = await _info(client, key)
        if info["spend"]["today"]["requests"] >= requests:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger never showed {requests} requests: {info}")


async def test_a_key_sees_its_own_limits_budgets_and_spend(
    mock_server: MockServer, redis_url: str
) -> None:
    gateway = _gateway(mock_server, redis_url)
    mine, theirs, tenant = gateway.test_names  # type: ignore[attr-defined]
    async with in_process(gateway, LOCAL_KEY) as client:
        fresh = await _info(client, f"sk-{mine}")
        assert fresh["name"] == mine and fresh["tenant"] == tenant and fresh["user"] == "ann"
        assert fresh["source"] == "config" and fresh["expires_at"] is None
        assert fresh["models"] == ["mock-gpt"] and fresh["admin"] is False
        assert fresh["spend"]["today"] == {
            "usd": "0",
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        assert fresh["limits"] == [
            {
                "scope": "key",
                "subject": mine,
                "window": "1m",
                "requests": 100,
                "tokens": None,
                "shadow": False,
            },
            {
                "scope": "tenant",
                "subject": tenant,
                "window": "1h",
                "requests": None,
                "tokens": 1_000_000,
                "shadow": False,
            },
        ]
        assert {(b["scope"], b["period"], b["limit_usd"]) for b in fresh["budgets"]} == {
            ("key", "daily", "5"),
            ("tenant", "monthly", "100"),
        }

        # 20 tokens at most: the worst case of 4,096 (the default) would not fit $5.
        body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
        body["max_tokens"] = 20
        answers = [
            await client.post("/v1/chat/completions", json=body, headers=auth(f"sk-{mine}"))
            for _ in range(2)
        ]
        assert all(a.status_code == 200 for a in answers)
        cost = sum(Decimal(a.headers["x-request-cost"]) for a in answers)
        assert cost > 0

        spent = await _spent_today(client, f"sk-{mine}", 2)
        assert Decimal(spent["spend"]["today"]["usd"]) == cost
        assert spent["spend"]["month"]["requests"] >= 2
        (daily,) = [b for b in spent["budgets"] if b["scope"] == "key"]
        assert Decimal(daily["spent_usd"]) == cost and Decimal(daily["held_usd"]) == 0
        assert Decimal(daily["remaining_usd"]) == Decimal(5) - cost

        # Another key of the same tenant sees its own spend, not this one's.
        other = await _info(client, OTHER_KEY)
        assert other["name"] == theirs and other["spend"]["today"]["requests"] == 0
        assert other["limits"] == [fresh["limits"][1]]  # only the tenant's


async def test_a_key_made_at_run_time_shows_when_it_expires(
    mock_server: MockServer, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        name = f"temp-{uuid.uuid4().hex[:8]}"
        made = await client.post(
            "/admin/keys", json={"name": name, "tenant": "t", "expires_in_s": 3600}
        )
        assert made.status_code in (200, 201), made.text
        info = await _info(client, made.json()["key"])
        assert info["name"] == name and info["source"] == "runtime"
        assert info["expires_at"] is not None and info["expires_at"].endswith("+00:00")


async def test_no_key_no_answer(mock_server: MockServer, redis_url: str) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        for headers in ({"authorization": ""}, auth("sk-nobody")):
            refused = await client.get("/v1/key", headers=headers)
            assert refused.status_code == 401 and "error" in refused.json()


async def test_a_key_made_with_its_own_limits_and_budget_is_held_to_them(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    """LiteLLM's /key/generate with rpm_limit and max_budget: the key's own quota and
    budget replace the configured per-key ones (here: none at all), on every replica
    that looks it up, and the key sees them in /v1/key."""
    args = gateway_args(
        mock_server.base_url,
        redis_url,
        cost={"pricing": {"overrides": {"mock-gpt": PRICE}}, "ledger": {"flush_interval_ms": 50}},
    )
    name = f"own-{uuid.uuid4().hex[:8]}"
    quota = {"name": f"{name}-q", "tenant": name, "limits": [{"window": "1m", "requests": 2}]}
    # 20 tokens at $2,000/M: ~$0.046 held a call, ~$0.03 spent: one call fits $0.05.
    budget = {"name": f"{name}-b", "tenant": name, "budget": {"daily_usd": "0.05"}}
    body = {"model": "mock-gpt", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    async with in_process(Gateway(args), LOCAL_KEY) as admin:
        made = {}
        for spec in (quota, budget):
            answer = await admin.post("/admin/keys", json=spec)
            assert answer.status_code in (200, 201), answer.text
            made[spec["name"]] = answer.json()
        assert made[quota["name"]]["limits"][0]["requests"] == 2
        assert made[budget["name"]]["budget"] == {"daily_usd": "0.05", "monthly_usd": None}

        async with in_process(Gateway(args), LOCAL_KEY) as replica:  # another replica
            limited = {"authorization": f"Bearer {made[quota['name']]['key']}"}
            answers = [
                await replica.post("/v1/chat/completions", json=body, headers=limited)
                for _ in range(3)
            ]
            assert [a.status_code for a in answers] == [200, 200, 429], answers[-1].text
            assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
            assert answers[0].headers["x-ratelimit-limit-requests"] == "2"

            budgeted = {"authorization": f"Bearer {made[budget['name']]['key']}"}
            first = await replica.post("/v1/chat/completions", json=body, headers=budgeted)
            second = await replica.post("/v1/chat/completions", json=body, headers=budgeted)
            assert first.status_code == 200 and second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "insufficient_quota"

            info = await _info(replica, made[quota["name"]]["key"])
            assert info["limits"] == [
                {"scope": "key", "subject": quota["name"], "window": "1m", "requests": 2,
                 "tokens": None, "shadow": False}
            ]  # fmt: skip
            (shown,) = (await _info(replica, made[budget["name"]]["key"]))["budgets"]
            assert shown["limit_usd"] == "0.05" and Decimal(shown["spent_usd"]) > 0

        listed = await admin.get("/admin/keys")
        (row,) = [k for k in listed.json()["data"] if k["name"] == quota["name"]]
        assert row["limits"][0]["window"] == 60 and row["budget"] is None
        refused = await admin.post(
            "/admin/keys", json={**quota, "name": f"{name}-x", "limits": [{"window": "1m"}]}
        )
        assert refused.status_code == 400, refused.text  # a quota that limits nothing


async def test_a_key_made_at_run_time_is_changed_in_place(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    """LiteLLM's /key/update: PATCH replaces the fields it names, keeps the secret, and
    every replica (here: one that has already used the key) applies it as announced."""
    args = gateway_args(mock_server.base_url, redis_url)
    name = f"patched-{uuid.uuid4().hex[:8]}"
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "x"}]}
    async with in_process(Gateway(args), LOCAL_KEY) as admin:
        made = await admin.post("/admin/keys", json={"name": name, "tenant": name})
        assert made.status_code == 201, made.text
        key = {"authorization": f"Bearer {made.json()['key']}"}
        async with in_process(Gateway(args), LOCAL_KEY) as replica:
            assert (await replica.post("/v1/chat/completions", json=body, headers=key)).is_success
            change = {
                "models": ["mock-embed"],
                "limits": [{"window": "1h", "requests": 10}],
                "budget": {"monthly_usd": "3"},
                "expires_in_s": 3600,
            }
            patched = await admin.patch(f"/admin/keys/{name}", json=change)
            assert patched.status_code == 200, patched.text
            assert patched.json()["models"] == ["mock-embed"] and patched.json()["expires_ms"]
            for _ in range(250):  # the announcement reaches the other replica
                refused = await replica.post("/v1/chat/completions", json=body, headers=key)
                if refused.status_code == 404:
                    break
                await asyncio.sleep(0.02)
            assert refused.status_code == 404  # mock-gpt is no longer among its models
            info = await _info(replica, made.json()["key"])
            assert info["models"] == ["mock-embed"] and info["expires_at"] is not None
            assert [(q["window"], q["requests"]) for q in info["limits"]] == [("1h", 10)]
            assert [(b["period"], b["limit_usd"]) for b in info["budgets"]] == [("monthly", "3")]

            cleared = await admin.patch(
                f"/admin/keys/{name}", json={"models": None, "budget": None, "expires_in_s": None}
            )
            assert cleared.status_code == 200, cleared.text
            row = cleared.json()
            assert row["models"] is None and row["budget"] is None and row["expires_ms"] is None
            assert row["limits"][0]["requests"] == 10  # not named: kept

        for path, change, status in (
            (f"/admin/keys/{name}", {"models": ["nope"]}, 400),
            (f"/admin/keys/{name}", {"tenant": "other"}, 400),  # not a field a change sets
            ("/admin/keys/no-such-key", {"user": "u"}, 404),
            ("/admin/keys/local", {"user": "u"}, 400),  # configured in config.yaml
        ):
            answer = await admin.patch(path, json=change)
            assert answer.status_code == status, (path, change, answer.text)


async def test_a_run_time_keys_own_budget_is_in_the_runway_recommendations(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    args = gateway_args(
        mock_server.base_url,
        redis_url,
        cost={"pricing": {"overrides": {"mock-gpt": PRICE}}, "ledger": {"flush_interval_ms": 50}},
    )
    name = f"runway-{uuid.uuid4().hex[:8]}"
    # 7 prompt tokens at $1,000/M and 8 answer tokens (the mock writes max_tokens words,
    # up to 8) at $2,000/M: $0.023, held and spent. One call spends the whole budget, so
    # at any time of day it runs out before the day ends.
    spec = {"name": name, "tenant": name, "budget": {"daily_usd": "0.023"}}
    body = {"model": "mock-gpt", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    async with in_process(Gateway(args), LOCAL_KEY) as admin:
        made = (await admin.post("/admin/keys", json=spec)).json()
        key = made["key"]
        answer = await admin.post("/v1/chat/completions", json=body, headers=auth(key))
        assert answer.status_code == 200, answer.text
        assert Decimal(answer.headers["x-request-cost"]) == Decimal("0.023")
        await _spent_today(admin, key, 1)
        found = (await admin.get("/v1/cost/recommendations")).json()["recommendations"]
        runway = [r for r in found if r["rule"] == "budget_runway"]
        assert [r["subject"] for r in runway if name in r["subject"]] == [f"key:{name}:daily"]
