"""The HTTP/1.1 upstream client against scripted loopback servers: each test's
server answers byte for byte what the case needs, ordered by events, not sleeps."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from pathlib import Path

import pytest

from deployments.http1 import (
    Http1ConnectError,
    Http1Pool,
    Http1ProtocolError,
    Http1TimeoutError,
)
from serve_app.embedded_store import free_port
from tests.deployments.scripted_upstream import (
    CHUNKED,
    LAST_CHUNK,
    Upstream,
    answer,
    chunk,
    ok,
    upstream,
)

HEADERS = {"content-type": "application/json", "x-request-id": "r1"}


def pool_for(up: Upstream, scheme: str = "http", **options: float) -> Http1Pool:
    return Http1Pool(f"{scheme}://127.0.0.1:{up.port}", **options)  # type: ignore[arg-type]


async def test_whole_answers_reuse_one_connection() -> None:
    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(ok(b'{"n": %d}' % len(request)))
        return True

    async with upstream(reply) as up:
        pool = pool_for(up)
        for i in range(5):
            response = await pool.post("/v1/chat", b'{"i": %d}' % i, HEADERS)
            assert response.status == 200
            assert response.headers["content-type"] == "application/json"
        assert up.connections == 1
        first = up.requests[0]
        assert first.startswith(b"POST /v1/chat HTTP/1.1\r\n")
        assert b"\r\nhost: 127.0.0.1:%d\r\n" % up.port in first
        assert b"\r\nx-request-id: r1\r\n" in first and first.endswith(b'{"i": 0}')
        await pool.aclose()


async def test_chunks_arrive_as_the_upstream_sends_them() -> None:
    second = asyncio.Event()

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(CHUNKED + chunk(b"first"))
        await second.wait()
        writer.write(chunk(b"second") + LAST_CHUNK)
        return True

    async with upstream(reply) as up:
        pool = pool_for(up)
        stream = await pool.stream("/v1/chat", b"{}", HEADERS)
        chunks = stream.chunks()
        assert await anext(chunks) == b"first"  # before the server sent the rest
        second.set()
        assert [c async for c in chunks] == [b"second"]
        await stream.aclose()
        # Complete, the connection went back to the pool.
        second.set()
        again = await pool.stream("/v1/chat", b"{}", HEADERS)
        assert b"".join([c async for c in again.chunks()]) == b"firstsecond"
        assert up.connections == 1
        await pool.aclose()


async def test_a_body_that_ends_at_close() -> None:
    async with upstream(
        answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it", False)
    ) as up:
        pool = pool_for(up)
        assert (await pool.post("/", b"", HEADERS)).body == b"all of it"
        assert (await pool.post("/", b"", HEADERS)).body == b"all of it"
        assert up.connections == 2
        await pool.aclose()


async def test_connection_close_is_not_reused() -> None:
    async with upstream(answer(ok(b"{}", b"connection: close\r\n"), False)) as up:
        pool = pool_for(up)
        for _ in range(3):
            assert (await pool.post("/", b"{}", HEADERS)).status == 200
        assert up.connections == 3
        await pool.aclose()


async def test_a_reused_connection_dropped_before_answering_is_retried_once() -> None:
    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if n == 1 and len(up.requests) == 2:
            return False  # the idle-drop race: read the second request, close unanswered
        writer.write(ok(b"{}"))
        return True

    async with upstream(reply) as up:
        pool = pool_for(up)
        assert (await pool.post("/", b"{}", HEADERS)).status == 200
        assert (await pool.post("/", b"{}", HEADERS)).status == 200
        assert up.connections == 2 and len(up.requests) == 3
        await pool.aclose()


async def test_a_fresh_connection_closed_mid_answer_is_an_error() -> None:
    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        await writer.drain()
        return False

    async with upstream(reply) as up:
        pool = pool_for(up)
        with pytest.raises(Http1ProtocolError, match="closed mid-response"):
            await pool.post("/", b"{}", HEADERS)
        assert len(up.requests) == 1  # not retried: the server had started answering
        await pool.aclose()


async def test_a_malformed_answer_is_a_protocol_error() -> None:
    async with upstream(answer(b"NOT HTTP AT ALL\r\n\r\n")) as up:
        pool = pool_for(up)
        with pytest.raises(Http1ProtocolError, match="malformed"):
            await pool.post("/", b"{}", HEADERS)
        await pool.aclose()


async def test_silence_is_a_read_timeout_and_a_stall_mid_stream_too() -> None:
    release = asyncio.Event()

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if b"stream" in request:
            writer.write(CHUNKED + chunk(b"hi"))
        await release.wait()
        return False

    async with upstream(reply) as up:
        pool = pool_for(up, read_timeout_s=0.2)
        with pytest.raises(Http1TimeoutError):
            await pool.post("/", b"{}", HEADERS)
        stream = await pool.stream("/", b'"stream"', HEADERS)
        chunks = stream.chunks()
        assert await anext(chunks) == b"hi"
        with pytest.raises(Http1TimeoutError):
            await anext(chunks)
        release.set()
        await pool.aclose()


async def test_refused_is_a_connect_error() -> None:
    pool = Http1Pool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Http1ConnectError):
        await pool.post("/", b"{}", HEADERS)


async def test_at_most_max_connections_and_everyone_is_served() -> None:
    go = asyncio.Event()
    most = 0

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        nonlocal most
        most = max(most, up.open)
        await go.wait()
        writer.write(ok(b"{}"))
        return True

    async with upstream(reply) as up:
        pool = pool_for(up, max_connections=2)
        calls = [asyncio.create_task(pool.post("/", b"{}", HEADERS)) for _ in range(6)]
        await up.received(2)
        go.set()
        assert [r.status for r in await asyncio.gather(*calls)] == [200] * 6
        assert up.connections == 2 and most == 2
        await pool.aclose()


async def test_a_cancelled_call_frees_its_connection_slot() -> None:
    answer = asyncio.Event()

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if n == 1:
            await answer.wait()
            return False
        writer.write(ok(b"{}"))
        return True

    async with upstream(reply) as up:
        pool = pool_for(up, max_connections=1)
        hanging = asyncio.create_task(pool.post("/", b"{}", HEADERS))
        await up.received(1)
        waiting = asyncio.create_task(pool.post("/", b"{}", HEADERS))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the one slot is taken
        hanging.cancel()
        assert (await asyncio.wait_for(waiting, 5)).status == 200
        answer.set()
        await pool.aclose()


async def test_gzip_bodies_are_decoded() -> None:
    async with upstream(
        answer(ok(gzip.compress(b'{"a": 1}'), b"content-encoding: gzip\r\n"))
    ) as up:
        pool = pool_for(up)
        assert (await pool.post("/", b"{}", HEADERS)).body == b'{"a": 1}'
        await pool.aclose()


async def test_header_injection_is_refused() -> None:
    pool = Http1Pool("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="CR or LF"):
        await pool.post("/", b"{}", {"x-request-id": "a\r\nx-evil: 1"})


async def test_a_stream_closed_early_does_not_leave_its_connection_in_the_pool() -> None:
    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if n == 1:
            writer.write(CHUNKED + chunk(b"hi"))
            return True
        writer.write(ok(b"{}"))
        return True

    async with upstream(reply) as up:
        pool = pool_for(up)
        stream = await pool.stream("/", b"{}", HEADERS)
        assert await anext(stream.chunks()) == b"hi"
        await stream.aclose()
        assert (await pool.post("/", b"{}", HEADERS)).status == 200
        assert up.connections == 2
        await pool.aclose()


async def test_idle_connections_are_retired_before_the_server_drops_them() -> None:
    async with upstream(answer(ok(b"{}"))) as up:
        pool = pool_for(up, idle_timeout_s=0.0)
        for _ in range(3):
            await pool.post("/", b"{}", HEADERS)
        assert up.connections == 3
        await pool.aclose()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


async def test_tls_verifies_the_server(tls_files: tuple[Path, Path]) -> None:
    key, cert = tls_files
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(ok(b'{"tls": true}'))
        return True

    async with upstream(reply, tls=server_side) as up:
        trusting = ssl.create_default_context(cafile=str(cert))
        pool = pool_for(up, "https", ssl_context=trusting)  # type: ignore[arg-type]
        assert (await pool.post("/", b"{}", HEADERS)).body == b'{"tls": true}'
        await pool.aclose()
        untrusting = pool_for(up, "https")  # the default trust store knows no such CA
        with pytest.raises(Http1ConnectError):
            await untrusting.post("/", b"{}", HEADERS)


async def test_a_large_stream_arrives_whole_through_the_reading_pauses() -> None:
    piece = bytes(range(256)) * 4096  # 1 MiB: four of them pass the pause mark

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if b"again" in request:
            writer.write(ok(b"{}"))
            return True
        writer.write(CHUNKED)
        for _ in range(4):
            writer.write(chunk(piece))
            await writer.drain()
        writer.write(LAST_CHUNK)
        return True

    async with upstream(reply) as up:
        pool = pool_for(up)
        stream = await pool.stream("/", b"{}", HEADERS)
        received = bytearray()
        async for part in stream.chunks():
            received += part
        assert bytes(received) == piece * 4
        assert (await pool.post("/", b'"again"', HEADERS)).status == 200
        assert up.connections == 1  # reading resumed and the answer ended cleanly
        await pool.aclose()
