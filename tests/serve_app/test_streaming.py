from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator

import pytest

from serve_app.streaming import (
    EventSplitter,
    RelayResponse,
    StreamResult,
    event_data,
    inspect_event,
)
from serve_app.ticket import drain_background


def test_events_split_across_reads_are_reassembled() -> None:
    splitter = EventSplitter()
    out = list(splitter.feed(b'data: {"a"'))
    assert out == []
    out = list(splitter.feed(b": 1}\n\ndata: [DO"))
    assert out == [b'data: {"a": 1}']
    assert list(splitter.feed(b"NE]\r\n\r\n")) == [b"data: [DONE]"]


def test_event_data_ignores_comments_and_joins_lines() -> None:
    assert event_data(b": keep-alive") is None
    assert event_data(b"data: a\ndata: b") == b"a\nb"


def test_usage_only_chunk_is_recorded_and_flagged() -> None:
    result = StreamResult()
    assert inspect_event(b'{"choices": [{"delta": {"content": "x"}}]}', result)
    assert not inspect_event(b'{"choices": [], "usage": {"total_tokens": 5}}', result)
    assert inspect_event(b"[DONE]", result)
    assert result.done and result.usage == {"total_tokens": 5}
    assert result.last == {"choices": [], "usage": {"total_tokens": 5}}
    assert result.completion_text() == "x"


def test_only_the_streamed_text_is_kept() -> None:
    result = StreamResult()
    for i in range(1000):
        inspect_event(b'{"choices": [{"index": 0, "delta": {"content": "w%d "}}]}' % i, result)
    inspect_event(b'{"choices": [{"delta": {"role": "assistant"}}, "odd"]}', result)
    assert result.completion_text() == "".join(f"w{i} " for i in range(1000))
    assert result.last == {"choices": [{"delta": {"role": "assistant"}}, "odd"]}


class _Relay:
    """A relay's shape: ``run`` marks itself started and cleans up once, however it ends."""

    def __init__(self) -> None:
        self.started = False
        self.cleanups = 0

    async def run(self) -> AsyncGenerator[bytes, None]:
        self.started = True
        try:
            for n in range(3):
                yield b"data: %d\n\n" % n
                await asyncio.sleep(0.01)
        finally:
            self.cleanups += 1


@pytest.mark.parametrize("gone_at", [0, 1, 2, None])
async def test_a_relay_is_closed_at_once_however_its_client_leaves(gone_at: int | None) -> None:
    """Starlette (ASGI 2.3, as Serve speaks it) stops reading a body whose client left
    and leaves it to the garbage collector, which is off here: the relay must still be
    cleaned up once, whether it had begun (gone at a chunk) or not (gone at the head)."""
    relay = _Relay()
    response = RelayResponse(relay.run(), lambda: relay.started, {})
    sent = 0
    gone = asyncio.Event()

    async def send(message: dict[str, object]) -> None:
        nonlocal sent
        sent += 1
        if sent - 1 == gone_at:
            gone.set()
            await asyncio.sleep(1)  # a slow client, which leaves meanwhile

    async def receive() -> dict[str, object]:
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "headers": []}
    gc.disable()
    try:
        await response(scope, receive, send)
        await drain_background()
        assert relay.started and relay.cleanups == 1
    finally:
        gc.enable()
