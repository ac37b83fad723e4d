from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from deployments.embedder import EmbedderSettings, OnnxEmbedder
from deployments.semantic_cache import SemanticCache, SemanticCacheSettings
from deployments.semantic_store import (
    Change,
    MemorySemanticStore,
    RedisSemanticStore,
    SemanticStore,
)

Q = "How do I convert Fahrenheit to Celsius?"
PARAPHRASE = "How can I convert Fahrenheit to Celsius?"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model() -> OnnxEmbedder:
    return OnnxEmbedder(EmbedderSettings())


def make(
    model: OnnxEmbedder,
    store: SemanticStore | None = None,
    clock: Clock | None = None,
    **cfg: object,
) -> SemanticCache:
    settings = SemanticCacheSettings(**{"distance_threshold": 0.1, **cfg})
    return SemanticCache(settings, model, store or MemorySemanticStore(), clock or Clock())


async def test_a_paraphrase_hits_with_its_similarity(model: OnnxEmbedder) -> None:
    clock = Clock()
    cache = make(model, clock=clock)
    eid = await cache.store("scope", Q, "t1", b"answer")
    clock.now += 5
    hit = await cache.check("scope", PARAPHRASE, "t1")
    assert hit is not None
    assert (hit.body, hit.entry_id, hit.created, hit.cached_text) == (b"answer", eid, 1e6, Q)
    assert 0.9 < hit.similarity < 1.0
    assert await cache.check("scope", "What is the capital of Peru?", "t1") is None
    stats = cache.stats()
    assert (stats.lookups, stats.hits, stats.misses, stats.entries) == (2, 1, 1, 1)


async def test_the_guard_stops_a_near_miss_and_counts_it(model: OnnxEmbedder) -> None:
    cache = make(model, distance_threshold=0.2)
    await cache.store("scope", "convert 100 F to C", "t1", b"37.8")
    assert await cache.check("scope", "convert 100 C to F", "t1") is None
    assert cache.stats().guard_rejections == 1


async def test_same_prompt_under_two_tenants_never_collides(model: OnnxEmbedder) -> None:
    cache = make(model)
    await cache.store("scope", Q, "tenant-a", b"for a")
    assert await cache.check("scope", Q, "tenant-b") is None
    assert await cache.check("scope", PARAPHRASE, "tenant-b") is None
    await cache.store("scope", Q, "tenant-b", b"for b")
    hit_a = await cache.check("scope", Q, "tenant-a")
    hit_b = await cache.check("scope", Q, "tenant-b")
    assert hit_a is not None and hit_b is not None
    assert (hit_a.body, hit_b.body) == (b"for a", b"for b")


async def test_a_different_scope_never_matches(model: OnnxEmbedder) -> None:
    cache = make(model)
    await cache.store("system-prompt-1", Q, "t1", b"x")
    assert await cache.check("system-prompt-2", Q, "t1") is None


async def test_threshold_zero_serves_only_the_identical_text(model: OnnxEmbedder) -> None:
    cache = make(model)
    await cache.store("scope", Q, "t1", b"answer")
    assert await cache.check("scope", PARAPHRASE, "t1", threshold=0) is None
    hit = await cache.check("scope", Q, "t1", threshold=0)
    assert hit is not None and hit.similarity == 1.0
    assert await cache.check("scope", PARAPHRASE, "t1") is not None  # default threshold


async def test_entries_expire_after_their_ttl(model: OnnxEmbedder) -> None:
    clock = Clock()
    cache = make(model, clock=clock, ttl_s=60)
    await cache.store("scope", Q, "t1", b"default ttl")
    await cache.store("scope", "What is a monad?", "t1", b"short ttl", ttl=10)
    clock.now += 10
    assert await cache.check("scope", "What is a monad?", "t1") is None
    assert await cache.check("scope", Q, "t1") is not None
    clock.now += 50
    assert await cache.check("scope", Q, "t1") is None
    assert cache.stats().entries == 0


