"""SingleFlight: Go singleflight's behaviours, ordered with asyncio.Event."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from deployments.dedup import (
    ChunkBuffer,
    FlightAbandonedError,
    Role,
    SingleFlight,
    StreamFlight,
)
from serve_app.errors import UpstreamError, UpstreamTimeoutError


async def _until(predicate: object, attempts: int = 1000) -> None:
    """Yield to the loop until ``predicate()`` holds (no wall-clock sleeps)."""
    for _ in range(attempts):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_do_returns_value_not_shared() -> None:
    group: SingleFlight[str] = SingleFlight()

    async def fn() -> str:
        return "bar"

    assert await group.do("key", fn) == ("bar", False)


async def test_do_error_reaches_caller() -> None:
    group: SingleFlight[str] = SingleFlight()

    async def fn() -> str:
        raise UpstreamError("boom")

    with pytest.raises(UpstreamError, match="boom"):
        await group.do("key", fn)


async def test_duplicates_share_one_call_and_value() -> None:
    group: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "v"

    tasks = [asyncio.create_task(group.flight("k", fn)) for _ in range(10)]
    await _until(lambda: group.stats.coalesced == 9)
    release.set()
    flights = await asyncio.gather(*tasks)
    assert calls == 1
    assert [f.value for f in flights] == ["v"] * 10
    assert all(f.shared for f in flights)
    assert [f.role for f in flights].count(Role.LEADER) == 1
    assert group.stats.upstream_calls_saved == 9


async def test_duplicates_share_the_error() -> None:
    group: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def fn() -> str:
        await release.wait()
        raise UpstreamError("shared failure", status_code=503)

    tasks = [asyncio.create_task(group.flight("k", fn)) for _ in range(5)]
    await _until(lambda: group.stats.coalesced == 4)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) and r.status_code == 503 for r in results)


async def test_nothing_cached_after_completion() -> None:
    group: SingleFlight[int] = SingleFlight()
    calls = 0

    async def fn() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert (await group.flight("k", fn)).value == 1
    assert (await group.flight("k", fn)).value == 2
    assert not group.in_flight("k")


async def test_forget_starts_a_new_call_while_old_one_runs() -> None:
    group: SingleFlight[str] = SingleFlight()
    first_started, release_first = asyncio.Event(), asyncio.Event()

    async def first() -> str:
        first_started.set()
        await release_first.wait()
        return "first"

    async def second() -> str:
        return "second"

    leader = asyncio.create_task(group.flight("k", first))
    await first_started.wait()
    follower = asyncio.create_task(group.flight("k", second))
    await _until(lambda: group.stats.coalesced == 1)
    group.forget("k")
    fresh = await group.flight("k", second)
    assert fresh.value == "second" and fresh.role is Role.LEADER
    blocked = asyncio.create_task(group.flight("k", first))  # a third, new flight
    release_first.set()
    assert (await leader).value == "first"
    assert (await follower).value == "first"  # the follower keeps its leader's result
    assert (await blocked).value == "first"
    # The old leader's cleanup must not remove the newer call's entry.
    assert not group.in_flight("k")


async def test_follower_cancel_does_not_cancel_leader() -> None:
    group: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def fn() -> str:
        await release.wait()
        return "v"

    leader = asyncio.create_task(group.flight("k", fn))
    follower = asyncio.create_task(group.flight("k", fn))
    await _until(lambda: group.stats.coalesced == 1)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    release.set()
    assert (await leader).value == "v"


async def test_leader_cancel_does_not_fail_followers() -> None:
    group: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def fn() -> str:
        await release.wait()
        return "v"

    leader = asyncio.create_task(group.flight("k", fn))
    await asyncio.sleep(0)
    follower = asyncio.create_task(group.flight("k", fn))
    await _until(lambda: group.stats.coalesced == 1)
    leader.cancel()
    release.set()
    flight = await follower
    assert flight.value == "v" and flight.role is Role.FOLLOWER


async def test_cancelled_call_releases_followers_with_an_error() -> None:
    group: SingleFlight[str] = SingleFlight()
    started = asyncio.Event()

    async def fn() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    leader = asyncio.create_task(group.flight("k", fn))
    await started.wait()
    follower = asyncio.create_task(group.flight("k", fn))
    await _until(lambda: group.stats.coalesced == 1)
    call = group._calls["k"]
    assert call.task is not None
    call.task.cancel()
    for task in (leader, follower):
        with pytest.raises(FlightAbandonedError):
            await task
    gc.collect()


async def test_follower_past_deadline_calls_upstream_itself() -> None:
    group: SingleFlight[str] = SingleFlight(deadline_s=0.01)
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "slow"

    async def fallback() -> str:
        return "own"

    leader = asyncio.create_task(group.flight("k", slow))
    await asyncio.sleep(0)
    flight = await group.flight("k", slow, fallback=fallback)
    assert flight == type(flight)("own", Role.LEADER, False, waited_out=True)
    assert group.stats.waited_out == 1
    release.set()
    assert (await leader).value == "slow"


async def _chunks(parts: list[bytes], gate: asyncio.Event, after: int) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if i == after:
            await gate.wait()
        yield part


async def test_stream_late_joiner_gets_whole_stream() -> None:
    group: SingleFlight[object] = SingleFlight()
    gate = asyncio.Event()
    parts = [b"a", b"b", b"c", b"d"]
    opened = 0

    async def open_stream() -> StreamFlight:
        nonlocal opened
        opened += 1
        return StreamFlight(Role.LEADER, _chunks(parts, gate, after=2))

    leader = await group.stream("k", open_stream)
    first = [await anext(leader.chunks), await anext(leader.chunks)]
    late = await group.stream("k", open_stream)  # joins after two chunks went out
    gate.set()
    rest = [c async for c in leader.chunks]
    assert first + rest == parts
    assert late.role is Role.FOLLOWER
    assert [c async for c in late.chunks] == parts
    assert opened == 1
    assert not group.in_flight("k")


async def test_stream_error_reaches_every_reader() -> None:
    group: SingleFlight[object] = SingleFlight()
    gate = asyncio.Event()

    async def failing() -> AsyncIterator[bytes]:
        yield b"a"
        await gate.wait()
        raise UpstreamError("cut")

    async def open_stream() -> StreamFlight:
        return StreamFlight(Role.LEADER, failing())

    readers = [await group.stream("k", open_stream) for _ in range(3)]
    gate.set()
    for reader in readers:
        got: list[bytes] = []
        with pytest.raises(UpstreamError, match="cut"):
            async for chunk in reader.chunks:
                got.append(chunk)
        assert got == [b"a"]


async def test_chunk_buffer_idle_deadline() -> None:
    buffer = ChunkBuffer()
    buffer.append(b"x")
    reader = buffer.read(idle_s=0.01)
    assert await anext(reader) == b"x"
    with pytest.raises(UpstreamTimeoutError):
        await anext(reader)


class _Source:
    """A stream that yields ``parts`` and then waits for ``gate``; records its closing."""

    def __init__(self, parts: list[bytes], gate: asyncio.Event) -> None:
        self.parts, self.gate = parts, gate
        self.opened = 0
        self.closed = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            for part in self.parts:
                yield part
            await self.gate.wait()
            yield b"end"
        finally:
            self.closed.set()

    def opener(self, wanted: object = None) -> object:
        async def open_stream() -> StreamFlight:
            self.opened += 1
            return StreamFlight(Role.LEADER, self.chunks(), wanted=wanted)  # type: ignore[arg-type]

        return open_stream


async def test_a_stream_every_reader_left_is_stopped_and_forgotten() -> None:
    group: SingleFlight[object] = SingleFlight()
    source = _Source([b"a"], asyncio.Event())
    leader = await group.stream("k", source.opener())  # type: ignore[arg-type]
    assert await anext(leader.chunks) == b"a"
    await leader.chunks.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(source.closed.wait(), 1)
    assert group.stats.streams_stopped == 1
    await _until(lambda: not group.in_flight("k"))
    again = await group.stream("k", source.opener())  # type: ignore[arg-type]
    assert again.role is Role.LEADER and source.opened == 2


async def test_a_stream_goes_on_while_anyone_reads_it() -> None:
    group: SingleFlight[object] = SingleFlight()
    gate = asyncio.Event()
    source = _Source([b"a"], gate)
    leader = await group.stream("k", source.opener())  # type: ignore[arg-type]
    follower = await group.stream("k", source.opener())  # type: ignore[arg-type]
    assert await anext(leader.chunks) == b"a"
    await leader.chunks.aclose()  # type: ignore[attr-defined]
    gate.set()
    assert [c async for c in follower.chunks] == [b"a", b"end"]
    assert group.stats.streams_stopped == 0 and source.opened == 1


async def test_a_stream_wanted_elsewhere_goes_on_with_no_reader_here() -> None:
    group: SingleFlight[object] = SingleFlight()
    gate = asyncio.Event()
    source = _Source([b"a"], gate)
    asked = asyncio.Event()

    async def wanted() -> bool:
        asked.set()
        return True

    leader = await group.stream("k", source.opener(wanted))  # type: ignore[arg-type]
    await leader.chunks.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(asked.wait(), 1)
    gate.set()
    await asyncio.wait_for(source.closed.wait(), 1)  # it ran to its end
    assert group.stats.streams_stopped == 0 and not group.in_flight("k")


async def test_a_leader_that_left_before_the_stream_opened_can_still_read_it() -> None:
    """Its caller is billed for the call: it gets a detached reader of the flight, which
    reads to the end for a follower's sake, or sees the flight stopped with no one left."""
    group: SingleFlight[object] = SingleFlight()
    for with_follower in (True, False):
        gate, opening = asyncio.Event(), asyncio.Event()
        source = _Source([b"a"], gate)
        handed: list[asyncio.Future[StreamFlight]] = []

        async def open_stream(
            source: _Source = source, opening: asyncio.Event = opening
        ) -> StreamFlight:
            await opening.wait()
            return StreamFlight(Role.LEADER, source.chunks())

        leader = asyncio.create_task(group.stream("k", open_stream, abandoned=handed.append))
        await _until(lambda: group.in_flight("k"))
        follower = asyncio.create_task(group.stream("k", open_stream)) if with_follower else None
        await asyncio.sleep(0)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        opening.set()
        if with_follower:
            gate.set()
        flight = await asyncio.wait_for(handed[0], 1)
        assert flight.role is Role.LEADER
        if follower is not None:
            assert [c async for c in flight.chunks] == [b"a", b"end"]
            assert [c async for c in (await follower).chunks] == [b"a", b"end"]
        else:
            with pytest.raises(FlightAbandonedError):
                async for _ in flight.chunks:
                    pass
            assert group.stats.streams_stopped == 1
        await _until(lambda: not group.in_flight("k"))
