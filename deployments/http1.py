"""A lean HTTP/1.1 client for the upstream hot path: keep-alive connections to
one origin, responses parsed by httptools (llhttp, the parser uvicorn uses).

Why by hand: inside a Serve replica, a passthrough's aiohttp call to a fast
local upstream costs ~+160-240 us of replica CPU per request over a no-op app;
this client ~+55-65 us (README, performance: the serving path). No library measured here
came close (aiohttp ~80, pyreqwest ~48, aiosonic ~90, blacksheep ~150 us of
client CPU per call in a plain loop; this one ~23). So it does only what the
provider needs: POST, a whole body or its chunks as they arrive, keep-alive,
a connection limit, connect and read timeouts, TLS, gzip/deflate bodies. No
cookies, redirects, proxies or HTTP/2 (an upstream can pick ``httpx-http2``).

Errors (all ``Http1Error``)::

    Http1Error
    ├── Http1ConnectError     could not connect (refused, DNS, TLS handshake)
    ├── Http1TimeoutError     connect timeout, or no byte for read_timeout_s
    └── Http1ProtocolError    malformed response, or closed before its end
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# A stream's unread chunks above this pause reading from the upstream.
_HIGH_WATER = 1 << 20


class Http1Error(Exception):
    pass


class Http1ConnectError(Http1Error):
    pass


class Http1TimeoutError(Http1Error, TimeoutError):
    pass


class Http1ProtocolError(Http1Error):
    pass


class _Stale(Http1Error):
    """A reused connection closed before any byte of the answer: the server had
    dropped it while idle, so the request is sent again on a fresh one."""


@dataclass(frozen=True, slots=True)
class Http1Response:
    status: int
    headers: Mapping[str, str]  # names lowercased
    body: bytes


class _Exchange:
    """One request's answer as it arrives. It outlives its connection's turn:
    a stream's unread chunks stay here while the connection serves the next."""

    __slots__ = (
        "buffered", "chunks", "complete", "decoder", "error", "headers", "paused_conn",
        "ready", "received", "status", "stream", "until_close", "waiter",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.stream = stream
        # What the caller waits for: a stream's headers, or the whole answer.
        self.ready: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None  # a reader waiting for a chunk
        self.received = False
        self.until_close = False  # no length, not chunked: the body ends at EOF
        self.decoder: zlib._Decompress | None = None
        self.paused_conn: _Connection | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self.complete or self.error is not None:
            return
        self.error = error
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody may be awaiting it any more
        self.wake()

    def resume(self) -> None:
        """Reading from the upstream again, if a full buffer had paused it."""
        if (connection := self.paused_conn) is not None:
            self.paused_conn = None
            if connection.transport is not None:
                connection.transport.resume_reading()

    def body(self) -> bytes:
        body = b"".join(self.chunks)
        self.chunks.clear()
        return body


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- driving one exchange ------------------------------------------------

    def send(self, request: bytes, stream: bool) -> _Exchange:
        exchange = _Exchange(self._loop, stream)
        self.exchange = exchange
        assert self.transport is not None
        self.transport.write(request)
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(
            self._last_data + self._pool.read_timeout_s, self._check_timeout
        )
        return exchange

    def _check_timeout(self) -> None:
        self._timer = None
        exchange = self.exchange
        if exchange is None:
            return
        due = self._last_data + self._pool.read_timeout_s
        if exchange.paused_conn is None and self._loop.time() >= due:
            exchange.fail(Http1TimeoutError("no data from the upstream in time"))
            self.close()
        else:  # data came since, or the reader is slow: wait again from the last byte
            self._timer = self._loop.call_at(
                max(due, self._loop.time() + 0.001), self._check_timeout
            )

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.exchange = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self._pool.discard(self)

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # nothing asked: the connection is out of step
            self.close()
            return
        exchange.received = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, zlib.error) as exc:
            exchange.fail(Http1ProtocolError(f"malformed response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        exchange = self.exchange
        if exchange is not None:
            if exchange.until_close and exchange.error is None:  # headers came: EOF ends it
                self.on_message_complete()
            elif not exchange.received and self.reused:
                exchange.fail(_Stale())
            else:
                exchange.fail(Http1ProtocolError(f"connection closed mid-response ({exc!r})"))
        self._finish()
        self.close()

    # -- httptools callbacks -------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes past the end of the last answer
            self._raw_headers = []
            self.close()
            return
        exchange.status = self._parser.get_status_code()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers}
        self._raw_headers = []
        exchange.headers = headers
        exchange.until_close = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
            and exchange.status not in (204, 304)
        )
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):
            exchange.decoder = zlib.decompressobj(wbits=47)  # gzip or zlib header
        if exchange.stream and not exchange.ready.done():
            exchange.ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.decoder is not None:
            body = exchange.decoder.decompress(body)
            if not body:
                return
        exchange.chunks.append(body)
        if exchange.stream:  # hand it on, and hold back a runaway upstream
            exchange.buffered += len(body)
            if exchange.buffered > _HIGH_WATER and exchange.paused_conn is None:
                assert self.transport is not None
                self.transport.pause_reading()
                exchange.paused_conn = self
            exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.decoder is not None and (tail := exchange.decoder.flush()):
            exchange.chunks.append(tail)
        exchange.complete = True
        keep = self._parser.should_keep_alive() and not exchange.until_close
        self._finish()
        if not exchange.ready.done():
            exchange.ready.set_result(None)
        exchange.wake()
        exchange.resume()
        if keep and not self.closed:
            self._pool.release(self)
        else:
            self.close()


