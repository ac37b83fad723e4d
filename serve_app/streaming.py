"""Server-sent events between the upstream and the client.

Upstream bytes are re-cut into whole events (an upstream may split an event
across TCP reads) so the gateway can look at each one: the final usage chunk
is kept for accounting and dropped when the client did not ask for it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Send

from deployments.sse_replay import sse_event
from serve_app.errors import GatewayError
from serve_app.ticket import in_background

DONE = b"data: [DONE]\n\n"


class EventSplitter:
    """Feeds raw bytes, yields complete SSE events (without the blank line)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            if event.strip():
                yield event


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's ``data:`` lines, or None for comments/other fields."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


@dataclass
class StreamResult:
    """What a relayed stream turned out to be, for the stages after it. It keeps the
    streamed text (to estimate tokens when no usage comes) and the latest chunk, not
    every parsed chunk: a long stream costs its text in memory, not its JSON."""

    done: bool = False
    usage: dict[str, Any] | None = None
    last: dict[str, Any] | None = None  # the latest parsed chunk
    text: list[str] = field(default_factory=list)  # the choices' delta contents (or texts)
    error: GatewayError | None = None

    def completion_text(self) -> str:
        return "".join(self.text)


def inspect_event(data: bytes, result: StreamResult) -> bool:
    """Record what a data payload says; False when it is the usage-only chunk."""
    if data == b"[DONE]":
        result.done = True
        return True
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(chunk, dict):
        return True
    result.last = chunk
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        # A chat chunk's delta, or a text completion's text (``/v1/completions``).
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(content, str) and content:
            result.text.append(content)
    if chunk.get("usage"):
        result.usage = chunk["usage"]
        return bool(chunk.get("choices"))
    return True


encode_event = sse_event  # one event of a stream to the client


def error_event(error: GatewayError) -> bytes:
    """How a failure after the first byte reaches a streaming client (no [DONE])."""
    return encode_event(error.to_dict())


class RelayResponse(StreamingResponse):
    """A relayed stream's response, whose relay is closed however the response ends,
    so the cleanup in it (close the upstream, give back its slot, bill) runs at once.
    A client may leave while the response starts, before its body is first read: the
    relay's generator has then never run, and closing it would run nothing. It is
    started here in that case and closed at once, as if the client had left after the
    first event. ``started`` tells whether the relay began."""

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        started: Callable[[], bool],
        headers: dict[str, str],
    ) -> None:
        super().__init__(body, headers=headers, media_type="text/event-stream")
        self._body = body
        self._started = started

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            # Starlette does not close a body it stopped reading (a client gone while
            # a chunk was sent): the relay's cleanup would wait for the garbage collector.
            if not self._started():
                in_background(_first_then_close(self._body))
            elif self._body.ag_frame is not None:  # None: it ran to its end, nothing to close
                in_background(self._body.aclose())


async def _first_then_close(body: AsyncGenerator[bytes, None]) -> None:
    try:
        await anext(body, None)
    finally:
        await body.aclose()
