"""The exact cache tier: complete answers in Redis under their request key.

Runs in the ingress replica (no Ray hop): a lookup or a store is one Lua call.
Entries are hashes ``{b: body, t: stored-at ms}`` with a TTL, under
``<prefix>:{<namespace>}:e:<digest>``; each namespace has a counter hash
``<prefix>:{<namespace>}:stats`` (hits, misses, stores, and the semantic tier's
``semantic_hits`` and ``guard_rejections``). Namespaces are percent-encoded, so
a tenant name can neither break the hash tag nor act as a SCAN pattern.

Only successful, complete answers are stored (a ``chat.completion`` or text
completion whose every choice has a finish reason, embeddings with every vector,
a rerank with its results, a completed response, a moderation's verdicts): never an
error, never a cut-off stream.

Redis down or slow: a lookup is a miss and a store is skipped; the request
never fails for the cache. When Redis is unreachable the cache stays off for
``down_backoff_s`` so requests do not each pay a connection attempt; a slow
answer (``op_timeout_s``) is a miss for that request only. Admin operations,
by contrast, raise ``StoreUnavailableError``: an operator must know.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from deployments.near_cache import (
    NearCache,
    NearCacheSettings,
    decode_invalidation,
    encode_invalidation,
)
from deployments.pubsub import Message, follow_channel
from deployments.request_key import RequestKey
from deployments.response_replay import is_complete_response
from deployments.script_batch import ScriptBatch
from deployments.sse_replay import is_complete_completion
from deployments.store_errors import STORE_ERRORS
from deployments.tasks import cancel_and_wait
from deployments.text_replay import is_complete_text_completion
from serve_app.errors import StoreUnavailableError

log = logging.getLogger(__name__)
R = TypeVar("R")

COUNTERS = ("hits", "misses", "stores", "semantic_hits", "guard_rejections")
Counter = Literal["semantic_hits", "guard_rejections"]


class ExactCacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    key_prefix: str = "gw:cache"
    max_entry_bytes: int = Field(2_000_000, gt=0)
    op_timeout_s: float = Field(0.25, gt=0)  # a slow Redis is a miss, not a slow request
    down_backoff_s: float = Field(1.0, ge=0)
    stats_scan_count: int = Field(1000, gt=0)
    near: NearCacheSettings = NearCacheSettings()  # the replica's in-memory tier


@dataclass(frozen=True, slots=True)
class CacheHit:
    body: bytes
    age_s: int
    digest: str


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    stores: int
    semantic_hits: int
    guard_rejections: int
    entries: int
    entry_bytes: int  # MEMORY USAGE summed over the entries
    used_memory: int  # the whole server's, from INFO memory


def _script(name: str) -> str:
    return files("deployments").joinpath(name).read_text()


class ExactCache:
    def __init__(
        self,
        redis: aioredis.Redis,
        settings: ExactCacheSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self._clock = clock
        self._down_until = 0.0
        # On the answer's path: concurrent calls share one round trip.
        self._lookup = ScriptBatch(redis, _script("exact_cache_lookup.lua"), window_s=0)
        self._store = ScriptBatch(redis, _script("exact_cache_store.lua"), window_s=0)
        self.near = NearCache(settings.near)
        self._listener: asyncio.Task[None] | None = None

    # -- lifecycle: the near cache serves only while invalidations arrive ----------

    @property
    def channel(self) -> str:
        return f"{self.settings.key_prefix}:invalidate"

    async def start(self) -> None:
        if self.settings.enabled and self.settings.near.entries and self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        await cancel_and_wait(self._listener)
        self._listener = None
        self.near.go_dark()
        await self._count_near_hits()

    async def _listen(self) -> None:
        counted = time.monotonic()

        async def handle(message: Message) -> None:
            nonlocal counted
            if time.monotonic() - counted >= 1.0:  # memory hits reach the stats
                counted = time.monotonic()
                await self._count_near_hits()
            if message is None:
                return
            if message["type"] == "subscribe":
                self.near.go_live()
            elif message["type"] == "message":
                data = message["data"]
                text = data.decode() if isinstance(data, bytes) else str(data)
                self.near.invalidate(*decode_invalidation(text))

        def down(exc: BaseException) -> None:
            if self.near.active:  # once per outage, not once per retry
                log.warning("exact cache: invalidations unavailable, near cache off: %s", exc)
            self.near.go_dark()

        try:
            retry_s = self.settings.down_backoff_s or 1.0
            await follow_channel(self.redis, self.channel, handle, on_down=down, retry_s=retry_s)
        finally:
            self.near.go_dark()  # however the listener ends, memory must not outlive it

    async def _count_near_hits(self) -> None:
        """Hits served from memory join the namespace's counters in Redis (best effort)."""
        hits = self.near.take_hits()
        if hits:
            async with self.redis.pipeline(transaction=False) as pipe:
                for namespace, count in hits.items():
                    pipe.hincrby(self.stats_key(namespace), "hits", count)
                await self._guarded(pipe.execute)

    async def _invalidate(self, namespace: str | None, digest: str | None = None) -> None:
        self.near.invalidate(namespace, digest)
        await self._admin(self.redis.publish(self.channel, encode_invalidation(namespace, digest)))

    # -- keys ---------------------------------------------------------------------

    def _tag(self, namespace: str) -> str:
        return f"{self.settings.key_prefix}:{{{quote(namespace, safe='/')}}}"

    def entry_key(self, namespace: str, digest: str) -> str:
        return f"{self._tag(namespace)}:e:{digest}"

    def stats_key(self, namespace: str) -> str:
        return f"{self._tag(namespace)}:stats"

    # -- request path (never raises) ------------------------------------------------

    async def lookup(self, key: RequestKey, max_age_s: int | None = None) -> CacheHit | None:
        """The stored answer, or None (a miss, also when Redis is unavailable)."""
        near = self.near.get(key.namespace, key.digest, max_age_s)
        if near is not None:
            return CacheHit(near[0], near[1], key.digest)
        generation = self.near.generation
        max_age_ms = -1 if max_age_s is None else max_age_s * 1000
        keys = [self.entry_key(key.namespace, key.digest), self.stats_key(key.namespace)]
        reply = await self._guarded(lambda: self._lookup(keys=keys, args=[max_age_ms]))
        if not reply:
            return None
        body, age_ms, ttl_ms = bytes(reply[0]), int(reply[1]), int(reply[2])
        self.near.put(
            key.namespace, key.digest, body, age_ms=age_ms, ttl_ms=ttl_ms, generation=generation
        )
        return CacheHit(body, age_ms // 1000, key.digest)

    async def store(self, key: RequestKey, body: bytes, ttl_s: int) -> bool:
        """Store a complete answer; False when it is not one, or is not stored."""
        if not self.settings.enabled or ttl_s <= 0 or len(body) > self.settings.max_entry_bytes:
            return False
        try:
            completion = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not (
            is_complete_completion(completion)
            or is_complete_text_completion(completion)
            or is_complete_embedding(completion)
            or is_complete_rerank(completion)
            or is_complete_response(completion)
            or is_complete_moderation(completion)
        ):
            return False
        keys = [self.entry_key(key.namespace, key.digest), self.stats_key(key.namespace)]
        gen, ttl_ms = self.near.generation, ttl_s * 1000
        stored = bool(await self._guarded(lambda: self._store(keys=keys, args=[body, ttl_ms])))
        if stored:
            self.near.put(key.namespace, key.digest, body, age_ms=0, ttl_ms=ttl_ms, generation=gen)
        return stored

    async def record(self, namespace: str, counter: Counter, amount: int = 1) -> None:
        """Count a semantic-tier event in the namespace's stats (best effort)."""
        await self._guarded(lambda: self.redis.hincrby(self.stats_key(namespace), counter, amount))

    async def _guarded(self, call: Callable[[], Awaitable[R]]) -> R | None:
        if not self.settings.enabled or self._clock() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self.settings.op_timeout_s):
                return await call()
        except STORE_ERRORS as exc:
            # Back off only when Redis is unreachable: a timeout or a full local pool
            # is this replica's overload, and turning the cache off would add load.
            if isinstance(exc, RedisConnectionError | OSError) and not isinstance(
                exc,
                MaxConnectionsError | TimeoutError,  # TimeoutError is an OSError
            ):
                self._down_until = self._clock() + self.settings.down_backoff_s
            log.warning("exact cache: Redis unavailable, serving a miss: %s", exc)
            return None

    # -- admin (raises StoreUnavailableError) ------------------------------------------

    async def delete(self, namespace: str, digest: str) -> bool:
        deleted = bool(await self._admin(self.redis.unlink(self.entry_key(namespace, digest))))
        await self._invalidate(namespace, digest)
        return deleted

    async def delete_namespace(self, namespace: str) -> int:
        """Remove every entry of one namespace (its counters stay)."""
        deleted = await self._admin(self._unlink_matching(f"{self._tag(namespace)}:e:*"))
        await self._invalidate(namespace)
        return deleted

    async def flush(self) -> int:
        """Remove every entry and counter of this tier (and nothing of other tiers)."""
        prefix = self.settings.key_prefix
        entries = await self._admin(self._unlink_matching(f"{prefix}:*:e:*"))
        await self._admin(self._unlink_matching(f"{prefix}:*:stats"))
        await self._invalidate(None)
        return entries

    async def stats(self, namespace: str | None = None) -> CacheStats:
        tag = self._tag(namespace) if namespace is not None else f"{self.settings.key_prefix}:*"
        return await self._admin(self._collect_stats(tag))

    async def _admin(self, call: Awaitable[R]) -> R:
        try:
            return await call
        except STORE_ERRORS as exc:
            raise StoreUnavailableError(f"the cache store is unavailable: {exc}") from exc

    async def _scan(self, pattern: str) -> list[bytes]:
        count = self.settings.stats_scan_count
        return [key async for key in self.redis.scan_iter(match=pattern, count=count)]

    async def _unlink_matching(self, pattern: str) -> int:
        keys = await self._scan(pattern)
        removed = 0
        for start in range(0, len(keys), 500):
            removed += int(await self.redis.unlink(*keys[start : start + 500]))
        return removed

    async def _collect_stats(self, tag: str) -> CacheStats:
        totals = dict.fromkeys(COUNTERS, 0)
        for stats_key in await self._scan(f"{tag}:stats"):
            counters: dict[bytes, bytes] = await self.redis.hgetall(stats_key)
            for name, value in counters.items():
                if name.decode() in totals:
                    totals[name.decode()] += int(value)
        entries = await self._scan(f"{tag}:e:*")
        entry_bytes = 0
        for start in range(0, len(entries), 500):
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry in entries[start : start + 500]:
                    pipe.memory_usage(entry)
                entry_bytes += sum(int(size or 0) for size in await pipe.execute())
        info: dict[str, Any] = await self.redis.info("memory")
        return CacheStats(
            **totals,
            entries=len(entries),
            entry_bytes=entry_bytes,
            used_memory=int(info.get("used_memory", 0)),
        )


def is_complete_embedding(answer: Any) -> bool:
    """A successful embeddings answer: a vector (a list, or base64 text) for every input."""
    if not isinstance(answer, Mapping) or answer.get("object") != "list" or "error" in answer:
        return False
    data = answer.get("data")
    return (
        isinstance(data, list)
        and bool(data)
        and all(isinstance(d, Mapping) and isinstance(d.get("embedding"), list | str) for d in data)
    )


def _every_result(answer: Any, complete: Callable[[Mapping[str, Any]], bool]) -> bool:
    """A successful answer listing ``results``, each of them ``complete``."""
    if not isinstance(answer, Mapping) or "error" in answer:
        return False
    results = answer.get("results")
    return (
        isinstance(results, list)
        and bool(results)
        and all(isinstance(r, Mapping) and complete(r) for r in results)
    )


def is_complete_rerank(answer: Any) -> bool:
    """A successful rerank: a score for each result it lists."""
    return _every_result(answer, lambda r: isinstance(r.get("relevance_score"), int | float))


def is_complete_moderation(answer: Any) -> bool:
    """A successful moderation: a verdict (``flagged``) for each input."""
    return _every_result(answer, lambda r: isinstance(r.get("flagged"), bool))
