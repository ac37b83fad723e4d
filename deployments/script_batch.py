"""Many calls of one Lua script in one round trip.

Writes that are off the answer's path (a breaker's recorded success) need
not each pay a Redis round trip: calls made within ``window_s`` of each other
go out together as one pipeline. Each caller still awaits its own reply (or
error), so nothing is fire-and-forget by accident. With ``window_s=0`` the
calls made in one event-loop iteration go out together on the next, which
suits calls on the answer's path (an exact-cache lookup): no timer, and under
load one write and one read serve many requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

_Call = tuple[Sequence[str], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatch:
    def __init__(self, client: aioredis.Redis, source: str, window_s: float = 0.002) -> None:
        self._client = client
        self._script = client.register_script(source)
        self._source = source
        self._window_s = window_s
        self._pending: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await asyncio.shield(future)  # a caller's timeout must not cancel the batch

    async def _flush(self) -> None:
        await asyncio.sleep(self._window_s)  # 0: one loop turn, for this turn's calls
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                replies = await self._send([(keys, args) for keys, args, _ in batch])
            except (RedisError, OSError) as exc:
                replies = [exc] * len(batch)
            for (_, _, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, BaseException):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _send(self, calls: list[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        for attempt in range(2):
            async with self._client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                await self._client.script_load(self._source)  # a restarted server forgot it
                continue
            return list(replies)
        raise RedisError("script could not be loaded")
