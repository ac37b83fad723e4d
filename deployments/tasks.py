"""Small asyncio helpers the stages share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

_CANCEL_AGAIN_S = 1.0  # long enough for a loop's own cleanup not to be cut short


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Stop a background loop and wait until it has unwound (its ``finally`` ran).

    A cancellation can be lost: on Python 3.11, ``asyncio.wait_for`` (redis-py sends
    every command under one) swallows one that arrives as its inner future completes
    (CPython gh-86296), and a loop that goes on would be waited for forever: a replica
    that never finishes shutting down. So it is asked again, each second, until it ends."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_AGAIN_S)
    if not task.cancelled():
        task.result()  # its own failure is still raised


async def wait_all(pending: set[asyncio.Future[Any]]) -> None:
    """Wait until ``pending`` is empty: its members remove themselves when done, and
    work added meanwhile is waited for too; their failures are their owners' to report."""
    while pending:
        await asyncio.gather(*list(pending), return_exceptions=True)


class Background:
    """Fire-and-forget work that is still finished, not dropped: each task is kept
    (so it is not collected mid-flight), its failure is logged (the answer has gone,
    there is no one to raise to), and ``drain`` waits for all of it at shutdown."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(self._quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the running work, and for work it starts meanwhile."""
        await wait_all(self._tasks)

    async def _quietly(self, work: Coroutine[Any, Any, Any]) -> None:
        try:
            await work
        except Exception:
            self._log.exception("%s failed", self._what)
