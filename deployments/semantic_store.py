"""Where semantic-cache entries live beyond one replica.

``RedisSemanticStore`` is the production store; ``MemorySemanticStore`` serves
the offline evaluation and unit tests. Both pass one contract test.

Redis keys share the ``{sc}`` hash tag so that an entry and its change record
are written in one MULTI:
``{sc}:e:<id>``: hash {vec (float32 bytes), text, body, created (unix s), ttl (s or ""),
scope, ns}, expiring with the entry (PEXPIRE, so the server's clock decides);
``{sc}:changes``: stream {op: add|del|flush, id, ns}, capped, tailed by every replica;
``{sc}:order``: zset of entry ids by expiry, so that a store past ``max_entries`` evicts
the entries that would expire soonest (``semantic_put.lua``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from deployments.semantic_index import SemanticEntry
from serve_app.errors import StoreUnavailableError

ENTRY_PREFIX = "{sc}:e:"
CHANGES_KEY = "{sc}:changes"
ORDER_KEY = "{sc}:order"
_STREAM_MAXLEN = 100_000
_SCAN_BATCH = 500


@dataclass(frozen=True, slots=True)
class Change:
    op: str  # add | del | flush
    entry_id: str = ""
    namespace: str = ""  # flush: "" means every namespace
    mark: str = field(default="", compare=False)  # its place: following resumes after it


class SemanticStore(Protocol):
    async def put(self, entry: SemanticEntry, body: bytes) -> int: ...
    async def body(self, entry_id: str) -> bytes | None: ...
    async def load(self, entry_id: str) -> SemanticEntry | None: ...
    async def delete(self, entry_id: str) -> bool: ...
    async def flush(self, namespace: str | None) -> int: ...
    def scan(self) -> AsyncIterator[SemanticEntry]: ...
    async def change_mark(self) -> str: ...
    def follow(self, mark: str) -> AsyncIterator[Change]: ...


def _encode(entry: SemanticEntry, body: bytes) -> dict[str, bytes | str]:
    return {
        "vec": entry.vector.astype(np.float32).tobytes(),
        "text": entry.text,
        "body": body,
        "created": repr(entry.created),
        "ttl": "" if entry.ttl is None else repr(entry.ttl),
        "scope": entry.scope,
        "ns": entry.namespace,
    }


def _decode(eid: str, raw: dict[bytes, bytes]) -> SemanticEntry | None:
    if not raw or b"vec" not in raw:
        return None
    ttl = raw.get(b"ttl", b"")
    return SemanticEntry(
        id=eid,
        namespace=raw[b"ns"].decode(),
        scope=raw[b"scope"].decode(),
        text=raw[b"text"].decode(),
        vector=np.frombuffer(raw[b"vec"], dtype=np.float32).copy(),
        created=float(raw[b"created"]),
        ttl=float(ttl) if ttl else None,
    )


class RedisSemanticStore:
    """Redis errors become ``StoreUnavailableError`` here; the cache turns them into misses."""

    def __init__(
        self, client: aioredis.Redis, block_ms: int = 1000, max_entries: int | None = None
    ) -> None:
        self._r = client
        # A blocking read that outlasts the client's socket timeout fails every time
        # nothing changes; stay well inside it.
        timeout_s = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._block_ms = block_ms if not timeout_s else min(block_ms, int(timeout_s * 500))
        self._max_entries = max_entries
        self._put = client.register_script(
            files("deployments").joinpath("semantic_put.lua").read_text()
        )

    async def put(self, entry: SemanticEntry, body: bytes) -> int:
        """Store ``entry``; returns how many older entries were evicted to make room."""
        ttl = "" if entry.ttl is None else str(max(1, int(entry.ttl * 1000)))
        fields = [v for pair in _encode(entry, body).items() for v in pair]
        args = [entry.id, ttl, entry.namespace, self._max_entries or 0, _STREAM_MAXLEN]
        try:
            keys = [ENTRY_PREFIX + entry.id, CHANGES_KEY, ORDER_KEY]
            return int(await self._put(keys=keys, args=[*args, ENTRY_PREFIX, *fields]))
        except RedisError as exc:
            raise StoreUnavailableError(f"semantic store: {exc}") from exc

    async def body(self, entry_id: str) -> bytes | None:
        try:
            return await self._r.hget(ENTRY_PREFIX + entry_id, "body")
        except RedisError as exc:
            raise StoreUnavailableError(f"semantic store: {exc}") from exc

    async def load(self, entry_id: str) -> SemanticEntry | None:
        try:
            raw = await self._r.hgetall(ENTRY_PREFIX + entry_id)
        except RedisError as exc:
            raise StoreUnavailableError(f"semantic store: {exc}") from exc
        return _decode(entry_id, raw)

    async def delete(self, entry_id: str) -> bool:
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(ENTRY_PREFIX + entry_id)
                pipe.zrem(ORDER_KEY, entry_id)
                pipe.xadd(CHANGES_KEY, {"op": "del", "id": entry_id, "ns": ""})
                deleted, _, _ = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailableError(f"semantic store: {exc}") from exc
        return bool(deleted)

    async def flush(self, namespace: str | None) -> int:
        """Delete every entry (of one namespace): an admin operation, O(entries)."""
        doomed = [e.id async for e in self.scan() if namespace is None or e.namespace == namespace]
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                for eid in doomed:
                    pipe.delete(ENTRY_PREFIX + eid)
                if namespace is None:
                    pipe.delete(ORDER_KEY)
                elif doomed:
                    pipe.zrem(ORDER_KEY, *doomed)
                pipe.xadd(CHANGES_KEY, {"op": "flush", "id": "", "ns": namespace or ""})
                await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailableError(f"semantic store: {exc}") from exc
        return len(doomed)

    async def scan(self) -> AsyncIterator[SemanticEntry]:
        try:
            keys: list[bytes] = []
            async for key in self._r.scan_iter(match=ENTRY_PREFIX + "*", count=_SCAN_BATCH):
                keys.append(key)
                if len(keys) == _SCAN_BATCH:
                    for entry in await self._load_many(keys):
                        yield entry
                    keys = []
            for entry in await self._load_many(keys):
                yield entry
        except RedisError as exc:
            raise StoreUnavailableError(f"semantic store: {exc}") from exc

    async def _load_many(self, keys: list[bytes]) -> list[SemanticEntry]:
        async with self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            raws = await pipe.execute()
        prefix = len(ENTRY_PREFIX)
        found = (_decode(k.decode()[prefix:], raw) for k, raw in zip(keys, raws, strict=True))
        return [e for e in found if e is not None]

    async def change_mark(self) -> str:
        """The id of the last change so far: a replica tails the stream from here."""
        last = await self._r.xrevrange(CHANGES_KEY, count=1)
        return last[0][0].decode() if last else "0-0"

    async def follow(self, mark: str) -> AsyncIterator[Change]:
        late = False
        while True:
            try:
                batches = await self._r.xread({CHANGES_KEY: mark}, count=500, block=self._block_ms)
            except RedisTimeoutError:
                # A busy host can answer an empty blocking read past the socket timeout;
                # only two in a row say the store is in trouble.
                if late:
                    raise
                late = True
                continue
            late = False
            for _stream, records in batches or []:
                for rec_id, fields in records:
                    mark = rec_id.decode()
                    yield Change(
                        op=fields[b"op"].decode(),
                        entry_id=fields[b"id"].decode(),
                        namespace=fields[b"ns"].decode(),
                        mark=mark,
                    )


class MemorySemanticStore:
    """One process's store, no expiry of its own (the cache checks TTL on every hit)."""

    def __init__(self, max_entries: int | None = None) -> None:
        self._rows: dict[str, tuple[SemanticEntry, bytes]] = {}
        self._max_entries = max_entries

    async def put(self, entry: SemanticEntry, body: bytes) -> int:
        self._rows[entry.id] = (entry, body)
        if self._max_entries is None or len(self._rows) <= self._max_entries:
            return 0
        over = len(self._rows) - self._max_entries

        def expiry(row: tuple[SemanticEntry, bytes]) -> float:
            e = row[0]
            return float("inf") if e.ttl is None else e.created + e.ttl

        for doomed in sorted(self._rows.values(), key=expiry)[:over]:
            del self._rows[doomed[0].id]
        return over

    async def body(self, entry_id: str) -> bytes | None:
        row = self._rows.get(entry_id)
        return row[1] if row else None

    async def load(self, entry_id: str) -> SemanticEntry | None:
        row = self._rows.get(entry_id)
        return row[0] if row else None

    async def delete(self, entry_id: str) -> bool:
        return self._rows.pop(entry_id, None) is not None

    async def flush(self, namespace: str | None) -> int:
        doomed = [k for k, (e, _) in self._rows.items() if namespace in (None, e.namespace)]
        for k in doomed:
            del self._rows[k]
        return len(doomed)

    async def scan(self) -> AsyncIterator[SemanticEntry]:
        for entry, _ in list(self._rows.values()):
            yield entry

    async def change_mark(self) -> str:
        return ""

    async def follow(self, mark: str) -> AsyncIterator[Change]:
        # A single process has no other writer to hear from.
        return
        yield  # pragma: no cover
