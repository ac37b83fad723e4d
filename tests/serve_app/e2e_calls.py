"""Helpers the end-to-end modules for limits and cost share: many requests at
once through real HTTP, and the checks every error envelope must pass."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import orjson
import redis

from tests.support import LOCAL_KEY, auth

CHAT = "/v1/chat/completions"


def burst(
    base_url: str, bodies: Sequence[dict[str, Any]], key: str = LOCAL_KEY, timeout_s: float = 30
) -> list[httpx.Response]:
    """POST every body at once (one connection each); the answers in order."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as c:
            calls = (c.post(CHAT, json=body, headers=auth(key)) for body in bodies)
            return list(await asyncio.gather(*calls))

    return asyncio.run(run())


def envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The OpenAI error object of ``response``, after checking its shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    return error


def sse_chunks(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body (``[DONE]`` checked and dropped)."""
    payloads = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]", payloads[-1]
    return [orjson.loads(p) for p in payloads[:-1]]


def flush_store(url: str) -> None:
    """Start a module from an empty store (modules run one after another)."""
    with redis.Redis.from_url(url) as client:
        client.flushdb()
