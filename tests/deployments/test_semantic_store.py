from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from deployments.semantic_index import SemanticEntry
from deployments.semantic_store import (
    ENTRY_PREFIX,
    Change,
    MemorySemanticStore,
    RedisSemanticStore,
    SemanticStore,
)


def entry(eid: str, ns: str = "t1", ttl: float | None = None) -> SemanticEntry:
    vec = np.arange(4, dtype=np.float32) / 4
    return SemanticEntry(eid, ns, "scope", f"text {eid} é", vec, 1000.5, ttl)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SemanticStore]:
    if request.param == "memory":
        yield MemorySemanticStore()
        return
    client = aioredis.from_url(request.getfixturevalue("redis_url"))  # a sync fixture
    await client.flushdb()
    yield RedisSemanticStore(client, block_ms=50)
    await client.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def capped(request: pytest.FixtureRequest) -> AsyncIterator[SemanticStore]:
    """A store that keeps at most two entries."""
    if request.param == "memory":
        yield MemorySemanticStore(max_entries=2)
        return
    client = aioredis.from_url(request.getfixturevalue("redis_url"))
    await client.flushdb()
    yield RedisSemanticStore(client, block_ms=50, max_entries=2)
    await client.aclose()


async def test_a_store_past_its_cap_evicts_what_expires_soonest(capped: SemanticStore) -> None:
    assert await capped.put(entry("a", ttl=300), b"a") == 0
    assert await capped.put(entry("b", ttl=100), b"b") == 0
    assert await capped.put(entry("c"), b"c") == 1  # never expires: b, sooner than a, goes
    assert await capped.body("b") is None
    assert await capped.put(entry("d", ttl=500), b"d") == 1
    assert sorted([e.id async for e in capped.scan()]) == ["c", "d"]
    assert await capped.put(entry("d", ttl=500), b"d2") == 0  # a rewrite is no newcomer
    # What was deleted, or flushed, no longer counts against the cap.
    assert await capped.delete("c")
    assert await capped.put(entry("e", ttl=50), b"e") == 0
    assert await capped.flush("t1") == 2
    assert await capped.put(entry("f", ttl=50), b"f") == 0
    assert await capped.put(entry("g", ttl=60), b"g") == 0


@pytest.mark.integration
async def test_an_eviction_is_announced_to_every_replica(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    try:
        capped = RedisSemanticStore(client, block_ms=50, max_entries=1)
        mark = await capped.change_mark()
        await capped.put(entry("old", ttl=10), b"x")
        await capped.put(entry("new", ttl=20), b"y")
        changes = []
        async for change in capped.follow(mark):
            changes.append(change)
            if len(changes) == 3:
                break
        assert [(c.op, c.entry_id) for c in changes] == [
            ("add", "old"), ("add", "new"), ("del", "old")
        ]  # fmt: skip
    finally:
        await client.aclose()


async def test_put_load_body_roundtrip(store: SemanticStore) -> None:
    await store.put(entry("a"), b"body-a")
    loaded = await store.load("a")
    assert loaded is not None
    assert (loaded.text, loaded.scope, loaded.namespace, loaded.created) == (
        "text a é",
        "scope",
        "t1",
        1000.5,
    )
    np.testing.assert_array_equal(loaded.vector, entry("a").vector)
    assert await store.body("a") == b"body-a"
    assert await store.body("missing") is None


async def test_delete_flush_and_scan(store: SemanticStore) -> None:
    for eid, ns in (("a", "t1"), ("b", "t1"), ("c", "t2")):
        await store.put(entry(eid, ns), b"x")
    assert await store.delete("a") and not await store.delete("a")
    assert await store.flush("t1") == 1
    assert [e.id async for e in store.scan()] == ["c"]
    assert await store.flush(None) == 1
    assert [e async for e in store.scan()] == []


@pytest.mark.integration
async def test_redis_entry_expires_with_its_ttl(redis_client: aioredis.Redis) -> None:
    store = RedisSemanticStore(redis_client)
    await store.put(entry("a", ttl=30.0), b"x")
    await store.put(entry("b"), b"x")
    assert 29_000 <= await redis_client.pttl(ENTRY_PREFIX + "a") <= 30_000
    assert await redis_client.pttl(ENTRY_PREFIX + "b") == -1


@pytest.mark.integration
async def test_redis_changes_are_followed_from_a_mark(redis_client: aioredis.Redis) -> None:
    store = RedisSemanticStore(redis_client, block_ms=50)
    await store.put(entry("before"), b"x")
    mark = await store.change_mark()
    follow = store.follow(mark)
    await store.put(entry("a"), b"x")
    await store.delete("a")
    await store.flush("t9")
    got = [await anext(follow) for _ in range(3)]
    await follow.aclose()
    assert got == [Change("add", "a", "t1"), Change("del", "a", ""), Change("flush", "", "t9")]


@pytest.mark.integration
async def test_following_outlasts_the_clients_socket_timeout(redis_url: str) -> None:
    """The gateway's store client times reads out at 0.5 s: a blocking read for longer
    failed whenever nothing changed for that long (every 1.5 s on an idle cache)."""
    client = aioredis.from_url(redis_url, socket_timeout=0.5)
    try:
        store = RedisSemanticStore(client)  # the default block, 1 s
        mark = await store.change_mark()
        follow = store.follow(mark)
        waiting = asyncio.ensure_future(anext(follow))
        await asyncio.sleep(1.2)  # idle for longer than the socket timeout
        assert not waiting.done()
        await store.put(entry("late"), b"x")
        change = await asyncio.wait_for(waiting, 2)
        assert (change.op, change.entry_id) == ("add", "late") and change.mark > mark
        await follow.aclose()
    finally:
        await client.aclose()
