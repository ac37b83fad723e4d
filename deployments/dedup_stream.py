"""Streams coalesced across replicas through a Redis Stream per flight.

The leader appends every chunk (``XADD`` field ``d``) and then an end entry
(``e``) or an error entry (``x``); the stream outlives the flight by
``result_ttl_s``. Followers ``XREAD`` from ``0``, so however late they join they
get the whole stream. While a follower has nothing new it checks the leader's
lock: a lock gone without an end entry means the leader died; a follower that
has sent nothing yet takes over (or follows the new owner), one that has
already sent chunks can only fail its client honestly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from deployments.dedup_wire import decode_error, encode_error, followers_key
from deployments.store_errors import STORE_ERRORS
from serve_app.errors import UpstreamTimeoutError, UpstreamUnreachableError

if TYPE_CHECKING:
    from deployments.dedup_redis import RedisSingleFlight


async def _append(owner: RedisSingleFlight, stream: str, fields: dict[str, bytes]) -> bool:
    settings = owner.settings
    ttl_ms = int((settings.lock_ttl_s + settings.result_ttl_s) * 1000)
    assert owner._redis is not None
    async with owner._redis.pipeline(transaction=False) as pipe:
        pipe.xadd(stream, fields).pexpire(stream, ttl_ms)
        return await owner._quietly(pipe.execute()) is not None


async def lead_stream(
    owner: RedisSingleFlight,
    key: str,
    lock: str,
    token: str,
    open_upstream: Callable[[], AsyncIterator[bytes]],
) -> AsyncIterator[bytes]:
    """The upstream's chunks, mirrored into the flight's Redis Stream."""
    stream = owner._key(key, f"st:{token}")
    heartbeat = asyncio.create_task(owner._heartbeat(lock, token))
    mirroring = True
    try:
        try:
            async for chunk in open_upstream():
                if mirroring and not await _append(owner, stream, {"d": chunk}):
                    mirroring = False
                    heartbeat.cancel()  # let followers see the lock lapse and move on
                yield chunk
        except Exception as exc:
            if mirroring:
                await _append(owner, stream, {"x": encode_error(exc)})
            raise
        if mirroring:
            await _append(owner, stream, {"e": b"1"})
    finally:
        heartbeat.cancel()
        await owner._quietly(owner._release(keys=[lock, followers_key(lock)], args=[token]))


def _entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3 shape
        return [entry for entries in reply.values() for entry in entries[0]]
    return [entry for _name, entries in reply for entry in entries]  # type: ignore[attr-defined]


class _Reader:
    """Reads one flight's stream from the start, remembering its position."""

    def __init__(self, owner: RedisSingleFlight, stream: str) -> None:
        self.owner, self.stream, self.last_id = owner, stream, b"0-0"

    async def read(self, block_ms: int | None) -> tuple[list[bytes], bool]:
        """New chunks and whether the end entry came; raises the leader's error."""
        assert self.owner._redis is not None
        reply = await self.owner._redis.xread(
            {self.stream: self.last_id}, count=256, block=block_ms
        )
        out: list[bytes] = []
        for entry_id, fields in _entries(reply):
            self.last_id = entry_id
            if b"x" in fields:
                raise decode_error(fields[b"x"])
            if b"e" in fields:
                return out, True
            out.append(fields[b"d"])
        return out, False


async def _poll(
    owner: RedisSingleFlight, reader: _Reader, lock: str, leader: str
) -> tuple[list[bytes], bool, bool]:
    """New chunks, whether the stream ended, and whether its leader is lost."""
    chunks, ended = await reader.read(owner.settings.stream_block_ms)
    if chunks or ended:
        return chunks, ended, False
    current = await owner._redis.get(lock)  # type: ignore[union-attr]
    if current is not None and current.decode() == leader:
        return [], False, False
    # The end entry may have landed just before the lock was released.
    chunks, ended = await reader.read(None)
    return chunks, ended, not (chunks or ended)


async def follow_stream(
    owner: RedisSingleFlight,
    key: str,
    lock: str,
    leader: str,
    open_upstream: Callable[[], AsyncIterator[bytes]],
    token: str,
) -> AsyncIterator[bytes]:
    """The leader's chunks from the first; takes over a dead leader if nothing was sent
    (leading under ``token``)."""
    settings, loop = owner.settings, asyncio.get_running_loop()
    reader = _Reader(owner, owner._key(key, f"st:{leader}"))
    sent, last_progress = False, loop.time()
    source: AsyncIterator[bytes] | None = None  # set when this follower stops following
    try:
        while source is None:
            try:
                chunks, ended, lost = await _poll(owner, reader, lock, leader)
                if lost and not sent:
                    leader = await owner._take(lock, token)
            except STORE_ERRORS as exc:
                if sent:
                    raise UpstreamUnreachableError("lost the coalesced stream") from exc
                owner._store_error(exc)
                source = open_upstream()
                break
            for chunk in chunks:
                sent, last_progress = True, loop.time()
                yield chunk
            if ended:
                return
            if lost:
                if sent:
                    raise UpstreamUnreachableError("the coalesced stream's leader was lost")
                if leader == token:
                    owner.stats.takeovers += 1
                    source = lead_stream(owner, key, lock, token, open_upstream)
                else:  # someone else took over first: follow them from their start
                    reader = _Reader(owner, owner._key(key, f"st:{leader}"))
                    last_progress = loop.time()
            elif not chunks and loop.time() - last_progress > (
                settings.stream_idle_s if sent else settings.deadline_s
            ):
                if sent:
                    raise UpstreamTimeoutError("the coalesced stream stalled")
                owner.stats.waited_out += 1
                await _unfollow(owner, lock, leader)
                source = open_upstream()
    except asyncio.CancelledError:
        await _unfollow(owner, lock, leader)  # its readers left: the leader may stop
        raise
    async for chunk in source:
        yield chunk


async def _unfollow(owner: RedisSingleFlight, lock: str, leader: str) -> None:
    """Stop being counted on ``leader``'s flight, which goes on only for its followers."""
    await owner._quietly(owner._unfollow(keys=[lock, followers_key(lock)], args=[leader]))
