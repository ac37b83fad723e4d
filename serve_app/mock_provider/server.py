"""The mock provider standalone: a lean HTTP/1.1 server (an asyncio protocol,
httptools as the request parser) in front of ``answers.MockProvider``.

Why not uvicorn: the mock shares the machine with the gateway it is measured
against, so its CPU comes out of the gateway's figures. At the rate the gateway
calls it in the passthrough benchmark (~1.7k calls/s on 16 connections)
uvicorn and Starlette cost ~125-150 us of CPU per call, ~40 % of it writing
the head and the body in two syscalls (two packets for the gateway to read);
this server writes an answer in one and costs ~55-80 us (README, performance).
Inside Serve the mock stays a Starlette app (``app.py``); both serve the same
answers.

It does what OpenAI-style clients need: keep-alive, requests answered in order
(pipelined ones wait their turn), chunked SSE streams with flow control,
``Expect: 100-continue``, a body limit, and a 400 for what does not parse.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from http import HTTPStatus
from typing import NamedTuple, TypeVar

import httptools

from serve_app.mock_provider.answers import Admitted, MockAnswer, MockProvider, error

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY = 16 << 20
_QUEUE_LIMIT = 8  # pipelined requests held before reading pauses


class _Request(NamedTuple):
    method: str
    path: str
    body: bytes
    keep_alive: bool


class _BodyTooLarge(Exception):
    pass


@lru_cache(maxsize=64)
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


def _head(answer: MockAnswer, length: int | None, keep_alive: bool) -> bytes:
    """Status line and headers; ``length`` None: a chunked body."""
    lines = [_status_line(answer.status), b"content-type: %s\r\n" % answer.content_type.encode()]
    if length is None:
        lines.append(b"transfer-encoding: chunked\r\n")
    else:
        lines.append(b"content-length: %d\r\n" % length)
    lines.extend(f"{name}: {value}\r\n".encode() for name, value in answer.headers)
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _whole(answer: MockAnswer, keep_alive: bool) -> bytes:
    """A whole answer, head and body, for one write."""
    return _head(answer, len(answer.body), keep_alive) + answer.body


class _Connection(asyncio.Protocol):
    def __init__(self, provider: MockProvider, loop: asyncio.AbstractEventLoop) -> None:
        self._provider = provider
        self._loop = loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0
        self._expects_continue = False
        self._queue: deque[_Request] = deque()
        self._busy = False
        self._reading = True  # False while we hold pipelined requests back
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # pending while writing is paused

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _BodyTooLarge):
                self._refuse(error(413, f"mock: body over {MAX_BODY} bytes"))
            else:
                raise
        except httptools.HttpParserUpgrade:
            self._refuse(error(400, "mock: protocol upgrades are not supported"))
        except httptools.HttpParserError:
            self._refuse(error(400, "mock: malformed HTTP request"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.cancel()

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._size = 0
        self._expects_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expects_continue = True

    def on_headers_complete(self) -> None:
        if self._expects_continue and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY:
            raise _BodyTooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self._url).path.decode("latin-1")
        method = self._parser.get_method().decode("latin-1")
        body = b"".join(self._body)
        self._queue.append(_Request(method, path, body, self._parser.should_keep_alive()))
        if not self._busy:
            self._next()
        elif len(self._queue) >= _QUEUE_LIMIT and self._reading and self._transport is not None:
            self._transport.pause_reading()
            self._reading = False

    # answering, one request at a time
    def _next(self) -> None:
        if not self._queue:
            self._busy = False
            if not self._reading and self._transport is not None:
                self._transport.resume_reading()
                self._reading = True
            return
        self._busy = True
        request = self._queue.popleft()
        # ``MockProvider.answer`` in steps: the wait is a timer, not a task per call.
        result = _safely(lambda: self._provider.admit(request.method, request.path, request.body))
        if isinstance(result, MockAnswer):
            self._send(request, result)
        elif not result.delay_s:
            self._send(request, _safely(result.finish))
        else:
            self._timer = self._loop.call_later(result.delay_s, self._after_delay, request, result)

    def _after_delay(self, request: _Request, admitted: Admitted) -> None:
        self._timer = None
        self._send(request, _safely(admitted.finish))

    def _send(self, request: _Request, answer: MockAnswer) -> None:
        if answer.stream is not None:
            self._task = self._loop.create_task(self._stream(request, answer))
            return
        assert self._transport is not None
        self._transport.write(_whole(answer, request.keep_alive))
        self._done(request)

    async def _stream(self, request: _Request, answer: MockAnswer) -> None:
        assert self._transport is not None and answer.stream is not None
        self._transport.write(_head(answer, None, request.keep_alive))
        chunks = answer.stream
        try:
            async for chunk in chunks:
                self._transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if self._writable is not None:
                    await self._writable
        except ConnectionAbortedError:  # a fault cutting the stream: the client sees it end early
            self._transport.close()
            return
        except Exception:
            log.exception("mock: stream failed")
            self._transport.close()
            return
        finally:
            await chunks.aclose()
        self._transport.write(b"0\r\n\r\n")
        self._task = None
        self._done(request)

    def _done(self, request: _Request) -> None:
        assert self._transport is not None
        if request.keep_alive:
            self._next()
        else:
            self._transport.close()

    def _refuse(self, answer: MockAnswer) -> None:
        """Answer what cannot be parsed, then close: the stream's framing is lost."""
        assert self._transport is not None
        self._queue.clear()
        if not self._busy:
            self._transport.write(_whole(answer, keep_alive=False))
        self._transport.close()


def _safely(answer: Callable[[], T]) -> T | MockAnswer:
    """A bug in the mock's answers is a 500, not a connection left waiting."""
    try:
        return answer()
    except Exception:
        log.exception("mock: answer failed")
        return error(500, "mock: internal error")


async def start(provider: MockProvider, host: str, port: int) -> asyncio.AbstractServer:
    """Listen on ``host:port``; the caller closes the server it gets."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(provider, loop), host, port, backlog=1024)


def run(provider: MockProvider, host: str, port: int) -> None:
    """Serve until interrupted, on uvloop where it is installed (it comes with Ray)."""

    async def serve() -> None:
        server = await start(provider, host, port)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
