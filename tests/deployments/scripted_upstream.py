"""A scripted loopback upstream for the HTTP client tests: each test's server
answers byte for byte what its case needs, ordered by events, not sleeps."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

Reply = Callable[[asyncio.StreamWriter, bytes, int], Awaitable[bool]]


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    return head + b"".join(extra) + b"content-length: %d\r\n\r\n" % len(body) + body


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"  # a chunked answer's head
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


def answer(raw: bytes, keep: bool = True) -> Reply:
    """A reply that writes the same bytes to every request."""

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(raw)
        return keep

    return reply


class Upstream:
    """Reads each request (head and content-length body), hands it to ``reply``
    with the connection's number; ``reply`` writes the answer and says whether
    the connection stays open."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.port = 0
        self.connections = 0
        self.requests: list[bytes] = []
        self.open = 0
        self._arrived = asyncio.Condition()

    async def received(self, count: int) -> None:
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                request = head + await reader.readexactly(length)
                async with self._arrived:
                    self.requests.append(request)
                    self._arrived.notify_all()
                if not await self.reply(writer, request, number):
                    return
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def upstream(reply: Reply, tls: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    server_state = Upstream(reply)
    server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0, ssl=tls)
    server_state.port = server.sockets[0].getsockname()[1]
    try:
        yield server_state
    finally:
        server.close()
