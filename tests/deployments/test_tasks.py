"""Background-task helpers."""

from __future__ import annotations

import asyncio

from deployments.tasks import cancel_and_wait


async def test_cancel_and_wait_stops_the_task_and_keeps_its_callers_own_cancellation() -> None:
    unwinding, unwound = asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            unwinding.set()
            await unwound.wait()  # a finally that takes its time

    background = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(background))
    await unwinding.wait()
    caller.cancel()  # the caller's own shutdown, while it waits
    unwound.set()
    await asyncio.wait([caller, background])
    assert background.cancelled()
    assert caller.cancelled()  # not swallowed as if it were the background task's


async def test_cancel_and_wait_returns_once_the_task_has_unwound() -> None:
    cleaned = False

    async def loop_forever() -> None:
        nonlocal cleaned
        try:
            await asyncio.Event().wait()
        finally:
            cleaned = True

    task = asyncio.create_task(loop_forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    await cancel_and_wait(None)
    assert cleaned and task.cancelled()


async def test_cancel_and_wait_asks_again_when_a_cancellation_is_lost() -> None:
    """As Python 3.11's wait_for loses one that lands as its inner future completes."""
    lost = 0

    async def loop() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1

    background = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(background), 5)
    assert background.cancelled() and lost == 1
