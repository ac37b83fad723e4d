from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from deployments.script_batch import ScriptBatch

ECHO = "if ARGV[1] == 'boom' then return redis.error_reply('boom') end return ARGV[1]"

pytestmark = pytest.mark.integration


class CountingClient:
    """The real client, counting the pipelines (round trips) the batch opens."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self.pipelines = 0

    def pipeline(self, **kwargs: Any) -> Any:
        self.pipelines += 1
        return self._client.pipeline(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_calls_of_one_loop_turn_share_one_round_trip(redis_client: aioredis.Redis) -> None:
    client = CountingClient(redis_client)
    batch = ScriptBatch(client, ECHO, window_s=0)  # type: ignore[arg-type]
    assert await batch([], ["first"]) == b"first"  # loads the script on a fresh server
    client.pipelines = 0
    replies = await asyncio.gather(*(batch([], [f"call-{i}"]) for i in range(20)))
    assert replies == [f"call-{i}".encode() for i in range(20)]
    assert client.pipelines == 1
    assert await batch([], ["later"]) == b"later"  # a later turn: its own round trip
    assert client.pipelines == 2


async def test_an_error_reply_reaches_only_its_caller(redis_client: aioredis.Redis) -> None:
    batch = ScriptBatch(redis_client, ECHO, window_s=0)
    results = await asyncio.gather(
        batch([], ["a"]), batch([], ["boom"]), batch([], ["b"]), return_exceptions=True
    )
    assert results[0] == b"a" and results[2] == b"b"
    assert isinstance(results[1], ResponseError)


async def test_a_caller_that_gives_up_does_not_cancel_the_others(
    redis_client: aioredis.Redis,
) -> None:
    batch = ScriptBatch(redis_client, ECHO, window_s=0)
    impatient = asyncio.create_task(batch([], ["gone"]))
    patient = asyncio.create_task(batch([], ["kept"]))
    await asyncio.sleep(0)
    impatient.cancel()
    assert await patient == b"kept"
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_a_server_that_forgot_the_script_gets_it_again(
    redis_client: aioredis.Redis,
) -> None:
    batch = ScriptBatch(redis_client, ECHO, window_s=0)
    assert await batch([], ["x"]) == b"x"
    await redis_client.script_flush()
    assert await batch([], ["y"]) == b"y"
