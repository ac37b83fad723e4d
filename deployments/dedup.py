"""Single-flight: identical requests in flight at once share one upstream call.

``SingleFlight`` is the in-process layer (asyncio), after Go's
``golang.org/x/sync/singleflight``:
- ``flight(key, fn)`` runs ``fn`` once per key at a time; callers that arrive
  while it runs get the leader's value, or the leader's exception;
- nothing is remembered once the call completes (the next caller starts afresh);
- ``forget(key)`` lets the next caller start a new call while one still runs;
- the leader's call runs in its own task: neither the leader's caller nor any
  follower can cancel it by going away (a disconnecting client must not fail
  the others), and a cancelled call still releases every follower;
- a follower waits at most ``deadline_s``, then calls upstream itself
  (nginx's ``proxy_cache_lock_timeout``).

Streams coalesce through a ``ChunkBuffer``: the leader's task appends chunks,
and every reader, however late it joins, reads from the first chunk.

The cross-replica layer on Redis is ``deployments.dedup_redis``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from deployments.tasks import cancel_and_wait
from serve_app.errors import ServiceUnavailableError, UpstreamTimeoutError

T = TypeVar("T")


class Role(StrEnum):
    """The ``x-dedup`` response header."""

    LEADER = "LEADER"
    FOLLOWER = "FOLLOWER"


@dataclass(frozen=True, slots=True)
class Flight(Generic[T]):
    value: T
    role: Role
    shared: bool  # the value went to more than one caller (Go's ``shared``)
    waited_out: bool = False  # joined a flight, then called upstream itself


@dataclass(frozen=True, slots=True)
class StreamFlight:
    role: Role
    chunks: AsyncIterator[bytes]
    waited_out: bool = False
    # Whether someone elsewhere (another replica) still reads this stream: one that
    # nobody here reads any more goes on only then. None: nobody elsewhere can.
    wanted: Callable[[], Awaitable[bool]] | None = None


@dataclass(slots=True)
class DedupStats:
    """Counters for metrics; per replica, monotonic."""

    flights: int = 0  # flights started in this process (each one call of its fn)
    coalesced: int = 0  # requests that joined someone else's flight
    upstream_calls_saved: int = 0  # followers served by the leader's result
    waited_out: int = 0  # followers that passed their deadline and went upstream
    takeovers: int = 0  # cross-replica: a follower took over a dead leader's lock
    streams_stopped: int = 0  # streams stopped because every reader had left
    store_errors: int = 0  # cross-replica: Redis failed, degraded to local


class FlightAbandonedError(ServiceUnavailableError):
    """The shared call was cancelled (the replica is shutting down)."""

    code = "flight_abandoned"


class ChunkBuffer:
    """An append-only list of chunks that any number of readers replay from 0.

    It counts its active readers: when the last one leaves before the end,
    ``on_idle`` runs (nobody here wants the rest: the flight may stop).
    """

    def __init__(self, on_idle: Callable[[], object] | None = None) -> None:
        self.on_idle = on_idle
        self.active = 0  # readers that keep the flight going
        self._chunks: list[bytes] = []
        self._error: BaseException | None = None
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._wake()

    def close(self, error: BaseException | None = None) -> None:
        self._error = error
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        # One event per generation: every waiter of the old one wakes at once.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def read(self, idle_s: float | None = None) -> ChunkReader:
        """A new reader from the first chunk (an active one)."""
        return ChunkReader(self, idle_s)

    def _left(self) -> None:
        self.active -= 1
        if self.active == 0 and not self._closed and self.on_idle is not None:
            self.on_idle()


class ChunkReader:
    """One reader's place in a ``ChunkBuffer``: every chunk from the first; raises the
    producer's error at the end, ``UpstreamTimeoutError`` when no chunk arrives for
    ``idle_s``.

    It keeps the flight going until it reaches the end, fails, is closed (its
    client left) or is detached (it reads on, unseen, but no longer keeps the flight
    going: a leader whose client left still needs to know what the call cost).
    """

    __slots__ = ("_buffer", "_closed", "_idle_s", "_index", "active")

    def __init__(self, buffer: ChunkBuffer, idle_s: float | None) -> None:
        self._buffer, self._idle_s = buffer, idle_s
        self._index = 0
        self._closed = False
        self.active = True
        buffer.active += 1

    def __aiter__(self) -> ChunkReader:
        return self

    async def __anext__(self) -> bytes:
        buffer = self._buffer
        while not self._closed:
            if self._index < len(buffer._chunks):
                chunk = buffer._chunks[self._index]
                self._index += 1
                return chunk
            if buffer._closed:
                self.close()
                if buffer._error is not None:
                    raise buffer._error
                break
            try:
                await asyncio.wait_for(buffer._changed.wait(), self._idle_s)
            except TimeoutError:
                self.close()
                raise UpstreamTimeoutError("the coalesced stream stalled") from None
        raise StopAsyncIteration

    def detach(self) -> None:
        """Read on without keeping the flight going."""
        if self.active:
            self.active = False
            self._buffer._left()

    def close(self) -> None:
        """Read no more."""
        self._closed = True
        self.detach()

    async def aclose(self) -> None:
        self.close()


@dataclass(slots=True)
class _Call(Generic[T]):
    result: asyncio.Future[T]
    dups: int = 0
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _StreamCall:
    result: asyncio.Future[Role]  # the source's role, once it is open
    buffer: ChunkBuffer
    dups: int = 0
    task: asyncio.Task[None] | None = None
    wanted: Callable[[], Awaitable[bool]] | None = None


def _when_open(opened: asyncio.Future[Role], reader: ChunkReader) -> asyncio.Future[StreamFlight]:
    """The flight ``reader`` reads, once its source is open (or the reason it never was)."""
    flight: asyncio.Future[StreamFlight] = asyncio.get_running_loop().create_future()
    flight.add_done_callback(_retrieve)

    def settle(done: asyncio.Future[Role]) -> None:
        if done.cancelled():
            flight.set_exception(FlightAbandonedError("the coalesced stream was cancelled"))
        elif (error := done.exception()) is not None:
            flight.set_exception(error)
        else:
            flight.set_result(StreamFlight(done.result(), reader))

    opened.add_done_callback(settle)
    return flight


def _retrieve(future: asyncio.Future[object]) -> None:
    # A call nobody awaits any more must not log "exception never retrieved".
    if not future.cancelled():
        future.exception()


class SingleFlight(Generic[T]):
    """In-process single-flight over asyncio (one per replica)."""

    def __init__(self, deadline_s: float | None = None, recheck_s: float = 1.0) -> None:
        self.deadline_s = deadline_s
        self.recheck_s = recheck_s  # how often a stream nobody here reads asks if it is wanted
        self.stats = DedupStats()
        self._calls: dict[str, _Call[T]] = {}  # single event loop: no lock needed
        self._streams: dict[str, _StreamCall] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Go's ``Do``: the value and whether it was shared."""
        flight = await self.flight(key, fn)
        return flight.value, flight.shared

    async def close(self) -> None:
        """Stop asking whether abandoned streams are still wanted (at shutdown)."""
        for task in list(self._stopping):
            await cancel_and_wait(task)

    def forget(self, key: str) -> None:
        """The next call for ``key`` starts a new flight; current waiters are unaffected."""
        self._calls.pop(key, None)
        self._streams.pop(key, None)

    def in_flight(self, key: str) -> bool:
        return key in self._calls or key in self._streams

    async def flight(
        self,
        key: str,
        fn: Callable[[], Awaitable[T]],
        *,
        fallback: Callable[[], Awaitable[T]] | None = None,
        deadline_s: float | None = None,
        abandoned: Callable[[asyncio.Future[T]], object] | None = None,
    ) -> Flight[T]:
        """Run ``fn`` once for concurrent callers of ``key``.

        A follower past its deadline calls ``fallback`` (default ``fn``) itself. A
        leader cancelled while its call goes on (for its followers) hands the call's
        future to ``abandoned``: what it costs is still its caller's.
        """
        call = self._calls.get(key)
        if call is None:
            call = self._start(self._calls, key, lambda c: self._run(c, fn))
            try:
                value = await asyncio.shield(call.result)
            except asyncio.CancelledError:
                if abandoned is not None and not call.result.done():
                    abandoned(call.result)
                raise
            return Flight(value, Role.LEADER, call.dups > 0)
        call.dups += 1
        self.stats.coalesced += 1
        if not await self._wait(call, deadline_s):
            value = await (fallback or fn)()
            return Flight(value, Role.LEADER, False, waited_out=True)
        self.stats.upstream_calls_saved += 1
        return Flight(call.result.result(), Role.FOLLOWER, True)

    async def stream(
        self,
        key: str,
        open_stream: Callable[[], Awaitable[StreamFlight]],
        *,
        fallback: Callable[[], Awaitable[StreamFlight]] | None = None,
        deadline_s: float | None = None,
        idle_s: float | None = None,
        abandoned: Callable[[asyncio.Future[StreamFlight]], object] | None = None,
    ) -> StreamFlight:
        """Coalesce a stream: every caller reads the leader's chunks from the first.

        ``open_stream`` returns the source (its role matters to the cross-replica
        layer); a late joiner replays the buffered chunks. When every reader has
        left before the end, the source is stopped (unless it is ``wanted``
        elsewhere) and the key forgotten. A leader cancelled before its source
        opened hands ``abandoned`` a future of its (detached) flight: what the call
        costs is still its caller's.
        """
        call = self._streams.get(key)
        if call is None:
            call = _StreamCall(asyncio.get_running_loop().create_future(), ChunkBuffer())
            call.buffer.on_idle = lambda: self._idle(key, call)
            self._launch(self._streams, key, call, lambda c: self._run_stream(c, open_stream))
            reader = call.buffer.read(idle_s)
            try:
                role = await asyncio.shield(call.result)
            except asyncio.CancelledError:
                if abandoned is None:
                    reader.close()
                else:
                    reader.detach()
                    abandoned(_when_open(call.result, reader))
                raise
            except BaseException:
                reader.close()
                raise
            return StreamFlight(role, reader)
        call.dups += 1
        self.stats.coalesced += 1
        # Counted before waiting: the leader's client leaving must not stop a stream
        # that a follower waits for.
        reader = call.buffer.read(idle_s)
        try:
            opened = await self._wait(call, deadline_s)
            if opened and (error := call.result.exception()) is not None:
                raise error
        except BaseException:
            reader.close()
            raise
        if not opened:
            reader.close()
            source = await (fallback or open_stream)()
            return StreamFlight(Role.LEADER, source.chunks, waited_out=True)
        self.stats.upstream_calls_saved += 1
        return StreamFlight(Role.FOLLOWER, reader)

    def _idle(self, key: str, call: _StreamCall) -> None:
        task = asyncio.create_task(self._stop_unwanted(key, call))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_unwanted(self, key: str, call: _StreamCall) -> None:
        """Nobody here reads the stream any more: stop it, unless it is wanted elsewhere."""
        # Let the source finish opening: a cross-replica leader then holds a lock
        # that stopping releases (cancelled mid-open, it would leave it to expire).
        await asyncio.wait({call.result})
        while call.wanted is not None:
            try:
                if not await call.wanted():
                    break
            except Exception:  # cannot tell: the stream goes on, as it would have
                return
            await asyncio.sleep(self.recheck_s)  # wanted elsewhere: until it is not
            if call.buffer.active or call.buffer.closed:
                return  # a reader here again (its leaving asks anew), or the end
        if call.buffer.active or call.buffer.closed:
            return  # someone joined meanwhile, or it ended
        if self._streams.get(key) is call:
            del self._streams[key]
        self.stats.streams_stopped += 1
        await cancel_and_wait(call.task)  # asked again if a cancellation is lost

    def _start(
        self, calls: dict[str, _Call[T]], key: str, run: Callable[[_Call[T]], Awaitable[None]]
    ) -> _Call[T]:
        call: _Call[T] = _Call(asyncio.get_running_loop().create_future())
        return self._launch(calls, key, call, run)

    def _launch(
        self, calls: dict[str, Any], key: str, call: Any, run: Callable[[Any], Awaitable[None]]
    ) -> Any:
        call.result.add_done_callback(_retrieve)
        calls[key] = call
        call.task = asyncio.create_task(self._own(calls, key, call, run))
        self.stats.flights += 1
        return call

    async def _own(
        self,
        calls: dict[str, Any],
        key: str,
        call: _Call[Any] | _StreamCall,
        run: Callable[[Any], Awaitable[None]],
    ) -> None:
        try:
            await run(call)
        except asyncio.CancelledError:
            if not call.result.done():
                call.result.set_exception(FlightAbandonedError("the coalesced call was cancelled"))
            raise
        except Exception as exc:
            if not call.result.done():
                call.result.set_exception(exc)
        finally:
            if calls.get(key) is call:  # forget() may have handed the key to a newer call
                del calls[key]

    @staticmethod
    async def _run(call: _Call[T], fn: Callable[[], Awaitable[T]]) -> None:
        call.result.set_result(await fn())

    @staticmethod
    async def _run_stream(
        call: _StreamCall, open_stream: Callable[[], Awaitable[StreamFlight]]
    ) -> None:
        # The entry stays registered until the stream ends, so late joiners replay it.
        buffer = call.buffer
        try:
            source = await open_stream()
        except asyncio.CancelledError:
            buffer.close(FlightAbandonedError("the coalesced stream was cancelled"))
            raise
        except Exception as exc:
            buffer.close(exc)
            raise
        call.wanted = source.wanted
        call.result.set_result(source.role)
        try:
            async for chunk in source.chunks:
                buffer.append(chunk)
        except asyncio.CancelledError:
            buffer.close(FlightAbandonedError("the coalesced stream was cancelled"))
            raise
        except Exception as exc:  # every reader must see the producer's failure
            buffer.close(exc)
        else:
            buffer.close()

    async def _wait(self, call: _Call[Any] | _StreamCall, deadline_s: float | None) -> bool:
        """Wait for the leader; False when the deadline passed first."""
        timeout = deadline_s if deadline_s is not None else self.deadline_s
        done, _ = await asyncio.wait({call.result}, timeout=timeout)
        if not done:
            self.stats.waited_out += 1
            return False
        return True
