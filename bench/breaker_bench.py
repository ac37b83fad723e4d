"""Breaker overhead against loopback Redis: refusal latency when open, and the
cost of permission + outcome around a healthy (no-op) upstream call.

``python -m bench.breaker_bench [--seconds 2] [--concurrency 1 16]``

Uses ``REDIS_URL`` when set (keys go under a fresh prefix and are deleted
afterwards), else starts an embedded Valkey for the run. One process, asyncio
tasks sharing one client, calling ``Resilience.call`` directly (no HTTP, no
Ray): the end-to-end comparison with the no-op Serve app belongs to the
load-test scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from deployments.resilience import Resilience, ResilienceSettings, Target
from serve_app.embedded_store import EmbeddedStore
from serve_app.errors import CircuitOpenError

OPEN = Target(upstream="down", model="m")
HEALTHY = Target(upstream="up", model="m")


async def noop(target: Target) -> str:
    return target.model


async def run(
    resilience: Resilience, target: Target, seconds: float, concurrency: int
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await resilience.call([target], noop, 30)
            except CircuitOpenError:
                pass
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return round(len(latencies) / (time.perf_counter() - started)), latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1e6 if len(values) > 1 else 0.0


async def main(seconds: float, concurrencies: list[int]) -> None:
    async with AsyncExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        if url is None:
            store = EmbeddedStore(data_dir=stack.enter_context(tempfile.TemporaryDirectory()))
            url = store.start()
            stack.callback(store.stop)
        client = aioredis.from_url(url)
        stack.push_async_callback(client.aclose)
        prefix = f"bench-breaker-{uuid.uuid4().hex[:8]}"
        settings = ResilienceSettings(key_prefix=prefix)
        resilience = Resilience.with_redis(settings, client)
        await resilience.force_open(resilience.breaker_name(OPEN))
        print("case      conc   calls/s   p50 us   p99 us")
        for case, target in (("refusal", OPEN), ("healthy", HEALTHY)):
            for concurrency in concurrencies:
                rate, lat = await run(resilience, target, seconds, concurrency)
                p50, p99 = pct(lat, 50), pct(lat, 99)
                print(f"{case:8} {concurrency:5} {rate:9} {p50:8.0f} {p99:8.0f}")
        for name in (resilience.breaker_name(OPEN), resilience.breaker_name(HEALTHY)):
            await resilience.reset(name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.concurrency))
