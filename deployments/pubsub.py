"""Following a Redis pub/sub channel for as long as a replica runs.

The dedup stage (results), the exact cache (invalidations) and the admin routes
(run-time limits) each keep one subscription open. The connection can drop with
the store: this subscribes again after ``retry_s`` and tells the owner, who
must assume messages were missed meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from deployments.store_errors import STORE_ERRORS

Message = dict[str, Any] | None  # None: ``tick_s`` passed without a message


async def follow_channel(
    redis: aioredis.Redis,
    channel: str,
    handle: Callable[[Message], Awaitable[None]],
    *,
    on_down: Callable[[BaseException], None],
    pattern: bool = False,
    tick_s: float = 1.0,
    retry_s: float = 1.0,
    errors: tuple[type[BaseException], ...] = STORE_ERRORS,
) -> None:
    """Call ``handle`` with every message (the subscription's confirmation first)
    and with None after each quiet ``tick_s``; never returns (cancel it)."""
    task = asyncio.current_task()
    while True:
        pubsub = redis.pubsub()
        try:
            await (pubsub.psubscribe(channel) if pattern else pubsub.subscribe(channel))
            while True:
                message = await pubsub.get_message(timeout=tick_s)
                _stop_if_cancelled(task)
                await handle(message)
        except errors as exc:
            _stop_if_cancelled(task)
            on_down(exc)
        finally:
            await pubsub.aclose()
        await asyncio.sleep(retry_s)


def _stop_if_cancelled(task: asyncio.Task[Any] | None) -> None:
    """redis-py's timed read can swallow a cancellation that lands in it (the read just
    returns): seen as a shutdown hanging forever. A cancelled follower stops anyway."""
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
