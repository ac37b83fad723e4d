"""The limiter's calls of one replica, many to one Lua call (``limiter_batch.lua``).

A decision is on the answer's path and each Redis call costs the replica far
more CPU in redis-py (connection checkout, command packing, reply parsing)
than the script costs the server, so calls share one:

* acquires made in one event-loop iteration leave together on the next
  iteration (no timer: one loop turn of latency at most);
* token settlements wait for a ride on the next acquire call, or leave on
  their own after ``settle_delay_s`` when no acquire comes; ``settle_soon``
  queues one without a task (the answer does not wait for it) and ``drain``
  waits for every queued one, at shutdown.

Each caller still gets its own reply or error. The script decides each
acquire on its own (a lease, ``limiter_lease.py``, is one acquire of many
requests), all windows and both dimensions at once, exactly as one call per
request would; the whole run is atomic and reads the clock once.
A call's time bound (the smallest ``timeout_s`` among its callers) applies to
the one round trip: when it passes, every caller in it gets ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from deployments.tasks import wait_all

MAX_CALLS = 64  # acquires + settlements per script run: bounds how long it holds the server


class WindowKeys(Protocol):
    """The two keys of one window (layout in limiter_acquire.lua)."""

    @property
    def log_key(self) -> str: ...
    @property
    def costs_key(self) -> str: ...


class BatchCheck(WindowKeys, Protocol):
    """One window an acquire checks; ``spec`` is its limits as the script reads
    them: ``b"window resolution request_limit token_limit shadow"``."""

    @property
    def spec(self) -> bytes: ...


class SettledWindow(WindowKeys, Protocol):
    """One window that recorded a request's reservation."""

    @property
    def slice_us(self) -> int: ...
    @property
    def window_us(self) -> int: ...
    @property
    def resolution_us(self) -> int: ...


@dataclass(slots=True)
class _Acquire:
    checks: Sequence[BatchCheck]
    tokens: int
    timeout_s: float
    future: asyncio.Future[list[int]]
    lease: tuple[int, int] | None = None  # (requests, for_us): a lease, not one request


@dataclass(slots=True)
class _Settle:
    windows: Sequence[SettledWindow]
    delta: int
    timeout_s: float
    future: asyncio.Future[Any]
    requests: int = 0  # <= 0: requests given back (a lease's unused part)


