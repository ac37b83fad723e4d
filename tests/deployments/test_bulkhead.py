"""The bulkhead caps calls in flight and queued; overflow is refused at once."""

from __future__ import annotations

import asyncio

import pytest

from deployments.bulkhead import Bulkhead, BulkheadSettings
from serve_app.errors import ServiceUnavailableError


def bulkhead(concurrent: int = 2, queued: int = 2, wait: float = 60.0) -> Bulkhead:
    return Bulkhead(
        "up",
        BulkheadSettings(max_concurrent=concurrent, max_queued=queued, max_queue_wait_s=wait),
    )


async def settle() -> None:
    # Let every ready task run up to its next wait (ordering, not timing).
    for _ in range(5):
        await asyncio.sleep(0)


async def test_calls_within_the_limit_go_straight_through() -> None:
    b = bulkhead()
    await b.acquire(1)
    await b.acquire(1)
    assert (b.active, b.queued) == (2, 0)


async def test_overflow_is_refused_at_once_with_retry_after() -> None:
    b = bulkhead(concurrent=1, queued=1)
    await b.acquire(60)
    waiting = asyncio.create_task(b.acquire(60))
    await settle()
    with pytest.raises(ServiceUnavailableError) as info:
        await b.acquire(60)
    assert info.value.status_code == 503 and info.value.code == "bulkhead_full"
    assert info.value.headers["retry-after"] == "1"
    assert b.rejected == 1
    b.release()
    await waiting
    assert (b.active, b.queued) == (1, 0)


async def test_waiters_are_served_first_in_first_out() -> None:
    b = bulkhead(concurrent=1, queued=3)
    await b.acquire(60)
    order: list[int] = []

    async def wait_then_note(i: int) -> None:
        await b.acquire(60)
        order.append(i)

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(wait_then_note(i)))
        await settle()
    for _ in range(3):
        b.release()
        await settle()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    b.release()
    assert b.active == 0


async def test_a_waiter_gives_up_after_its_timeout_and_leaves_the_queue() -> None:
    b = bulkhead(concurrent=1, queued=1)
    await b.acquire(60)
    with pytest.raises(ServiceUnavailableError):
        await b.acquire(0.01)
    assert (b.queued, b.active) == (0, 1)
    b.release()
    assert b.active == 0


async def test_no_queueing_when_the_deadline_has_passed() -> None:
    b = bulkhead(concurrent=1, queued=5)
    await b.acquire(60)
    with pytest.raises(ServiceUnavailableError):
        await b.acquire(0)
    assert b.queued == 0


async def test_a_cancelled_waiter_never_takes_a_slot() -> None:
    b = bulkhead(concurrent=1, queued=2)
    await b.acquire(60)
    cancelled = asyncio.create_task(b.acquire(60))
    kept = asyncio.create_task(b.acquire(60))
    await settle()
    cancelled.cancel()
    await settle()
    b.release()
    await kept
    assert (b.active, b.queued) == (1, 0)
    b.release()
    assert b.active == 0


async def test_the_slot_context_releases_on_error() -> None:
    b = bulkhead(concurrent=1)
    with pytest.raises(RuntimeError):
        async with b.slot(1):
            assert b.active == 1
            raise RuntimeError("upstream failed")
    assert b.active == 0
