from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from deployments.exact_cache import ExactCache, ExactCacheSettings
from deployments.near_cache import (
    NearCache,
    NearCacheSettings,
    decode_invalidation,
    encode_invalidation,
)
from deployments.request_key import RequestKey, request_key
from serve_app.embedded_store import free_port
from tests.deployments.test_exact_cache import BODY


class Clocks:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def near(clocks: Clocks, **settings: object) -> NearCache:
    cache = NearCache(
        NearCacheSettings.model_validate(settings),
        clock=lambda: clocks.mono,
        wall=lambda: clocks.wall,
    )
    cache.go_live()
    return cache


def put(cache: NearCache, digest: str = "d", *, age_ms: int = 0, ttl_ms: int = 60_000) -> None:
    cache.put("ns", digest, BODY, age_ms=age_ms, ttl_ms=ttl_ms, generation=cache.generation)


# -- the in-memory tier alone -------------------------------------------------------


def test_a_kept_entry_is_served_with_its_age_until_its_memory_ttl() -> None:
    clocks = Clocks()
    cache = near(clocks, ttl_s=1.0)
    put(cache, age_ms=3_000)
    assert cache.get("ns", "d", None) == (BODY, 3)
    clocks.advance(0.9)
    assert cache.get("ns", "d", None) == (BODY, 3)
    clocks.advance(0.2)
    assert cache.get("ns", "d", None) is None  # past ttl_s: ask Redis again
    assert cache.take_hits() == {"ns": 2}


def test_never_past_the_entrys_redis_ttl_nor_the_requests_max_age() -> None:
    clocks = Clocks()
    cache = near(clocks, ttl_s=5.0)
    put(cache, ttl_ms=300)
    clocks.advance(0.31)
    assert cache.get("ns", "d", None) is None
    put(cache, age_ms=10_000)
    assert cache.get("ns", "d", 9) is None
    assert cache.get("ns", "d", 10) == (BODY, 10)


def test_an_answer_read_before_an_invalidation_is_not_kept() -> None:
    cache = near(Clocks())
    generation = cache.generation  # a Redis lookup starts...
    cache.invalidate("ns", "d")  # ...an admin delete lands meanwhile...
    cache.put("ns", "d", BODY, age_ms=0, ttl_ms=60_000, generation=generation)
    assert cache.get("ns", "d", None) is None  # ...the stale answer was not kept


def test_invalidation_by_entry_namespace_and_everything() -> None:
    cache = near(Clocks())
    for namespace, digest in (("a", "1"), ("a", "2"), ("b", "1")):
        cache.put(namespace, digest, BODY, age_ms=0, ttl_ms=60_000, generation=cache.generation)
    cache.invalidate("a", "1")
    assert cache.get("a", "1", None) is None and cache.get("a", "2", None) is not None
    cache.invalidate("a", None)
    assert cache.get("a", "2", None) is None and cache.get("b", "1", None) is not None
    cache.invalidate(None, None)
    assert cache.get("b", "1", None) is None


def test_off_when_invalidations_may_be_missed_or_when_sized_zero() -> None:
    clocks = Clocks()
    cache = near(clocks)
    put(cache)
    cache.go_dark()
    assert cache.get("ns", "d", None) is None
    put(cache)  # not kept while dark
    cache.go_live()
    assert cache.get("ns", "d", None) is None
    off = near(clocks, entries=0)
    put(off)
    assert off.get("ns", "d", None) is None


def test_least_recently_used_entries_leave_first_and_big_bodies_stay_out() -> None:
    cache = near(Clocks(), entries=2, max_entry_bytes=len(BODY))
    put(cache, "1")
    put(cache, "2")
    assert cache.get("ns", "1", None) is not None
    put(cache, "3")
    assert cache.get("ns", "2", None) is None
    assert cache.get("ns", "1", None) is not None and cache.get("ns", "3", None) is not None
    cache.put("ns", "big", BODY + b" ", age_ms=0, ttl_ms=60_000, generation=cache.generation)
    assert cache.get("ns", "big", None) is None


@pytest.mark.parametrize(
    ("namespace", "digest"), [(None, None), ("t/acme", None), ("t/acme", "abc"), ("", "x")]
)
def test_invalidation_messages_round_trip(namespace: str | None, digest: str | None) -> None:
    assert decode_invalidation(encode_invalidation(namespace, digest)) == (namespace, digest)


# -- two replicas sharing Redis -----------------------------------------------------


def rkey() -> RequestKey:
    request = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}], "temperature": 0}
    return request_key(request, namespace="t/acme")


async def eventually(check: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Another replica's message crosses Redis: poll for its effect, bounded."""
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the invalidation never arrived")


@pytest.fixture
async def replicas(redis_client: aioredis.Redis) -> AsyncIterator[tuple[ExactCache, ExactCache]]:
    # A long memory TTL: only an invalidation can empty the memory within a test.
    settings = ExactCacheSettings(near=NearCacheSettings(ttl_s=60))
    a, b = (ExactCache(redis_client, settings) for _ in range(2))
    for cache in (a, b):
        await cache.start()
    await eventually(lambda: a.near.active and b.near.active)
    yield a, b
    for cache in (a, b):
        await cache.close()


@pytest.mark.integration
async def test_a_hot_entry_is_served_from_memory_and_still_counted(
    replicas: tuple[ExactCache, ExactCache],
) -> None:
    a, b = replicas
    key = rkey()
    assert await a.store(key, BODY, ttl_s=60)
    assert (await b.lookup(key)).body == BODY  # type: ignore[union-attr]

    async def unreachable(**_: object) -> None:
        raise AssertionError("a hot entry must not need Redis")

    b._lookup = unreachable  # type: ignore[assignment]
    for _ in range(5):
        assert (await b.lookup(key)).body == BODY  # type: ignore[union-attr]
    await b.close()  # counts the memory hits into Redis
    assert (await a.stats()).hits == 6


@pytest.mark.integration
async def test_an_admin_delete_on_one_replica_empties_the_others_memory(
    replicas: tuple[ExactCache, ExactCache],
) -> None:
    a, b = replicas
    key = rkey()
    await a.store(key, BODY, ttl_s=60)
    assert await b.lookup(key) is not None  # now in b's memory too
    assert await a.delete(key.namespace, key.digest)
    await eventually(lambda: b.near.get(key.namespace, key.digest, None) is None)
    assert await b.lookup(key) is None
    await a.store(key, BODY, ttl_s=60)
    assert await b.lookup(key) is not None
    await a.flush()
    await eventually(lambda: b.near.get(key.namespace, key.digest, None) is None)
    assert await b.lookup(key) is None


@pytest.mark.integration
async def test_no_memory_tier_without_the_invalidation_channel() -> None:
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    cache = ExactCache(dead, ExactCacheSettings(down_backoff_s=0.05))
    await cache.start()
    await asyncio.sleep(0.2)
    assert not cache.near.active
    await cache.close()
    await dead.aclose()