async def test_entries_nobody_asks_for_again_leave_the_index(model: OnnxEmbedder) -> None:
    """Redis expires entries without telling the replicas: each replica sweeps its own index,
    or a stream of one-off prompts would grow it for as long as the replica lives."""
    clock = Clock()
    cache = make(model, clock=clock, ttl_s=600, sweep_interval_s=0.01)
    await cache.start()
    try:
        await cache.store("scope", Q, "t1", b"a", ttl=60)
        await cache.store("scope", "What is a monad?", "t1", b"b")
        await asyncio.sleep(0.05)
        assert cache.stats().entries == 2
        clock.now += 60
        for _ in range(100):
            if cache.stats().entries == 1:
                break
            await asyncio.sleep(0.01)
        assert cache.stats().entries == 1
        assert await cache.check("scope", "What is a monad?", "t1") is not None
        assert cache.stats().lookups == 1  # no lookup of the expired entry was needed
    finally:
        await cache.stop()


async def test_invalidate_by_id_and_namespace(model: OnnxEmbedder) -> None:
    cache = make(model)
    eid = await cache.store("scope", Q, "t1", b"x")
    await cache.store("scope", Q, "t2", b"y")
    assert eid is not None and await cache.invalidate(eid)
    assert await cache.check("scope", Q, "t1") is None
    assert await cache.invalidate_namespace("t2") == 1
    assert await cache.check("scope", Q, "t2") is None


async def test_long_texts_are_neither_stored_nor_looked_up(model: OnnxEmbedder) -> None:
    cache = make(model, max_text_chars=10)
    assert await cache.store("scope", Q, "t1", b"x") is None
    assert await cache.check("scope", Q, "t1") is None


class DownStore(MemorySemanticStore):
    async def body(self, entry_id: str) -> bytes | None:
        from serve_app.errors import StoreUnavailableError

        raise StoreUnavailableError("down")


async def test_store_down_is_a_miss(model: OnnxEmbedder) -> None:
    cache = make(model, store=DownStore())
    await cache.store("scope", Q, "t1", b"x")
    assert await cache.check("scope", Q, "t1") is None
    assert cache.stats().store_errors == 1


class ObservedStore(RedisSemanticStore):
    """Reports each change once the cache has applied it (it asks for the next one)."""

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client, block_ms=50)
        self.applied: asyncio.Queue[Change] = asyncio.Queue()

    async def follow(self, mark: str) -> AsyncIterator[Change]:
        async for change in super().follow(mark):
            yield change
            self.applied.put_nowait(change)


@pytest.mark.integration
async def test_replicas_rebuild_from_redis_and_follow_changes(
    model: OnnxEmbedder, redis_client: aioredis.Redis
) -> None:
    writer = make(model, store=RedisSemanticStore(redis_client))
    await writer.store("scope", Q, "t1", b"before start")
    observed = ObservedStore(redis_client)
    reader = make(model, store=observed)
    await reader.start()
    try:
        assert reader.stats().entries == 1  # rebuilt from Redis
        hit = await reader.check("scope", PARAPHRASE, "t1")
        assert hit is not None and hit.body == b"before start"

        eid = await writer.store("scope", "What is a monad?", "t1", b"later")
        assert (await asyncio.wait_for(observed.applied.get(), 5)).op == "add"
        assert reader.stats().entries == 2
        assert eid is not None and await writer.invalidate(eid)
        assert (await asyncio.wait_for(observed.applied.get(), 5)).op == "del"
        assert reader.stats().entries == 1
        await writer.invalidate_namespace("t1")
        assert (await asyncio.wait_for(observed.applied.get(), 5)).op == "flush"
        assert reader.stats().entries == 0
    finally:
        await reader.stop()


@pytest.mark.integration
async def test_an_entry_deleted_elsewhere_is_never_served(
    model: OnnxEmbedder, redis_client: aioredis.Redis
) -> None:
    cache = make(model, store=RedisSemanticStore(redis_client))
    eid = await cache.store("scope", Q, "t1", b"x")
    await redis_client.delete("{sc}:e:" + str(eid))  # e.g. expired by Redis's own clock
    assert await cache.check("scope", Q, "t1") is None
    assert cache.stats().entries == 0


class CountingEmbedder:
    def __init__(self, model: OnnxEmbedder) -> None:
        self.model, self.texts = model, []  # type: ignore[var-annotated]

    @property
    def dim(self) -> int:
        return self.model.dim

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return await self.model.embed(texts)

    def covers(self, text: str) -> bool:
        return self.model.covers(text)


