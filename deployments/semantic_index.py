"""The semantic tier's in-replica index: one exact faiss index per (namespace, scope).

Entries live in Redis (``semantic_store.py``); this index is a replica's copy of
their vectors and texts, rebuilt from Redis at start and kept in step by the
store's change stream. Bodies stay in Redis: a hit reads its body there, which
also proves the entry still exists.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field

import faiss
import numpy as np

_COMPACT_RATIO = 0.2  # rebuild a scope's faiss index once this share of its rows is dead


def entry_id(namespace: str, scope: str, text: str) -> str:
    """Deterministic, so storing the same prompt twice overwrites one entry."""
    raw = "\x1f".join((namespace, scope, text)).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(slots=True)
class SemanticEntry:
    id: str
    namespace: str
    scope: str
    text: str
    vector: np.ndarray  # float32, L2-normalised
    created: float  # unix seconds
    ttl: float | None  # seconds; None = no expiry

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now >= self.created + self.ttl


@dataclass(slots=True)
class _Scope:
    """One scope's rows. faiss positions are append-only; removal is a tombstone."""

    index: faiss.Index
    ids: list[str] = field(default_factory=list)  # faiss position -> entry id
    dead: set[int] = field(default_factory=set)
    by_text: dict[str, str] = field(default_factory=dict)


class SemanticIndex:
    """Per-scope flat inner-product search over fp16 vectors (exact, ~4 ms at 100k rows)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._entries: dict[str, SemanticEntry] = {}
        self._pos: dict[str, int] = {}  # entry id -> faiss position in its scope
        self._scopes: dict[tuple[str, str], _Scope] = {}
        # (expires at, entry id), soonest first. Redis expires an entry without a word to the
        # replicas, so without this an entry nobody asks for again would stay here for good.
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def _new_faiss(self) -> faiss.Index:
        # fp16 halves the bytes scanned per query against float32, with no training step.
        return faiss.IndexScalarQuantizer(
            self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )

    def get(self, entry_id: str) -> SemanticEntry | None:
        return self._entries.get(entry_id)

    def add(self, entry: SemanticEntry) -> None:
        if entry.id in self._entries:
            self.remove(entry.id)
        key = (entry.namespace, entry.scope)
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = _Scope(self._new_faiss())
        scope.index.add(entry.vector.reshape(1, -1).astype(np.float32))
        self._pos[entry.id] = len(scope.ids)
        scope.ids.append(entry.id)
        scope.by_text[entry.text] = entry.id
        self._entries[entry.id] = entry
        if entry.ttl is not None:
            heapq.heappush(self._expiries, (entry.created + entry.ttl, entry.id))

    def remove(self, entry_id: str) -> bool:
        key = self._drop(entry_id)
        if key is None:
            return False
        self._tidy(key)
        return True

    def expire(self, now: float) -> int:
        """Remove every entry whose TTL has run out by ``now``; returns how many."""
        touched: set[tuple[str, str]] = set()
        removed = 0
        while self._expiries and self._expiries[0][0] <= now:
            at, eid = heapq.heappop(self._expiries)
            entry = self._entries.get(eid)
            if entry is None or entry.ttl is None or entry.created + entry.ttl != at:
                continue  # removed, or replaced by a later copy, since
            key = self._drop(eid)
            if key is not None:
                touched.add(key)
                removed += 1
        for key in touched:  # once per scope: compacting after each row would be quadratic
            self._tidy(key)
        return removed

    def _drop(self, entry_id: str) -> tuple[str, str] | None:
        """Tombstone an entry's row; the scope of the row, or None if there was none."""
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return None
        key = (entry.namespace, entry.scope)
        scope = self._scopes[key]
        scope.dead.add(self._pos.pop(entry_id))
        if scope.by_text.get(entry.text) == entry_id:
            del scope.by_text[entry.text]
        return key

    def _tidy(self, key: tuple[str, str]) -> None:
        scope = self._scopes.get(key)
        if scope is None:
            return
        if len(scope.dead) == len(scope.ids):
            del self._scopes[key]
        elif len(scope.dead) > _COMPACT_RATIO * len(scope.ids):
            self._compact(key, scope)

    def _compact(self, key: tuple[str, str], scope: _Scope) -> None:
        live = [eid for k, eid in enumerate(scope.ids) if k not in scope.dead]
        fresh = _Scope(self._new_faiss(), ids=live, by_text=scope.by_text)
        fresh.index.add(np.stack([self._entries[eid].vector for eid in live]))
        self._pos.update({eid: k for k, eid in enumerate(live)})
        self._scopes[key] = fresh

    def remove_namespace(self, namespace: str) -> int:
        doomed = [e.id for e in self._entries.values() if e.namespace == namespace]
        for eid in doomed:
            self.remove(eid)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._pos.clear()
        self._scopes.clear()
        self._expiries.clear()

    def exact(self, namespace: str, scope: str, text: str) -> SemanticEntry | None:
        found = self._scopes.get((namespace, scope))
        eid = found.by_text.get(text) if found else None
        return self._entries.get(eid) if eid else None

    def search(
        self, namespace: str, scope: str, vector: np.ndarray, k: int
    ) -> list[tuple[SemanticEntry, float]]:
        """The ``k`` nearest live entries of one scope, best first, with cosine similarity."""
        found = self._scopes.get((namespace, scope))
        if found is None:
            return []
        want = min(k + len(found.dead), len(found.ids))
        sims, rows = found.index.search(vector.reshape(1, -1).astype(np.float32), want)
        out: list[tuple[SemanticEntry, float]] = []
        for sim, row in zip(sims[0], rows[0], strict=True):
            if row < 0 or row in found.dead:
                continue
            out.append((self._entries[found.ids[row]], min(float(sim), 1.0)))
            if len(out) == k:
                break
        return out
