"""A replica's own copy of hot exact-cache entries, in front of Redis.

A hit served from memory skips the Redis round trip (the hot-prompt case:
many clients sending the same request). What it may serve is bounded three
ways, so it never answers what Redis would not:

* an entry lives at most ``ttl_s`` in memory, and never past its Redis TTL;
* admin deletes and flushes reach every replica as an invalidation message
  (``ExactCache`` subscribes); while that subscription is down the near cache
  is off, since it could miss one;
* a Redis answer that was in flight while an invalidation arrived is not kept
  (a generation count tells).

Ages are kept on this replica's clock from the age Redis reported, so the
``age`` header stays right without the two clocks agreeing.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class NearCacheSettings(BaseModel):
    """``args.cache.exact.near`` in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entries: int = Field(1024, ge=0)  # 0 turns the near cache off
    ttl_s: float = Field(1.0, gt=0)  # longest an entry is served from memory
    max_entry_bytes: int = Field(262_144, gt=0)


@dataclass(slots=True)
class _Entry:
    body: bytes
    stored_at: float  # wall clock, seconds: now - the age Redis reported
    until: float  # monotonic deadline for serving it from memory


class NearCache:
    def __init__(
        self,
        settings: NearCacheSettings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall = wall
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._live = False  # invalidations are being received
        self.generation = 0  # bumped by every invalidation
        self.hits: Counter[str] = Counter()  # per namespace, not yet counted in Redis

    @property
    def active(self) -> bool:
        return self._live and self.settings.entries > 0

    def go_live(self) -> None:
        """Invalidations are received from now on."""
        self._live = True

    def go_dark(self) -> None:
        """Invalidations may be missed from now on: forget everything, serve nothing."""
        self._live = False
        self.invalidate(None, None)

    def get(self, namespace: str, digest: str, max_age_s: int | None) -> tuple[bytes, int] | None:
        """The body and its age in seconds, or None."""
        if not self.active:
            return None
        key = (namespace, digest)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.until:
            del self._entries[key]
            return None
        age = max(0, int(self._wall() - entry.stored_at))
        if max_age_s is not None and age > max_age_s:
            return None
        self._entries.move_to_end(key)
        self.hits[namespace] += 1
        return entry.body, age

    def put(
        self,
        namespace: str,
        digest: str,
        body: bytes,
        *,
        age_ms: int,
        ttl_ms: int,
        generation: int,
    ) -> None:
        """Keep what Redis answered (or was given) when no invalidation came since
        ``generation`` was read; ``ttl_ms`` is the entry's remaining Redis TTL."""
        if (
            not self.active
            or generation != self.generation
            or ttl_ms <= 0
            or len(body) > self.settings.max_entry_bytes
        ):
            return
        until = self._clock() + min(self.settings.ttl_s, ttl_ms / 1000)
        key = (namespace, digest)
        self._entries[key] = _Entry(body, self._wall() - age_ms / 1000, until)
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.entries:
            self._entries.popitem(last=False)

    def invalidate(self, namespace: str | None, digest: str | None) -> None:
        """Drop one entry, a namespace (``digest`` None) or everything (both None)."""
        self.generation += 1
        if namespace is None:
            self._entries.clear()
        elif digest is not None:
            self._entries.pop((namespace, digest), None)
        else:
            for key in [k for k in self._entries if k[0] == namespace]:
                del self._entries[key]

    def take_hits(self) -> dict[str, int]:
        hits, self.hits = dict(self.hits), Counter()
        return hits


def encode_invalidation(namespace: str | None, digest: str | None) -> str:
    """The message every replica's near cache applies ("" = everything)."""
    if namespace is None:
        return ""
    return f"{namespace}\n{digest or ''}"


def decode_invalidation(message: str) -> tuple[str | None, str | None]:
    if not message:
        return None, None
    namespace, _, digest = message.partition("\n")
    return namespace, digest or None
