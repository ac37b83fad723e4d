"""Single-flight across replicas, on Redis, behind the in-process layer.

Per key, one local flight per replica (``SingleFlight``), then one flight per
cluster:
- the lock is ``SET NX PX`` (``dedup_acquire.lua``); its owner renews it every
  third of ``lock_ttl_s`` while it works, so a leader that dies is taken over by
  a waiter within ``lock_ttl_s`` (plus one poll);
- a caller that finds the lock taken counts itself on it; when the flight had
  followers, the leader writes the result (value or error) to a per-flight
  result key and publishes a tiny notification (``dedup_publish.lua``), and
  every waiter wakes at once, whether the result was a success or not; with
  none (most flights), it only drops the lock;
- waiters listen on one pattern subscription per replica, then (re-)check the
  result key, so a result published before they listened is not missed; they
  also poll every ``poll_s`` in case a notification was lost;
- nobody waits past ``deadline_s``: then the waiter calls upstream itself;
- streams: the leader appends chunks to a Redis Stream (``XADD``) ending with
  an end or error entry; followers ``XREAD`` from ``0``, so a late joiner gets
  the whole stream;
- Redis errors degrade to local single-flight; they never fail the request.

Values are bytes (the ingress encodes what it needs); errors cross replicas as
``GatewayError`` (see ``encode_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from deployments.dedup import Flight, Role, SingleFlight, StreamFlight
from deployments.dedup_stream import follow_stream, lead_stream
from deployments.dedup_wire import VALUE, decode_result, encode_error, followers_key
from deployments.pubsub import Message, follow_channel
from deployments.script_batch import ScriptBatch
from deployments.store_errors import STORE_ERRORS
from deployments.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class DedupSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # Which requests coalesce: those the cache may serve, all, or none.
    coalesce: Literal["cacheable", "all", "none"] = "cacheable"
    cross_replica: bool = True
    lock_ttl_s: float = Field(10.0, gt=0)  # a dead leader is taken over within this
    deadline_s: float = Field(120.0, gt=0)  # longest wait for someone else's answer
    poll_s: float = Field(1.0, gt=0)  # safety net for lost notifications
    result_ttl_s: float = Field(30.0, gt=0)  # how long a published result stays readable
    stream_idle_s: float = Field(60.0, gt=0)  # longest gap between a stream's chunks
    stream_block_ms: int = Field(200, gt=0)  # must stay below store.socket_timeout_s
    key_prefix: str = "gw:dedup"

    def should_coalesce(self, cacheable: bool) -> bool:
        if not self.enabled or self.coalesce == "none":
            return False
        return self.coalesce == "all" or cacheable


def _script(name: str) -> str:
    return files("deployments").joinpath(name).read_text()


class RedisSingleFlight:
    """Local single-flight first, then one flight per cluster through Redis.

    ``redis=None`` (or ``cross_replica: false``) keeps it in-process only.
    """

    def __init__(self, redis: aioredis.Redis | None, settings: DedupSettings) -> None:
        self.settings = settings
        self._redis = redis if settings.cross_replica else None
        self._local: SingleFlight[Flight[bytes]] = SingleFlight(settings.deadline_s)
        self._streams: SingleFlight[object] = SingleFlight(
            settings.deadline_s, recheck_s=settings.poll_s
        )
        self.stats = self._local.stats
        self._streams.stats = self.stats
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        if self._redis is not None:
            # Concurrent flights' calls share one round trip (next loop turn, no timer).
            self._acquire = ScriptBatch(self._redis, _script("dedup_acquire.lua"), window_s=0)
            self._renew = self._redis.register_script(_script("dedup_renew.lua"))
            self._publish = ScriptBatch(self._redis, _script("dedup_publish.lua"), window_s=0)
            self._release = ScriptBatch(self._redis, _script("dedup_release.lua"), window_s=0)
            self._unfollow = self._redis.register_script(_script("dedup_unfollow.lua"))

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe for results (waits up to ``poll_s`` for the subscription)."""
        if self._redis is None or self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self.settings.poll_s)

    async def close(self) -> None:
        await cancel_and_wait(self._listener)
        self._listener = None
        await self._streams.close()

    # -- public API ----------------------------------------------------------------

    async def flight(
        self,
        key: str,
        fn: Callable[[], Awaitable[bytes]],
        abandoned: Callable[[asyncio.Future[Flight[bytes]]], object] | None = None,
    ) -> Flight[bytes]:
        """Run ``fn`` once for identical concurrent requests on every replica.

        ``abandoned``: see ``SingleFlight.flight``; the future's flight says whether this
        replica's ``fn`` made the call (leader) or another replica's did (follower)."""
        if self._redis is None:
            return await self._local.flight(key, lambda: self._alone(fn), abandoned=abandoned)
        await self.start()
        outer = await self._local.flight(
            key,
            lambda: self._cluster(key, fn),
            fallback=lambda: self._alone(fn, waited=True),
            abandoned=abandoned,
        )
        inner = outer.value
        if outer.role is Role.FOLLOWER:
            return Flight(inner.value, Role.FOLLOWER, True)
        return Flight(inner.value, inner.role, outer.shared or inner.shared, inner.waited_out)

    async def stream(
        self,
        key: str,
        open_upstream: Callable[[], AsyncIterator[bytes]],
        abandoned: Callable[[asyncio.Future[StreamFlight]], object] | None = None,
    ) -> StreamFlight:
        """Coalesce a stream; every caller gets every chunk from the first.

        ``abandoned``: see ``SingleFlight.stream``. A stream every reader on this
        replica has left stops, unless this replica leads it and callers on other
        replicas joined it."""

        async def own() -> StreamFlight:
            return StreamFlight(Role.LEADER, open_upstream(), waited_out=True)

        async def source() -> StreamFlight:
            if self._redis is None:
                return StreamFlight(Role.LEADER, open_upstream())
            await self.start()
            return await self._cluster_stream(key, open_upstream)

        idle = self.settings.deadline_s + self.settings.stream_idle_s  # the source enforces less
        return await self._streams.stream(
            key, source, fallback=own, idle_s=idle, abandoned=abandoned
        )

    def forget(self, key: str) -> None:
        self._local.forget(key)
        self._streams.forget(key)

    # -- keys ---------------------------------------------------------------------

    def _key(self, key: str, part: str) -> str:
        return f"{self.settings.key_prefix}:{{{key}}}:{part}"

    def _channel(self, key: str) -> str:
        return f"{self.settings.key_prefix}:ch:{key}"

    # -- value flights ---------------------------------------------------------------

    async def _alone(
        self, fn: Callable[[], Awaitable[bytes]], waited: bool = False
    ) -> Flight[bytes]:
        return Flight(await fn(), Role.LEADER, False, waited_out=waited)

    async def _cluster(self, key: str, fn: Callable[[], Awaitable[bytes]]) -> Flight[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.deadline_s
        lock, token = self._key(key, "lock"), uuid.uuid4().hex
        followed = False
        try:
            while True:
                owner = await self._take(lock, token)
                if owner == token:
                    self.stats.takeovers += int(followed)
                    return await self._lead(key, lock, token, fn)
                if not followed:
                    followed = True
                    self.stats.coalesced += 1
                payload = await self._follow(key, lock, owner, deadline)
                if payload is not None:
                    self.stats.upstream_calls_saved += 1
                    return Flight(decode_result(payload), Role.FOLLOWER, True)
                if loop.time() >= deadline:
                    self.stats.waited_out += 1
                    return await self._alone(fn, waited=True)
        except STORE_ERRORS as exc:
            self._store_error(exc)
            return await self._alone(fn, waited=followed)

    async def _take(self, lock: str, token: str) -> str:
        """Take the lock, or return its owner's token."""
        ttl_ms = int(self.settings.lock_ttl_s * 1000)
        _taken, owner, _pttl = await self._acquire(
            keys=[lock, followers_key(lock)], args=[token, ttl_ms]
        )
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def _lead(
        self, key: str, lock: str, token: str, fn: Callable[[], Awaitable[bytes]]
    ) -> Flight[bytes]:
        heartbeat = asyncio.create_task(self._heartbeat(lock, token))
        try:
            value = await fn()
        except asyncio.CancelledError:
            await self._quietly(self._release(keys=[lock, followers_key(lock)], args=[token]))
            raise
        except Exception as exc:
            await self._announce(key, lock, token, encode_error(exc))
            raise
        finally:
            heartbeat.cancel()
        await self._announce(key, lock, token, VALUE + value)
        return Flight(value, Role.LEADER, False)

    async def _announce(self, key: str, lock: str, token: str, payload: bytes) -> None:
        ttl_ms = int(self.settings.result_ttl_s * 1000)
        result = self._key(key, f"res:{token}")
        args = [token, payload, ttl_ms, self._channel(key)]
        await self._quietly(self._publish(keys=[lock, result, followers_key(lock)], args=args))

    async def _follow(self, key: str, lock: str, owner: str, deadline: float) -> bytes | None:
        """The owner's result, or None once its lock is gone or the deadline passed."""
        loop = asyncio.get_running_loop()
        channel, result = self._channel(key), self._key(key, f"res:{owner}")
        woken = asyncio.Event()
        self._waiters.setdefault(channel, set()).add(woken)
        try:
            while True:
                async with self._redis.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                    # Lock before result: publishing writes the result before it drops
                    # the lock, so a lock seen gone here means the result is readable.
                    current, pttl, payload = await pipe.get(lock).pttl(lock).get(result).execute()
                if payload is not None:
                    return bytes(payload)
                remaining = deadline - loop.time()
                if current is None or current.decode() != owner or remaining <= 0:
                    return None
                # Wake on the notification, at the lock's expiry, or at the next poll.
                wait = min(self.settings.poll_s, remaining, max(pttl, 1) / 1000 + 0.002)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), wait)
                woken.clear()
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[channel]

    async def _heartbeat(self, lock: str, token: str) -> None:
        ttl_ms = int(self.settings.lock_ttl_s * 1000)
        while True:
            await asyncio.sleep(self.settings.lock_ttl_s / 3)
            renewed = self._renew(keys=[lock, followers_key(lock)], args=[token, ttl_ms])
            if not await self._quietly(renewed):
                return  # lost the lock (or Redis): waiters will take over

    # -- notifications -------------------------------------------------------------

    async def _listen(self) -> None:
        assert self._redis is not None

        async def handle(message: Message) -> None:
            if message is None:
                return
            if message["type"] == "psubscribe":
                self._ready.set()
            elif message["type"] == "pmessage":
                self._wake(message["channel"])

        def down(exc: BaseException) -> None:
            self._ready.clear()
            self._store_error(exc)

        channels = f"{self.settings.key_prefix}:ch:*"
        await follow_channel(
            self._redis, channels, handle, on_down=down, pattern=True, retry_s=self.settings.poll_s
        )

    def _wake(self, channel: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        for event in self._waiters.get(name, ()):
            event.set()

    # -- streams ------------------------------------------------------------------

    async def _cluster_stream(
        self, key: str, open_upstream: Callable[[], AsyncIterator[bytes]]
    ) -> StreamFlight:
        lock, token = self._key(key, "slock"), uuid.uuid4().hex
        try:
            owner = await self._take(lock, token)
        except STORE_ERRORS as exc:
            self._store_error(exc)
            return StreamFlight(Role.LEADER, open_upstream())

        # Wanted elsewhere only while this replica leads (a follower may take a dead
        # leader's place under the same token) and others follow it.
        async def wanted() -> bool:
            return await self._followed(lock, token)

        if owner == token:
            chunks = lead_stream(self, key, lock, token, open_upstream)
            return StreamFlight(Role.LEADER, chunks, wanted=wanted)
        self.stats.coalesced += 1
        chunks = follow_stream(self, key, lock, owner, open_upstream, token)
        return StreamFlight(Role.FOLLOWER, chunks, wanted=wanted)

    async def _followed(self, lock: str, token: str) -> bool:
        """Whether ``token`` holds ``lock`` and callers on other replicas follow its
        flight (counted when they found it taken, uncounted when they stop following
        before its end)."""
        assert self._redis is not None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                owner, count = await pipe.get(lock).get(followers_key(lock)).execute()
        except STORE_ERRORS as exc:  # they could not read the mirrored stream either
            self._store_error(exc)
            return False
        return owner == token.encode() and count is not None and int(count) > 0

    # -- helpers ------------------------------------------------------------------

    async def _quietly(self, call: Awaitable[Any]) -> Any:
        """A best-effort Redis call: failures are counted, never raised."""
        try:
            return await call
        except STORE_ERRORS as exc:
            self._store_error(exc)
            return None

    def _store_error(self, exc: BaseException) -> None:
        self.stats.store_errors += 1
        log.warning("dedup: Redis unavailable, coalescing locally only: %s", exc)