async def test_a_miss_stored_moments_later_is_embedded_once(model: OnnxEmbedder) -> None:
    """A miss embeds its text to look it up; storing the answer reuses that vector."""
    counting = CountingEmbedder(model)
    settings = SemanticCacheSettings(distance_threshold=0.1)
    cache = SemanticCache(settings, counting, MemorySemanticStore(), Clock())  # type: ignore[arg-type]
    assert await cache.check("scope", Q, "t1") is None
    await cache.store("scope", Q, "t1", b"answer")
    assert counting.texts == [Q]
    hit = await cache.check("scope", PARAPHRASE, "t1")
    assert hit is not None and hit.body == b"answer"
    assert counting.texts == [Q, PARAPHRASE]


async def test_a_text_longer_than_the_model_reads_is_never_compared(model: OnnxEmbedder) -> None:
    """Past max_length the model's tokens are cut: two questions about one long document
    would get one vector (similarity 1.0), and one's answer would be served to the other."""
    document = (
        "The quarterly report shows revenue growth in the north and flat sales in the south. "
    )
    document *= 20
    asked = document + "Question: what drove growth in the north?"
    other = document + "Question: which products should we discontinue next year, and why?"
    assert not model.covers(asked) and model.covers(Q)
    cache = make(model)
    assert await cache.store("scope", asked, "t1", b"contracts") is None
    assert await cache.check("scope", other, "t1") is None
    assert await cache.check("scope", asked, "t1") is None  # the exact tier serves repeats
    assert cache.stats().entries == 0


class FlakyStore(RedisSemanticStore):
    """Its change stream breaks once, after the first change; records where each
    following started."""

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client, block_ms=50)
        self.marks: list[str] = []
        self.resumed = asyncio.Event()

    async def follow(self, mark: str) -> AsyncIterator[Change]:
        self.marks.append(mark)
        if len(self.marks) > 1:
            self.resumed.set()
        async for change in super().follow(mark):
            yield change
            if len(self.marks) == 1:
                raise ConnectionError("the connection dropped")


@pytest.mark.integration
async def test_following_resumes_after_the_last_change_applied(
    model: OnnxEmbedder, redis_client: aioredis.Redis
) -> None:
    """Not from where the replica started: every change since would be applied again
    (each add a load from Redis) after every dropped connection."""
    writer = make(model, store=RedisSemanticStore(redis_client))
    flaky = FlakyStore(redis_client)
    reader = make(model, store=flaky)
    await reader.start()
    try:
        await writer.store("scope", Q, "t1", b"first")
        await asyncio.wait_for(flaky.resumed.wait(), 5)
        started, resumed = flaky.marks
        assert resumed > started and resumed == await flaky.change_mark()
        assert reader.stats().entries == 1
    finally:
        await reader.stop()


async def test_a_request_that_allows_only_young_answers_gets_no_older_hit(
    model: OnnxEmbedder,
) -> None:
    clock = Clock()
    cache = make(model, clock=clock)
    await cache.store("scope", Q, "t1", b"old")
    clock.now += 30
    assert await cache.check("scope", PARAPHRASE, "t1", max_age_s=10) is None
    assert await cache.check("scope", Q, "t1", max_age_s=10) is None  # the same text too
    hit = await cache.check("scope", PARAPHRASE, "t1", max_age_s=60)
    assert hit is not None and hit.body == b"old"
    assert cache.stats().entries == 1  # too old for one request is not gone for all


async def test_an_answer_lives_its_requests_lifetime_at_most_the_tiers(
    model: OnnxEmbedder,
) -> None:
    clock = Clock()
    cache = make(model, clock=clock, ttl_s=100)
    await cache.store("scope", Q, "t1", b"short", ttl=10)
    await cache.store("scope", "What is a monad?", "t1", b"capped", ttl=1000)
    clock.now += 50
    assert await cache.check("scope", Q, "t1") is None
    assert await cache.check("scope", "What is a monad?", "t1") is not None
    clock.now += 60
    assert await cache.check("scope", "What is a monad?", "t1") is None
