"""A streamed request that joins another replica's flight but ends up calling upstream
itself (the leader died, or it waited past its deadline) pays for that call, as the
non-streamed path always did. Two gateways (replicas) in process, one Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tests.serve_app.test_client_gone import STREAM_COST, _ask, _record, _spent_reaches, serving

pytestmark = pytest.mark.integration


async def _stream_lock(redis: aioredis.Redis) -> bytes:
    async with asyncio.timeout(5):
        while True:
            async for key in redis.scan_iter(match="gw:dedup:*:slock"):
                return key
            await asyncio.sleep(0.01)


async def test_a_stream_that_takes_over_a_dead_leader_pays_for_its_call(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    text = "a leader that dies mid-flight"
    async with serving(redis_url) as (_, first_client, first_upstream):
        async with serving(redis_url) as (second, second_client, second_upstream):
            leading = _ask(first_client, text, "req-first", stream=True)
            await asyncio.wait_for(first_upstream.called.wait(), 5)
            # The leader "dies": its lock now names a replica that never writes a chunk.
            lock = await _stream_lock(redis_client)
            await redis_client.set(lock, "dead", px=300)
            second_upstream.release.set()
            taking_over = await _ask(second_client, text, "req-second", stream=True)
            assert taking_over.status_code == 200, taking_over.text
            assert taking_over.headers["x-dedup"] == "LEADER"
            assert taking_over.headers["x-upstream"] == "u"
            assert second_upstream.calls == 1 and second.stages.dedup.stats.takeovers == 1

            record = await _record(second, "req-second")
            assert record.status == "ok" and not record.coalesced  # type: ignore[attr-defined]
            assert record.completion_tokens == 2  # type: ignore[attr-defined]
            await _spent_reaches(second, STREAM_COST)
            first_upstream.release.set()
            assert (await leading).status_code == 200
