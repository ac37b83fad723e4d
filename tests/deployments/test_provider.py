"""The provider client over the default ``http1`` transport: its settings reach the
pool, and the client's errors arrive as the gateway's (502/504), never as its own."""

from __future__ import annotations

import asyncio

import pytest

from deployments.provider import Http1Transport, ProviderClient
from serve_app.embedded_store import free_port
from serve_app.errors import UpstreamError, UpstreamTimeoutError, UpstreamUnreachableError
from serve_app.settings import UpstreamSettings
from tests.deployments.scripted_upstream import answer, ok, upstream


def client_for(port: int, **settings: object) -> ProviderClient:
    upstream_settings = UpstreamSettings.model_validate(
        {"base_url": f"http://127.0.0.1:{port}/v1", **settings}
    )
    return ProviderClient({"u": upstream_settings})


async def test_settings_reach_the_pool_and_a_call_answers() -> None:
    async with upstream(answer(ok(b'{"ok": true}'))) as up:
        client = client_for(up.port, keepalive_timeout_s=7.5, max_connections=3)
        response = await client.post("u", "/chat/completions", b"{}", "req-1")
        assert response.body == b'{"ok": true}'
        assert up.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nx-request-id: req-1\r\n" in up.requests[0]
        transport = client._transports["u"]
        assert isinstance(transport, Http1Transport)
        pool, target = transport._route(f"http://127.0.0.1:{up.port}/v1/chat/completions")
        assert (pool.idle_timeout_s, pool.max_connections, target) == (
            7.5,
            3,
            "/v1/chat/completions",
        )
        await client.aclose()


async def test_refused_is_unreachable() -> None:
    with pytest.raises(UpstreamUnreachableError):
        await client_for(free_port()).post("u", "/chat/completions", b"{}")


async def test_silence_is_a_timeout_and_garbage_an_upstream_error() -> None:
    release = asyncio.Event()

    async def reply(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if b"garbage" in request:
            writer.write(b"NOT HTTP\r\n\r\n")
            return True
        await release.wait()
        return False

    async with upstream(reply) as up:
        client = client_for(up.port, read_timeout_s=0.2)
        with pytest.raises(UpstreamTimeoutError):
            await client.post("u", "/chat/completions", b"{}")
        with pytest.raises(UpstreamError, match="malformed") as caught:
            await client.post("u", "/chat/completions", b'"garbage"')
        assert caught.value.status_code == 502
        with pytest.raises(UpstreamError, match="malformed"):
            stream = await client.open_stream("u", "/chat/completions", b'"garbage"')
            await stream.aclose()
        release.set()
        await client.aclose()
