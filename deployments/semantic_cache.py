"""The semantic tier of the response cache.

A request's *scope* (tenant namespace, model, parameters, system prompt and
earlier turns, hashed by ``request_key.py``) must match exactly; only the final
user message is compared by meaning. A candidate above the similarity threshold
must then pass the near-miss guard, and its body is read from the store (so an
entry deleted or expired elsewhere is never served). Any store failure is a miss.

Threshold semantics follow RedisVL: ``distance_threshold`` is a cosine distance
(1 - similarity); 0 serves only the identical text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field
from ray import serve

from deployments.embedder import Embedder, EmbedderSettings, build_embedder
from deployments.near_miss_guard import GuardSettings, NearMissGuard
from deployments.semantic_index import SemanticEntry, SemanticIndex, entry_id
from deployments.semantic_store import Change, RedisSemanticStore, SemanticStore
from deployments.tasks import cancel_and_wait
from serve_app.errors import StoreUnavailableError
from serve_app.store import connect as connect_store
from serve_app.store_settings import StoreSettings

log = logging.getLogger(__name__)

# Texts just embedded, with their vectors: a miss's lookup embeds the text, and the
# answer's store, moments later, needs the same vector (embedding is this tier's cost).
RECENT_VECTORS = 1024


class SemanticCacheSettings(BaseModel):
    """``args.semantic_cache``."""

    enabled: bool = True
    # Cosine distance; chosen from the precision/recall curve in bench/cache_eval.py.
    distance_threshold: float = Field(default=0.06, ge=0.0, le=1.0)
    top_k: int = Field(default=4, ge=1, le=32)  # candidates tried against the guard
    ttl_s: float | None = Field(default=86_400.0, gt=0)  # None: entries never expire
    # Entries kept across the cluster (each replica's index holds them all in memory, ~1.5 kB
    # a vector); a store past it evicts those expiring soonest. None: no cap.
    max_entries: int | None = Field(default=50_000, ge=1)
    max_text_chars: int = Field(default=2_000, ge=1)  # longer final messages are not cached
    # How long a request waits for a lookup before taking it as a miss: a tier that is
    # overloaded or restarting (a new replica loads its model for seconds) must not
    # hold requests that the upstream could answer.
    lookup_timeout_s: float = Field(default=0.5, gt=0)
    # Each ingress replica lets at most this many lookups be in flight, fewer while
    # lookups take longer than the target (deployments/adaptive_limit.py); the rest are
    # misses at once (their answers are still stored, in the background).
    max_concurrent_lookups: int = Field(default=32, ge=1)
    lookup_latency_target_s: float = Field(default=0.25, gt=0)
    # How often a replica drops expired entries from its index (Redis drops them on its own).
    sweep_interval_s: float = Field(default=30.0, gt=0)
    embedder: EmbedderSettings = EmbedderSettings()
    guard: GuardSettings = GuardSettings()


@dataclass(frozen=True, slots=True)
class SemanticHit:
    body: bytes
    similarity: float
    entry_id: str
    created: float  # unix seconds; the ingress's ``age`` header is now - created
    cached_text: str


@dataclass(frozen=True, slots=True)
class SemanticStats:
    lookups: int
    hits: int
    misses: int
    guard_rejections: int
    store_errors: int
    evictions: int  # entries this replica's stores pushed out (max_entries)
    entries: int  # in this replica's index


class SemanticCache:
    def __init__(
        self,
        settings: SemanticCacheSettings,
        embedder: Embedder,
        store: SemanticStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = settings
        self._embedder = embedder
        self._store = store
        self._clock = clock
        self._guard = NearMissGuard(settings.guard)
        self._index = SemanticIndex(embedder.dim)
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._follower: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._counts = dict.fromkeys(
            ("lookups", "hits", "misses", "guard_rejections", "store_errors", "evictions"), 0
        )

    # -- lifecycle: rebuild from the store, then follow its changes ------------------

    async def start(self) -> None:
        """Rebuild the index from the store, then keep it in step with other replicas."""
        mark = await self._store.change_mark()
        now = self._clock()
        async for entry in self._store.scan():
            if not entry.expired(now):
                self._index.add(entry)
        self._follower = asyncio.create_task(self._follow(mark))
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        await cancel_and_wait(self._follower)
        await cancel_and_wait(self._sweeper)
        self._follower = self._sweeper = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.sweep_interval_s)
            removed = self._index.expire(self._clock())
            if removed:
                log.debug("semantic cache: %d expired entries left the index", removed)

    async def _follow(self, mark: str) -> None:
        while True:
            try:
                async for change in self._store.follow(mark):
                    await self._apply(change)
                    mark = change.mark or mark  # after a failure, go on from here
                return
            except StoreUnavailableError as exc:
                # Redis gone: serve what we have (hits are still confirmed), retry later.
                log.warning("semantic cache: change stream unavailable: %s", exc)
                await asyncio.sleep(1.0)
            except Exception as exc:  # a transient connection error must not end syncing
                log.warning("semantic cache: change stream failed: %s", exc)
                await asyncio.sleep(1.0)

    async def _apply(self, change: Change) -> None:
        if change.op == "add":
            entry = await self._store.load(change.entry_id)
            if entry is not None and not entry.expired(self._clock()):
                self._index.add(entry)
        elif change.op == "del":
            self._index.remove(change.entry_id)
        elif change.op == "flush":
            if change.namespace:
                self._index.remove_namespace(change.namespace)
            else:
                self._index.clear()

    # -- the verbs ------------------------------------------------------------------

    async def check(
        self,
        scope: str,
        text: str,
        namespace: str,
        threshold: float | None = None,
        max_age_s: float | None = None,
    ) -> SemanticHit | None:
        """The best entry of this scope whose text means the same as ``text``, or None;
        only one at most ``max_age_s`` old, when the request says so (``max-age``)."""
        self._counts["lookups"] += 1
        try:
            hit = await self._lookup(scope, text, namespace, threshold, max_age_s)
        except StoreUnavailableError:
            self._counts["store_errors"] += 1  # Redis down: a miss, never a failed request
            hit = None
        self._counts["hits" if hit else "misses"] += 1
        return hit

    async def _lookup(
        self,
        scope: str,
        text: str,
        namespace: str,
        threshold: float | None,
        max_age_s: float | None,
    ) -> SemanticHit | None:
        if not self._cacheable(text):
            return None
        limit = self._cfg.distance_threshold if threshold is None else threshold
        same = self._index.exact(namespace, scope, text)
        if same is not None:
            found = await self._confirm(same, 1.0, max_age_s)
            if found is not None or limit == 0.0:
                return found
        if limit == 0.0:
            return None
        vector = await self._vector(text)
        for entry, sim in self._index.search(namespace, scope, vector, self._cfg.top_k):
            if 1.0 - sim > limit:
                break  # best first: nothing further can pass
            if not self._guard.verify(text, entry.text).ok:
                self._counts["guard_rejections"] += 1
                continue
            found = await self._confirm(entry, sim, max_age_s)
            if found is not None:
                return found
        return None

    def _cacheable(self, text: str) -> bool:
        """Short enough to compare, and whole in its vector (a longer text is only ever
        served by the exact tier)."""
        cfg = self._cfg
        return cfg.enabled and len(text) <= cfg.max_text_chars and self._embedder.covers(text)

    async def _vector(self, text: str) -> np.ndarray:
        vector = self._recent.pop(text, None)
        if vector is None:
            vector = (await self._embedder.embed([text]))[0]
        self._recent[text] = vector  # newest last
        if len(self._recent) > RECENT_VECTORS:
            self._recent.popitem(last=False)
        return vector

    async def _confirm(
        self, entry: SemanticEntry, similarity: float, max_age_s: float | None
    ) -> SemanticHit | None:
        """Read the body; an entry gone from the store (expired, deleted) leaves the index."""
        now = self._clock()
        if entry.expired(now):
            self._index.remove(entry.id)
            return None
        if max_age_s is not None and now - entry.created > max_age_s:
            return None  # too old for this request only: the next candidate may do
        body = await self._store.body(entry.id)
        if body is None:
            self._index.remove(entry.id)
            return None
        return SemanticHit(body, similarity, entry.id, entry.created, entry.text)

    async def store(
        self, scope: str, text: str, namespace: str, body: bytes, ttl: float | None = None
    ) -> str | None:
        """Cache a successful, complete answer; returns its entry id (None: not stored).

        It lives ``ttl`` (the request's cache lifetime, as in the exact tier), at most
        the tier's ``ttl_s``."""
        if not self._cacheable(text):
            return None
        vector = await self._vector(text)
        entry = SemanticEntry(
            id=entry_id(namespace, scope, text),
            namespace=namespace,
            scope=scope,
            text=text,
            vector=vector,
            created=self._clock(),
            ttl=_shorter(ttl, self._cfg.ttl_s),
        )
        try:
            self._counts["evictions"] += await self._store.put(entry, body)
        except StoreUnavailableError:
            self._counts["store_errors"] += 1
            return None
        self._index.add(entry)  # at once here; other replicas hear of it from the stream
        return entry.id

    async def invalidate(self, entry_id: str) -> bool:
        self._index.remove(entry_id)
        return await self._store.delete(entry_id)

    async def invalidate_namespace(self, namespace: str | None) -> int:
        """Delete one namespace's entries, or every entry when ``namespace`` is None."""
        if namespace is None:
            self._index.clear()
        else:
            self._index.remove_namespace(namespace)
        return await self._store.flush(namespace)

    def stats(self) -> SemanticStats:
        return SemanticStats(entries=len(self._index), **self._counts)


# -- Ray Serve wrapper: the only Ray code; the lead wires and tests it. ---------------


@serve.deployment(ray_actor_options={"num_cpus": 1})
class SemanticCacheDeployment:
    async def __init__(
        self, settings: SemanticCacheSettings | dict, store: StoreSettings | dict
    ) -> None:
        settings = SemanticCacheSettings.model_validate(settings)  # Serve passes dicts
        self._model = build_embedder(settings.embedder)
        self.dim = self._model.dim  # this wrapper is the cache's (batching) embedder
        shared = await connect_store(StoreSettings.model_validate(store))
        self._cache = SemanticCache(
            settings,
            embedder=self,
            store=RedisSemanticStore(shared.redis, max_entries=settings.max_entries),
        )
        self._started: asyncio.Task[None] | None = None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _embed_one(self, texts: list[str]) -> list[np.ndarray]:
        return list(await self._model.embed(texts))

    async def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([await self._embed_one(t) for t in texts])

    def covers(self, text: str) -> bool:
        return self._model.covers(text)

    async def _ready(self) -> SemanticCache:
        self._started = self._started or asyncio.create_task(self._cache.start())
        await asyncio.shield(self._started)
        return self._cache

    async def check(
        self,
        scope: str,
        text: str,
        namespace: str,
        threshold: float | None = None,
        max_age_s: float | None = None,
    ) -> SemanticHit | None:
        return await (await self._ready()).check(scope, text, namespace, threshold, max_age_s)

    async def store(
        self, scope: str, text: str, namespace: str, body: bytes, ttl: float | None = None
    ) -> str | None:
        return await (await self._ready()).store(scope, text, namespace, body, ttl)

    async def invalidate_namespace(self, namespace: str | None) -> int:
        return await (await self._ready()).invalidate_namespace(namespace)

    async def stats(self) -> SemanticStats:
        return (await self._ready()).stats()


def _shorter(a: float | None, b: float | None) -> float | None:
    """The shorter of two lifetimes (None: for ever)."""
    if a is None or b is None:
        return b if a is None else a
    return min(a, b)
