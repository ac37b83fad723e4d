"""The exact tier against a real Redis: TTL, namespaces, controls, admin, outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import MaxConnectionsError

from deployments.cache_policy import CachePolicySettings, decide, parse_controls
from deployments.exact_cache import ExactCache, ExactCacheSettings, is_complete_embedding
from deployments.request_key import RequestKey, request_key
from serve_app.embedded_store import free_port
from serve_app.errors import StoreUnavailableError

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}], "temperature": 0}
BODY = orjson.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}
        ],
    }
)


def rkey(namespace: str = "t/acme", request: dict | None = None) -> RequestKey:
    return request_key(request or REQUEST, namespace=namespace)


@pytest.fixture
async def cache(redis_client: aioredis.Redis) -> ExactCache:
    return ExactCache(redis_client, ExactCacheSettings())


@pytest.mark.integration
async def test_miss_then_store_then_hit(cache: ExactCache) -> None:
    key = rkey()
    assert await cache.lookup(key) is None
    assert await cache.store(key, BODY, ttl_s=60)
    hit = await cache.lookup(key)
    assert hit is not None and hit.body == BODY and hit.age_s == 0 and hit.digest == key.digest
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.stores, stats.entries) == (1, 1, 1, 1)
    assert stats.entry_bytes > len(BODY) and stats.used_memory > 0


@pytest.mark.integration
async def test_entries_expire_with_their_ttl(
    cache: ExactCache, redis_client: aioredis.Redis
) -> None:
    key = rkey()
    await cache.store(key, BODY, ttl_s=30)
    ttl_ms = await redis_client.pttl(cache.entry_key(key.namespace, key.digest))
    assert 29_000 < ttl_ms <= 30_000
    await redis_client.pexpire(cache.entry_key(key.namespace, key.digest), 1)
    await asyncio.sleep(0.01)  # let the server's own clock pass the expiry
    assert await cache.lookup(key) is None


@pytest.mark.integration
async def test_max_age_refuses_older_entries(
    cache: ExactCache, redis_client: aioredis.Redis
) -> None:
    key = rkey()
    await cache.store(key, BODY, ttl_s=60)
    entry = cache.entry_key(key.namespace, key.digest)
    stored = int(await redis_client.hget(entry, "t"))
    await redis_client.hset(entry, "t", stored - 20_000)  # stored 20 s ago
    assert await cache.lookup(key, max_age_s=10) is None
    hit = await cache.lookup(key, max_age_s=30)
    assert hit is not None and 20 <= hit.age_s <= 21


@pytest.mark.integration
async def test_same_prompt_under_two_tenants_never_collides(cache: ExactCache) -> None:
    acme, globex = rkey("t/acme"), rkey("t/globex")
    await cache.store(acme, BODY, ttl_s=60)
    assert await cache.lookup(globex) is None
    assert await cache.lookup(acme) is not None


@pytest.mark.integration
async def test_shared_namespace_is_shared_only_when_configured(cache: ExactCache) -> None:
    shared = CachePolicySettings(shared_namespaces=("faq",))
    controls = parse_controls({"namespace": "faq"})
    ns_a = decide(REQUEST, controls, "acme", shared).namespace
    ns_b = decide(REQUEST, controls, "globex", shared).namespace
    await cache.store(rkey(ns_a), BODY, ttl_s=60)
    assert await cache.lookup(rkey(ns_b)) is not None
    isolated = CachePolicySettings()
    assert decide(REQUEST, controls, "globex", isolated).namespace != ns_a


@pytest.mark.integration
async def test_hostile_namespace_is_contained(cache: ExactCache) -> None:
    hostile, other = rkey("t/*"), rkey("t/acme")
    await cache.store(hostile, BODY, ttl_s=60)
    await cache.store(other, BODY, ttl_s=60)
    assert await cache.delete_namespace("t/*") == 1
    assert await cache.lookup(other) is not None


@pytest.mark.integration
async def test_only_complete_answers_are_stored(cache: ExactCache) -> None:
    key = rkey()
    error = orjson.dumps({"error": {"message": "rate limited", "code": "429"}})
    unfinished = BODY.replace(b'"finish_reason":"stop"', b'"finish_reason":null')
    for body in (error, unfinished, b"not json"):
        assert not await cache.store(key, body, ttl_s=60)
    assert await cache.lookup(key) is None


@pytest.mark.integration
async def test_admin_delete_by_key_namespace_and_flush(cache: ExactCache) -> None:
    a, b, c = rkey("t/acme"), rkey("t/acme", {**REQUEST, "seed": 1}), rkey("t/globex")
    for key in (a, b, c):
        await cache.store(key, BODY, ttl_s=60)
    assert await cache.delete("t/acme", a.digest)
    assert await cache.lookup(a) is None and await cache.lookup(b) is not None
    assert await cache.delete_namespace("t/acme") == 1
    assert await cache.lookup(c) is not None
    await cache.record("t/globex", "semantic_hits")
    await cache.record("t/globex", "guard_rejections", 2)
    globex = await cache.stats("t/globex")
    assert (globex.semantic_hits, globex.guard_rejections, globex.entries) == (1, 2, 1)
    assert await cache.flush() == 1
    stats = await cache.stats()
    assert (stats.entries, stats.hits, stats.semantic_hits) == (0, 0, 0)


@pytest.fixture
async def dead_redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    yield client
    await client.aclose()


async def test_redis_down_is_a_miss_and_stores_are_skipped(dead_redis: aioredis.Redis) -> None:
    now = [0.0]
    cache = ExactCache(dead_redis, ExactCacheSettings(down_backoff_s=5), clock=lambda: now[0])
    key = rkey()
    assert await cache.lookup(key) is None
    assert not await cache.store(key, BODY, ttl_s=60)
    assert cache._down_until == 5.0  # backing off: no further connection attempts
    now[0] = 6.0
    assert await cache.lookup(key) is None
    with pytest.raises(StoreUnavailableError):
        await cache.stats()


async def test_slow_redis_is_a_miss_without_backing_off(dead_redis: aioredis.Redis) -> None:
    cache = ExactCache(dead_redis, ExactCacheSettings(op_timeout_s=0.01), clock=lambda: 0.0)

    async def slow(**_: object) -> None:
        await asyncio.Event().wait()  # never answers: the op timeout must cut it

    async def overloaded(**_: object) -> None:
        raise MaxConnectionsError("Too many connections")

    for script in (slow, overloaded):
        cache._lookup = script  # type: ignore[assignment]
        assert await cache.lookup(rkey()) is None
        assert cache._down_until == 0.0


@pytest.mark.parametrize(
    ("answer", "complete"),
    [
        ({"object": "list", "data": [{"object": "embedding", "embedding": [0.1, 0.2]}]}, True),
        ({"object": "list", "data": [{"object": "embedding", "embedding": "AAAAPw=="}]}, True),
        ({"object": "list", "data": []}, False),
        ({"object": "list", "data": [{"object": "embedding"}]}, False),
        ({"object": "list", "data": [{"embedding": [1]}], "error": {"message": "x"}}, False),
        ({"object": "chat.completion", "data": [{"embedding": [1]}]}, False),
        ([1, 2], False),
    ],
)
def test_an_embeddings_answer_is_complete_with_a_vector_for_every_input(
    answer: object, complete: bool
) -> None:
    assert is_complete_embedding(answer) is complete
