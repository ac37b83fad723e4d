"""A bulkhead per upstream: at most N calls in flight, at most M waiting.

A hanging upstream then holds N connections of this replica, not all of them:
the overflow is answered at once with 503 + ``retry-after`` instead of piling
up, and other upstreams keep their latency. Waiters are served first in,
first out. The limits are per ingress replica (a cluster-wide count would
cost a Redis round trip per call and lease bookkeeping for crashed holders);
size them as the upstream's share of connections divided by the replicas.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import ServiceUnavailableError


class BulkheadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent: int = Field(64, ge=1)
    max_queued: int = Field(64, ge=0)
    max_queue_wait_s: float = Field(5.0, ge=0)  # and never past the request's deadline
    retry_after_s: int = Field(1, ge=1)


class Bulkhead:
    def __init__(self, name: str, settings: BulkheadSettings) -> None:
        self.name = name
        self.settings = settings
        self.active = 0  # calls holding a slot
        self.rejected = 0  # overflow answered with 503 (a metric)
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _full(self) -> ServiceUnavailableError:
        self.rejected += 1
        seconds = self.settings.retry_after_s
        return ServiceUnavailableError(
            f"Too many calls in flight to the upstream '{self.name}'; retry in {seconds} s.",
            code="bulkhead_full",
            headers={"retry-after": str(seconds)},
        )

    async def acquire(self, timeout_s: float) -> None:
        """Take a slot, waiting at most ``timeout_s`` in the queue; else raise 503."""
        if self.active < self.settings.max_concurrent and not self._waiters:
            self.active += 1
            return
        wait = min(timeout_s, self.settings.max_queue_wait_s)
        if len(self._waiters) >= self.settings.max_queued or wait <= 0:
            raise self._full()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over as we gave up: pass it on
            else:
                waiter.cancel()  # so release() never hands it a slot
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise self._full() from None
            raise

    def release(self) -> None:
        # Hand the slot straight to the oldest waiter, so no newcomer overtakes it.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    @asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        await self.acquire(timeout_s)
        try:
            yield
        finally:
            self.release()
