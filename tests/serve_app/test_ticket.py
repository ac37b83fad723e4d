from __future__ import annotations

import asyncio

from serve_app.ticket import drain_background, in_background


async def test_drain_waits_for_fire_and_forget_work_even_work_it_starts() -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def settle(name: str) -> None:
        await release.wait()
        done.append(name)
        if name == "first":
            in_background(settle("started while draining"))

    in_background(settle("first"))
    drained = asyncio.create_task(drain_background())
    await asyncio.sleep(0)
    assert not drained.done()  # the settlement still runs: shutdown must wait for it
    release.set()
    await asyncio.wait_for(drained, 5)
    assert done == ["first", "started while draining"]


async def test_a_failing_background_job_does_not_stop_the_drain() -> None:
    async def broken() -> None:
        raise RuntimeError("store down")

    in_background(broken())
    await asyncio.wait_for(drain_background(), 5)
