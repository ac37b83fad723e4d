"""The ingress in process (no Ray): the chat route's fast path, mounted under a
prefix as Serve mounts it, answers and renders errors like the routed app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import httpx
import orjson
import pytest

from deployments.provider import ProviderClient, UpstreamResponse
from serve_app.errors import InvalidRequestError
from serve_app.ingress import Gateway, spend_tags
from serve_app.settings import GatewayArgs, hash_key
from tests.support import in_process

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)


class CannedTransport:
    def __init__(self) -> None:
        self.calls = 0

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        self.calls += 1
        return UpstreamResponse(200, {}, ANSWER)

    async def aclose(self) -> None:
        pass


@pytest.mark.integration
async def test_chat_fast_path_under_a_prefix(redis_url: str) -> None:
    args = GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [{"name": "m", "upstream": "u"}],
            "api_keys": [{"name": "k", "key_sha256": hash_key("sk-k")}],
            "store": {"url": redis_url},
        }
    )
    transport = CannedTransport()
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": transport}))
    await gateway.start()
    app = gateway.asgi()
    try:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, root_path="/gw"),
            base_url="http://gw",
            headers={"authorization": "Bearer sk-k"},
        )
        chat = "/gw/v1/chat/completions"
        ok = await client.post(
            chat, json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "hi"
        assert ok.headers["x-request-id"] and ok.headers["x-cache"] == "BYPASS"
        bad = await client.post(chat, content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert app.middleware_stack is None  # the router never ran: the fast path did
        wrong_method = await client.get(chat)
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        assert transport.calls == 1
        await client.aclose()
    finally:
        await gateway.aclose()


@pytest.mark.integration
async def test_a_key_sees_and_calls_only_the_models_it_is_allowed(redis_url: str) -> None:
    args = GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [
                {"name": "m", "upstream": "u"},
                {"name": "dear", "upstream": "u"},
                {"name": "e", "upstream": "u", "kind": "embeddings"},
            ],
            "api_keys": [
                {"name": "k", "key_sha256": hash_key("sk-k"), "models": ["m"]},
                {"name": "all", "key_sha256": hash_key("sk-all")},
            ],
            "store": {"url": redis_url},
        }
    )
    transport = CannedTransport()
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": transport}))
    async with in_process(gateway, "sk-k") as client:
        ask = {"messages": [{"role": "user", "content": "x"}]}
        assert (await client.post("/v1/chat/completions", json={**ask, "model": "m"})).is_success
        for model, route, body in (
            ("dear", "/v1/chat/completions", ask),
            ("e", "/v1/embeddings", {"input": "x"}),
            ("nope", "/v1/chat/completions", ask),
        ):
            refused = await client.post(route, json={**body, "model": model})
            assert refused.status_code == 404, refused.text
            error = refused.json()["error"]
            assert error["code"] == "model_not_found"  # as for a model that does not exist
            assert error["message"] == (
                f"The model '{model}' does not exist or you do not have access to it."
            )
        listed = await client.get("/v1/models")
        assert [m["id"] for m in listed.json()["data"]] == ["m"]
        assert (await client.get("/v1/models/dear")).status_code == 404
        assert (await client.get("/v1/models/m")).status_code == 200
        every = await client.get("/v1/models", headers={"authorization": "Bearer sk-all"})
        assert [m["id"] for m in every.json()["data"]] == ["m", "dear", "e"]
    assert transport.calls == 1


@pytest.mark.integration
async def test_a_model_is_retrieved_by_name_slashes_and_all(redis_url: str) -> None:
    args = GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [{"name": "m", "upstream": "u"}, {"name": "org/m-2", "upstream": "u"}],
            "api_keys": [{"name": "k", "key_sha256": hash_key("sk-k")}],
            "store": {"url": redis_url},
        }
    )
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": CannedTransport()}))
    await gateway.start()
    try:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.asgi()), base_url="http://gw"
        )
        key = {"authorization": "Bearer sk-k"}
        for name in ("m", "org/m-2"):
            found = await client.get(f"/v1/models/{name}", headers=key)
            assert found.status_code == 200
            assert found.json() == {
                "id": name, "object": "model", "created": 0, "owned_by": "llm-gateway"
            }  # fmt: skip
        missing = await client.get("/v1/models/nope", headers=key)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert (await client.get("/v1/models/m")).status_code == 401
        await client.aclose()
    finally:
        await gateway.aclose()


class StalledSemantic:
    """A semantic tier that never answers (its replica died and a new one is still
    loading its model), fails outright, or answers a miss at once."""

    def __init__(self, fail: bool = False, stalled: bool = True) -> None:
        self.fail, self.stalled = fail, stalled
        self.checks = self.stores = 0
        self.asked = asyncio.Event()
        self.max_ages: list[float | None] = []
        self.ttls: list[float | None] = []

    async def check(
        self, scope: str, text: str, namespace: str, max_age_s: float | None = None
    ) -> None:
        self.checks += 1
        self.max_ages.append(max_age_s)
        self.asked.set()
        if self.fail:
            raise RuntimeError("replica died")
        if self.stalled:
            await asyncio.Event().wait()

    async def store(
        self, scope: str, text: str, namespace: str, body: bytes, ttl: float | None = None
    ) -> None:
        self.stores += 1
        self.ttls.append(ttl)

    async def invalidate_namespace(self, namespace: str | None) -> int:
        return 0


@contextlib.asynccontextmanager
async def serving(
    redis_url: str, semantic: StalledSemantic, **cache: object
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient, CannedTransport]]:
    """A started in-process gateway with ``semantic`` as its semantic tier, and a client."""
    args = GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [{"name": "m", "upstream": "u"}],
            "api_keys": [{"name": "k", "key_sha256": hash_key("sk-k")}],
            "store": {"url": redis_url},
            "semantic_cache": cache,
        }
    )
    transport = CannedTransport()
    provider = ProviderClient(args.upstreams, {"u": transport})
    gateway = Gateway(args, provider=provider, semantic=semantic)
    async with in_process(gateway, "sk-k") as client:
        yield gateway, client, transport


def ask(client: httpx.AsyncClient, text: str, **extra: object) -> Awaitable[httpx.Response]:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]}
    return client.post("/v1/chat/completions", json={**body, **extra})


@pytest.mark.integration
@pytest.mark.parametrize("fail", [False, True])
async def test_a_stalled_semantic_tier_is_a_miss_after_its_timeout(
    redis_url: str, redis_client: object, fail: bool
) -> None:
    semantic = StalledSemantic(fail)
    async with serving(redis_url, semantic, lookup_timeout_s=0.2) as (_, client, transport):
        started = time.perf_counter()
        answered = await asyncio.wait_for(ask(client, "x"), timeout=5)
        waited = time.perf_counter() - started
        assert answered.status_code == 200 and answered.headers["x-cache"] == "MISS"
        assert semantic.checks == 1 and transport.calls == 1
        assert waited < 1.0 if fail else 0.2 <= waited < 1.0
        await asyncio.sleep(0.05)
        # Still stored: a hot prompt's first answer is the tier's one chance at it (its
        # repeats are exact hits), and first answers come in a burst, when it is busiest.
        assert semantic.stores == 1


@pytest.mark.integration
async def test_lookups_past_the_concurrency_limit_are_misses_at_once(
    redis_url: str, redis_client: object
) -> None:
    semantic = StalledSemantic()
    cache = {"lookup_timeout_s": 0.3, "max_concurrent_lookups": 1}
    async with serving(redis_url, semantic, **cache) as (_, client, _transport):

        async def timed(text: str) -> float:
            started = time.perf_counter()
            assert (await ask(client, text)).status_code == 200
            return time.perf_counter() - started

        waits = sorted(await asyncio.gather(timed("one"), timed("two")))
        assert semantic.checks == 1  # the second never reached the tier
        assert waits[0] < 0.2 <= 0.3 <= waits[1]


@pytest.mark.integration
async def test_a_completed_lookup_is_followed_by_a_store(
    redis_url: str, redis_client: object
) -> None:
    semantic = StalledSemantic(stalled=False)
    async with serving(redis_url, semantic) as (_, client, _transport):
        assert (await ask(client, "x")).headers["x-cache"] == "MISS"
        await asyncio.sleep(0.05)
        assert (semantic.checks, semantic.stores) == (1, 1)


@pytest.mark.integration
async def test_a_client_gone_mid_lookup_does_not_shrink_the_limit(
    redis_url: str, redis_client: object
) -> None:
    semantic = StalledSemantic()
    cache = {"lookup_timeout_s": 5, "max_concurrent_lookups": 4}
    async with serving(redis_url, semantic, **cache) as (gateway, client, _transport):
        # A streamed request looks up in its own task (a plain one, inside its single
        # flight, which outlives a caller that leaves).
        asking = asyncio.create_task(ask(client, "gone", stream=True))
        limit = gateway.pipeline.semantic_limit
        await semantic.asked.wait()
        assert limit.in_flight == 1
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        assert (limit.in_flight, limit.limit) == (0, 4)


@pytest.mark.integration
async def test_the_semantic_tier_reads_a_request_as_the_exact_tier_does(
    redis_url: str, redis_client: object
) -> None:
    """A request's ``max-age`` bounds the age of a semantic hit too, and its cache
    lifetime (``cache.ttl``, else the policy's ``default_ttl_s``) that of what it stores:
    the semantic tier kept every answer its own ``ttl_s`` (a day) and served it to
    any ``max-age``."""
    semantic = StalledSemantic(stalled=False)
    async with serving(redis_url, semantic) as (_, client, _transport):
        plain = await ask(client, "how old may it be?")
        young = await client.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "temperature": 0,
                "messages": [{"role": "user", "content": "only a young answer"}],
                "cache": {"ttl": 60},
            },
            headers={"cache-control": "max-age=5"},
        )
        assert plain.status_code == young.status_code == 200
        async with asyncio.timeout(5):
            while semantic.stores < 2:  # noqa: ASYNC110 (stored in the background)
                await asyncio.sleep(0.01)
        assert semantic.max_ages == [None, 5]
        assert semantic.ttls == [3600, 60]


def rooted(redis_url: str, **config: Any) -> GatewayArgs:
    """Upstream "u" serving model "m", and one admin key, "sk-root"."""
    return GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [{"name": "m", "upstream": "u"}],
            "api_keys": [{"name": "root", "key_sha256": hash_key("sk-root"), "admin": True}],
            "store": {"url": redis_url},
            **config,
        }
    )


@pytest.mark.integration
async def test_a_key_created_at_run_time_works_at_once_and_stops_when_revoked(
    redis_client: object,
    redis_url: str,  # redis_client: a flushed store
) -> None:
    models = [{"name": "m", "upstream": "u"}, {"name": "dear", "upstream": "u"}]
    args = rooted(redis_url, models=models)
    transport = CannedTransport()
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": transport}))
    async with in_process(gateway, "sk-root") as admin:
        made = await admin.post(
            "/admin/keys", json={"name": "team-a", "tenant": "a", "models": ["m"]}
        )
        assert made.status_code == 201, made.text
        secret = made.json()["key"]
        assert made.json()["source"] == "runtime" and made.json()["admin"] is False
        team = {"authorization": f"Bearer {secret}"}
        ask = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        answer = await admin.post("/v1/chat/completions", json=ask, headers=team)
        assert answer.status_code == 200, answer.text
        listed = await admin.get("/v1/models", headers=team)
        assert [m["id"] for m in listed.json()["data"]] == ["m"]
        denied = await admin.get("/admin/keys", headers=team)
        assert denied.status_code == 403  # a created key is never an admin key
        again = await admin.post("/admin/keys", json={"name": "team-a"})
        assert (again.status_code, again.json()["error"]["code"]) == (409, "key_exists")
        bad = await admin.post("/admin/keys", json={"name": "has space"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
        keys = (await admin.get("/admin/keys")).json()["data"]
        expected = [("root", "config"), ("team-a", "runtime")]
        assert [(k["name"], k["source"]) for k in keys] == expected
        assert all("key" not in k for k in keys)  # no secret is ever shown again
        brief = await admin.post("/admin/keys", json={"name": "brief", "expires_in_s": 0.2})
        brief_key = {"authorization": f"Bearer {brief.json()['key']}"}
        assert (await admin.post("/v1/chat/completions", json=ask, headers=brief_key)).is_success
        await asyncio.sleep(0.3)
        late = await admin.post("/v1/chat/completions", json=ask, headers=brief_key)
        assert (late.status_code, late.json()["error"]["code"]) == (401, "expired_api_key")
        listed = {k["name"]: k for k in (await admin.get("/admin/keys")).json()["data"]}
        assert listed["brief"]["expired"] is True and listed["team-a"]["expired"] is False
        rotated = await admin.post("/admin/keys/team-a/rotate")
        assert rotated.status_code == 200 and rotated.json()["models"] == ["m"]
        stale = await admin.post("/v1/chat/completions", json=ask, headers=team)
        assert stale.status_code == 401  # the old secret stops at once
        team = {"authorization": f"Bearer {rotated.json()['key']}"}
        assert (await admin.post("/v1/chat/completions", json=ask, headers=team)).is_success
        gone = await admin.delete("/admin/keys/team-a")
        assert gone.status_code == 200 and gone.json() == {"name": "team-a", "revoked": True}
        refused = await admin.post("/v1/chat/completions", json=ask, headers=team)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
        assert (await admin.delete("/admin/keys/team-a")).status_code == 404
        assert (await admin.delete("/admin/keys/root")).status_code == 400
    assert transport.calls == 3  # team-a twice (before and after rotation), brief once


@pytest.mark.integration
async def test_budgets_put_at_run_time_reach_every_replica(
    redis_client: object,
    redis_url: str,  # redis_client: a flushed store
) -> None:
    price = {"m": {"input_per_mtok": 1, "output_per_mtok": 1}}
    args = rooted(redis_url, cost={"pricing": {"overrides": price}})

    def replica() -> Gateway:
        return Gateway(args, provider=ProviderClient(args.upstreams, {"u": CannedTransport()}))

    async with in_process(replica(), "sk-root") as one, in_process(replica(), "sk-root") as two:
        secret = (await one.post("/admin/keys", json={"name": "team-a"})).json()["key"]
        team = {"authorization": f"Bearer {secret}"}
        ask = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}
        assert (await two.post("/v1/chat/completions", json=ask, headers=team)).is_success
        budgets = {"keys": {"team-a": {"daily_usd": "0.000001"}}}  # less than one call's hold
        put = await one.put("/admin/budgets", json=budgets)
        assert put.status_code == 200 and put.json()["keys"]["team-a"]["daily_usd"] == "0.000001"
        bad = await one.put("/admin/budgets", json={"keys": {"team-a": {"daily_usd": "x"}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("keys")
        # Past what a budget is counted in (picodollar Decimals): refused, not a 500 later.
        huge = await one.put("/admin/budgets", json={"default_tenant": {"monthly_usd": "1e17"}})
        assert huge.status_code == 400 and huge.json()["error"]["param"].startswith(
            "default_tenant"
        )
        key = {"name": "huge", "budget": {"daily_usd": "1e400"}}
        assert (await one.post("/admin/keys", json=key)).status_code == 400

        async def refused_on_two() -> bool:
            answer = await two.post("/v1/chat/completions", json=ask, headers=team)
            return answer.status_code == 429 and answer.json()["error"]["code"] == (
                "insufficient_quota"
            )

        for _ in range(50):  # announced: applied on the other replica at once
            if await refused_on_two():
                break
            await asyncio.sleep(0.05)
        assert await refused_on_two()
        assert (await two.get("/admin/budgets")).json()["keys"]["team-a"]["daily_usd"] == "0.000001"
        reset = await two.delete("/admin/budgets")  # back to config.yaml's: none
        assert reset.status_code == 200 and reset.json()["keys"] == {}
        for _ in range(50):
            if (await one.post("/v1/chat/completions", json=ask, headers=team)).is_success:
                break
            await asyncio.sleep(0.05)
        assert (await one.post("/v1/chat/completions", json=ask, headers=team)).is_success


@pytest.mark.parametrize(
    ("header", "tags"),
    [
        (None, ()),
        ("", ()),
        ("search", ("search",)),
        (" search , env=prod,search,, team/a ", ("search", "env=prod", "team/a")),
    ],
)
def test_spend_tags_are_read_from_their_header(header: str | None, tags: tuple[str, ...]) -> None:
    assert spend_tags(header) == tags


ELEVEN_TAGS = ",".join(f"t{i}" for i in range(11))


@pytest.mark.parametrize("header", ["has space", "x" * 65, ELEVEN_TAGS, "é"])
def test_bad_spend_tags_are_a_400_naming_the_header(header: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        spend_tags(header)
    assert refused.value.param == "x-gateway-tags"


@pytest.mark.integration
async def test_a_tenant_allowlist_bounds_every_key_of_the_tenant(redis_url: str) -> None:
    """LiteLLM's team models: a tenant's list applies to its keys, configured or made at
    run time; a key's own list narrows it further, never widens it."""
    args = GatewayArgs.model_validate(
        {
            "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
            "models": [
                {"name": "cheap", "upstream": "u"},
                {"name": "dear", "upstream": "u"},
                {"name": "open/*", "upstream": "u"},
            ],
            "api_keys": [
                {"name": "admin", "key_sha256": hash_key("sk-admin"), "admin": True},
                {"name": "team", "key_sha256": hash_key("sk-team"), "tenant": "interns"},
                {
                    "name": "wide",
                    "key_sha256": hash_key("sk-wide"),
                    "tenant": "interns",
                    "models": ["dear", "cheap"],
                },
            ],
            "tenants": {"interns": {"models": ["cheap", "open/*"]}},
            "store": {"url": redis_url},
        }
    )
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": CannedTransport()}))
    async with in_process(gateway, "sk-admin") as client:
        made = await client.post(
            "/admin/keys", json={"name": f"rt-{time.time_ns()}", "tenant": "interns"}
        )
        assert made.status_code in (200, 201), made.text
        ask = {"messages": [{"role": "user", "content": "x"}]}
        for key in ("sk-team", "sk-wide", made.json()["key"]):
            listed = await client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            assert [m["id"] for m in listed.json()["data"]] == ["cheap"], key
            for model, status in (("cheap", 200), ("dear", 404), ("open/x", 200)):
                if key == "sk-wide" and model == "open/x":
                    status = 404  # its own list names no wildcard
                got = await client.post(
                    "/v1/chat/completions",
                    json={**ask, "model": model},
                    headers={"authorization": f"Bearer {key}"},
                )
                assert got.status_code == status, (key, model, got.text)
        admin = await client.get("/v1/models")  # another tenant: no list
        assert [m["id"] for m in admin.json()["data"]] == ["cheap", "dear"]


def test_a_tenant_allowlist_must_name_models() -> None:
    with pytest.raises(ValueError, match="tenant 'x' allows models \\['nope'\\]"):
        GatewayArgs.model_validate(
            {
                "upstreams": {"u": {"base_url": "http://upstream.invalid/v1"}},
                "models": [{"name": "m", "upstream": "u"}],
                "api_keys": [{"name": "k", "key_sha256": hash_key("sk-k")}],
                "tenants": {"x": {"models": ["nope"]}},
            }
        )


async def test_odd_digits_and_bad_admin_bodies_get_a_400_or_are_ignored(redis_url: str) -> None:
    """str.isdigit() takes '²', which int() refuses, as it refuses 5,000 digits: such a
    number is malformed (a 400 naming it, or an ignored Cache-Control directive) or,
    overlong, as large as can be, never a 500."""
    args = rooted(redis_url)
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": CannedTransport()}))
    async with in_process(gateway, "sk-root") as client:
        ask = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        long = "9" * 5000  # int() refuses over 4,300 digits
        for header in ("max-age=²".encode(), f"max-age={long}"):
            answer = await client.post(
                "/v1/chat/completions", json=ask, headers={"cache-control": header}
            )
            assert answer.status_code == 200, answer.text
        too_long = await client.post(
            "/v1/chat/completions", content=b"{}", headers={"content-length": long}
        )
        assert too_long.status_code == 413, too_long.text
        for path, param in (
            ("/admin/audit?limit=%C2%B2", "limit"),
            ("/v1/cost/recommendations?days=%C2%B2", "days"),
            (f"/admin/audit?limit={long}", "limit"),
            (f"/v1/cost/recommendations?days={long}", "days"),
            ("/v1/cost/recommendations?days=99999999999", "days"),
            ("/v1/cost/recommendations?days=0", "days"),
        ):
            refused = await client.get(path)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param
        for body, param in ((b"{not json", None), (b'{"name": 3}', "name"), (b"[]", None)):
            refused = await client.post("/admin/breakers/open", content=body)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == param


async def test_a_body_nested_deeper_than_can_be_sent_is_a_400(redis_url: str) -> None:
    """orjson reads 1,024 levels but writes ~250: such a body can never go upstream."""
    args = rooted(redis_url)
    upstream = CannedTransport()
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": upstream}))

    def nested(depth: int) -> Any:
        value: Any = "x"
        for _ in range(depth):
            value = {"a": [value]}
        return value

    async with in_process(gateway, "sk-root") as client:
        ask = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        for field, value in (
            ("tools", [{"type": "function", "function": {"name": "f", "parameters": nested(150)}}]),
            ("response_format", {"type": "json_schema", "json_schema": nested(150)}),
        ):
            refused = await client.post("/v1/chat/completions", json={**ask, field: value})
            assert refused.status_code == 400, refused.text
            assert "nested too deeply" in refused.json()["error"]["message"]
        output = {"type": "function_call_output", "call_id": "c", "output": nested(400)}
        refused = await client.post("/v1/responses", json={"model": "m", "input": [output]})
        assert refused.status_code == 400, refused.text
        # Deep, but not too deep: passed on.
        shallow = [{"type": "function", "function": {"name": "f", "parameters": nested(100)}}]
        passed = await client.post("/v1/chat/completions", json={**ask, "tools": shallow})
        assert passed.status_code == 200, passed.text


async def test_a_budget_hold_covers_the_tool_definitions_sent(redis_url: str) -> None:
    """The hold is priced with the tools a request defines, as the provider bills them:
    a budget that fits the question alone refuses it with its 40 kB of tools."""
    args = rooted(
        redis_url,
        budgets={"keys": {"root": {"daily_usd": "0.05"}}},  # 5,000 tokens at the price below
        cost={"pricing": {"overrides": {"m": {"input_per_mtok": 10, "output_per_mtok": 10}}}},
    )
    gateway = Gateway(args, provider=ProviderClient(args.upstreams, {"u": CannedTransport()}))
    tools = [{"type": "function", "function": {"name": "lookup", "description": "d" * 40_000}}]
    ask = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 10}
    async with in_process(gateway, "sk-root") as client:
        refused = await client.post("/v1/chat/completions", json={**ask, "tools": tools})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "insufficient_quota"
        assert (await client.post("/v1/chat/completions", json=ask)).status_code == 200