class Http1Stream:
    """An answer whose body is read as it arrives."""

    def __init__(self, connection: _Connection, exchange: _Exchange) -> None:
        self._connection = connection
        self._exchange = exchange
        self.status = exchange.status
        self.headers = exchange.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        while True:
            while exchange.chunks:
                chunk = exchange.chunks.popleft()
                exchange.buffered -= len(chunk)
                if exchange.buffered <= _HIGH_WATER // 2:
                    exchange.resume()
                yield chunk
            if exchange.error is not None:
                raise exchange.error
            if exchange.complete:
                return
            exchange.waiter = asyncio.get_running_loop().create_future()
            try:
                await exchange.waiter
            finally:
                exchange.waiter = None

    async def aclose(self) -> None:
        """Stops reading: a connection still carrying this answer is closed, not reused."""
        exchange = self._exchange
        if not exchange.complete and self._connection.exchange is exchange:
            exchange.fail(Http1ProtocolError("closed by the reader"))
            self._connection.close()


class Http1Pool:
    """Keep-alive connections to one origin (``scheme://host:port``), at most
    ``max_connections`` open; callers beyond that wait their turn in order."""

    def __init__(
        self,
        origin: str,
        *,
        max_connections: int = 256,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        idle_timeout_s: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self.host = parts.hostname
        tls = parts.scheme == "https"
        default_port = 443 if tls else 80
        self.port = parts.port or default_port
        self.ssl = (ssl_context or default_ssl_context()) if tls else None
        authority = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        if self.port != default_port:
            authority = f"{authority}:{self.port}"
        self._host_line = f"host: {authority}\r\n".encode()
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        # Servers drop idle keep-alive connections (uvicorn after 5 s): retire ours first.
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # -- requests ------------------------------------------------------------

    async def post(self, target: str, body: bytes, headers: Mapping[str, str]) -> Http1Response:
        _, exchange = await self._exchange(self._request(target, body, headers), False)
        return Http1Response(exchange.status, exchange.headers, exchange.body())

    async def stream(self, target: str, body: bytes, headers: Mapping[str, str]) -> Http1Stream:
        """Returns once the status line and headers arrived."""
        connection, exchange = await self._exchange(self._request(target, body, headers), True)
        return Http1Stream(connection, exchange)

    def _request(self, target: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        block = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # A CR or LF inside a name or value would smuggle a header: refuse it.
        if block.count("\n") != len(headers) or block.count("\r") != len(headers):
            raise ValueError("header names and values must not contain CR or LF")
        return b"".join(
            (
                b"POST ",
                target.encode("ascii"),
                b" HTTP/1.1\r\n",
                self._host_line,
                block.encode("latin-1"),
                b"content-length: %d\r\n\r\n" % len(body),
                body,
            )
        )

    async def _exchange(self, request: bytes, stream: bool) -> tuple[_Connection, _Exchange]:
        for attempt in range(2):
            connection = await self._acquire()
            exchange = connection.send(request, stream)
            try:
                await exchange.ready
            except _Stale:
                if attempt == 0:
                    continue
                raise Http1ProtocolError("the upstream closed the connection") from None
            except asyncio.CancelledError:
                connection.close()
                raise
            return connection, exchange
        raise AssertionError("unreachable")

    # -- the pool ------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: least likely dropped
            if now - connection.idle_since < self.idle_timeout_s:
                connection.reused = True
                return connection
            connection.close()
        if len(self._open) + self._connecting >= self.max_connections:
            waiter: asyncio.Future[_Connection | None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())
                raise
            if handed is not None:
                handed.reused = True
                return handed
        return await self._connect()

    async def _connect(self) -> _Connection:
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except BaseException as exc:
            self._slot_freed()
            where = f"{self.host}:{self.port}"
            if isinstance(exc, TimeoutError):
                raise Http1TimeoutError(f"connecting to {where} timed out") from None
            if isinstance(exc, OSError):  # ssl.SSLError is one
                raise Http1ConnectError(f"cannot connect to {where}: {exc}") from exc
            raise
        finally:
            self._connecting -= 1
        self._open.add(connection)
        return connection

    def release(self, connection: _Connection) -> None:
        """A connection whose answer is complete: to the next waiter, or idle."""
        connection.idle_since = self.loop.time()
        self._pass_on(connection)

    def _pass_on(self, connection: _Connection | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if connection is not None:
            self._idle.append(connection)

    def discard(self, connection: _Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            if connection in self._idle:
                self._idle.remove(connection)
            self._slot_freed()

    def _slot_freed(self) -> None:
        self._pass_on(None)  # a waiter may connect now

    async def aclose(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()


def default_ssl_context() -> ssl.SSLContext:
    """The system's trust store, plus certifi's where installed (as httpx does)."""
    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except (ImportError, OSError):
        pass
    return context


__all__ = [
    "Http1ConnectError",
    "Http1Error",
    "Http1Pool",
    "Http1ProtocolError",
    "Http1Response",
    "Http1Stream",
    "Http1TimeoutError",
]