class LimiterBatch:
    def __init__(
        self,
        client: aioredis.Redis,
        source: str,
        now: Callable[[], str],
        settle_delay_s: float = 0.002,
    ) -> None:
        self._client = client
        self._script = client.register_script(source)
        self._now = now  # ARGV[1]: "" = the server's clock
        self._settle_delay_s = settle_delay_s
        self._acquires: list[_Acquire] = []
        self._settles: list[_Settle] = []
        self._flusher: asyncio.Task[None] | None = None  # a flush due next iteration
        self._timer: asyncio.TimerHandle | None = None  # settlements' own flush
        self._running: set[asyncio.Task[None]] = set()  # the loop keeps tasks weakly
        self._unsettled: set[asyncio.Future[Any]] = set()  # settle_soon's, until applied

    async def acquire(
        self,
        checks: Sequence[BatchCheck],
        tokens: int,
        timeout_s: float,
        lease: tuple[int, int] | None = None,
    ) -> list[int]:
        """The script's reply for one request, or for a lease of ``(requests,
        for_us)`` (``acquire()`` in limiter_acquire.lua)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._acquires.append(_Acquire(checks, tokens, timeout_s, future, lease))
        if self._flusher is None:
            self._start_flush(loop)
        return await future

    async def settle(
        self, windows: Sequence[SettledWindow], delta: int, timeout_s: float, requests: int = 0
    ) -> None:
        """Apply a settlement once (``delta`` tokens; ``requests`` <= 0 gives
        requests back); returns when it has been applied."""
        await self._queue_settle(windows, delta, timeout_s, requests)

    def settle_soon(
        self,
        windows: Sequence[SettledWindow],
        delta: int,
        timeout_s: float,
        done: Callable[[asyncio.Future[Any]], None],
        requests: int = 0,
    ) -> None:
        """Queue a settlement and return at once; ``done`` gets its future when it
        has been applied or has failed."""
        future = self._queue_settle(windows, delta, timeout_s, requests)
        self._unsettled.add(future)
        future.add_done_callback(self._unsettled.discard)
        future.add_done_callback(done)

    async def drain(self) -> None:
        """Wait until every settlement queued by ``settle_soon`` has left and answered."""
        await wait_all(self._unsettled)

    def _queue_settle(
        self, windows: Sequence[SettledWindow], delta: int, timeout_s: float, requests: int
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._settles.append(_Settle(windows, delta, timeout_s, future, requests))
        if self._flusher is None and self._timer is None:
            self._timer = loop.call_later(self._settle_delay_s, self._on_timer)
        return future

    def _on_timer(self) -> None:
        self._timer = None
        if self._settles and self._flusher is None:
            self._start_flush(asyncio.get_running_loop())

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush on the loop's next iteration: whatever is queued by then goes."""
        self._flusher = task = loop.create_task(self._flush())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _flush(self) -> None:
        self._flusher = None
        # A caller that gave up before its call left is not decided at all.
        acquires = [a for a in self._acquires[:MAX_CALLS] if not a.future.done()]
        del self._acquires[:MAX_CALLS]
        room = MAX_CALLS - len(acquires)
        settles, self._settles = self._settles[:room], self._settles[room:]
        if self._acquires or self._settles:  # more than one run holds
            self._start_flush(asyncio.get_running_loop())
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if acquires or settles:
            await self._run(acquires, settles)

    async def _run(self, acquires: list[_Acquire], settles: list[_Settle]) -> None:
        waiting: list[_Acquire | _Settle] = [*settles, *acquires]
        try:
            keys, args = _encode(self._now(), acquires, settles)
            async with asyncio.timeout(min(item.timeout_s for item in waiting)):
                replies: Any = await self._call(keys, args)
            if not isinstance(replies, list) or len(replies) != len(waiting):
                raise ResponseError(f"limiter script answered {replies!r}")
        except BaseException as exc:
            for item in waiting:
                if item.future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    item.future.cancel()
                else:
                    item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for item, reply in zip(waiting, replies, strict=True):
            if item.future.done():
                continue
            if isinstance(reply, Exception):
                item.future.set_exception(reply)
            else:
                item.future.set_result(reply)

    async def _call(self, keys: list[str], args: list[str | int | bytes]) -> Any:
        # EVALSHA straight away: redis-py's Script wrapper costs the replica a few
        # microseconds more per run, on the answer's path.
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        try:
            return await self._client.execute_command(*command)
        except NoScriptError:  # a restarted server forgot it
            await self._client.script_load(self._script.script)
            return await self._client.execute_command(*command)


def _encode(
    now: str, acquires: list[_Acquire], settles: list[_Settle]
) -> tuple[list[str], list[str | int | bytes]]:
    """KEYS and ARGV of one run (layout in limiter_batch.lua): each window's
    keys and each check's limits go once, however many requests share them."""
    keys: list[str] = []
    pairs: dict[str, int] = {}  # log key -> k
    specs: list[bytes] = []
    refs: dict[int, bytes] = {}  # id(check) -> its number, as the script reads it

    def pair(log_key: str, costs_key: str) -> int:
        k = pairs.get(log_key)
        if k is None:
            keys.append(log_key)
            keys.append(costs_key)
            k = pairs[log_key] = len(pairs) + 1
        return k

    settle_args: list[bytes] = []
    for settle in settles:
        parts = [b"%d %d" % (settle.delta, settle.requests)]
        for w in settle.windows:
            k = pair(w.log_key, w.costs_key)
            parts.append(b"%d %d %d %d" % (k, w.slice_us, w.window_us, w.resolution_us))
        settle_args.append(b" ".join(parts))
    acquire_args: list[bytes] = []
    for acquire in acquires:
        if acquire.lease is None:
            parts = [b"%d" % acquire.tokens]
        else:
            parts = [b"L %d %d %d" % (*acquire.lease, acquire.tokens)]
        for check in acquire.checks:
            ref = refs.get(id(check))
            if ref is None:
                specs.append(b"%d %b" % (pair(check.log_key, check.costs_key), check.spec))
                ref = refs[id(check)] = b"%d" % len(specs)
            parts.append(ref)
        acquire_args.append(b" ".join(parts))
    return keys, [now, len(specs), len(settle_args), *specs, *settle_args, *acquire_args]
