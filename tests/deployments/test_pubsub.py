"""Following a channel: a cancelled follower stops, wherever the cancellation lands."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from deployments.pubsub import Message, follow_channel


@pytest.mark.integration
async def test_a_cancelled_follower_stops_wherever_the_cancel_lands(
    redis_client: aioredis.Redis,
) -> None:
    # redis-py's timed read swallowed cancellations that landed in it: a replica's
    # shutdown then waited forever. Cancel at many points of short ticks.
    ticks = 0

    async def handle(message: Message) -> None:  # as the limits watcher: read on each tick
        nonlocal ticks
        ticks += 1
        await redis_client.get("limits")

    for attempt in range(30):
        follower = asyncio.create_task(
            follow_channel(redis_client, "c", handle, on_down=lambda _: None, tick_s=0.01)
        )
        await asyncio.sleep(0.005 + 0.003 * attempt)
        follower.cancel()
        done, _ = await asyncio.wait([follower], timeout=2)
        assert follower in done and follower.cancelled(), f"attempt {attempt}: still running"
    assert ticks > 0
