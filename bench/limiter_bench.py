"""Limiter decisions per second and decision latency against loopback Redis.

``python -m bench.limiter_bench [--seconds 2] [--concurrency 1 16]``

Uses ``REDIS_URL`` when set (its keys go under a fresh {hash tag} and are
deleted afterwards), else starts an embedded Valkey for the run. Every request
passes 1, 3 or 6 windows, each limiting requests and tokens, with limits high
enough that all are admitted: the steady-state path, logs growing to their
``precision`` entries. One process, asyncio tasks sharing one client.
"server us" is the script's own time per decision inside the server.
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

from deployments.limiter import RateLimiter
from deployments.limiter_settings import LimiterSettings
from serve_app.context import Principal, RequestContext
from serve_app.embedded_store import EmbeddedStore

WINDOWS = ("1m", "1h", "1d", "90s", "10m", "7d")
KEYS = 50  # API keys the requests are spread over


def settings(windows: int, prefix: str) -> LimiterSettings:
    quotas = [{"window": w, "requests": 10**9, "tokens": 10**12} for w in WINDOWS[:windows]]
    return LimiterSettings.model_validate({"key_prefix": prefix, "per_key": {"default": quotas}})


async def run(limiter: RateLimiter, seconds: float, concurrency: int) -> tuple[int, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        n = index
        while time.perf_counter() < deadline:
            context = RequestContext(
                "bench", Principal(f"key-{n % KEYS}", "bench"), "chat", "m", {}, max_tokens=100
            )
            started = time.perf_counter()
            decision = await limiter.evaluate(context)
            latencies.append(time.perf_counter() - started)
            if not decision.allowed or decision.outcome != "allowed":
                raise RuntimeError(f"unexpected decision {decision.outcome}")
            n += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return round(len(latencies) / (time.perf_counter() - started)), latencies


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


async def main(seconds: float, concurrencies: list[int]) -> None:
    async with AsyncExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        if url is None:
            store = EmbeddedStore(stack.enter_context(tempfile.TemporaryDirectory()))
            url = store.start()
            stack.callback(store.stop)
        client = aioredis.from_url(url)
        stack.push_async_callback(client.aclose)
        prefix = "{rlbench-" + uuid.uuid4().hex[:8] + "}"
        stack.push_async_callback(_delete, client, prefix)
        print(f"store {url}; {seconds:g}s per row, requests spread over {KEYS} keys")
        print(
            f"{'windows':>7} {'tasks':>5} {'decisions/s':>12} {'p50 ms':>8} {'p99 ms':>8}", end=""
        )
        print(f" {'server us':>10}")
        for windows in (1, 3, 6):
            limiter = RateLimiter(client, settings(windows, prefix))
            for concurrency in concurrencies:
                before = await _script_usec(client)
                rate, latencies = await run(limiter, seconds, concurrency)
                usec = await _script_usec(client) - before
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                print(f"{windows:>7} {concurrency:>5} {rate:>12} {p50:>8.3f} {p99:>8.3f}", end="")
                # Per decision, not per script call: concurrent decisions share one run.
                print(f" {usec / max(len(latencies), 1):>10.1f}")


async def _script_usec(client: aioredis.Redis) -> int:
    """Server time spent in scripts so far (INFO commandstats)."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {"usec": 0})["usec"])


async def _delete(client: aioredis.Redis, prefix: str) -> None:
    async for key in client.scan_iter(match=prefix.replace("{", "[{]") + "*", count=1000):
        await client.delete(key)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    arguments = parser.parse_args()
    asyncio.run(main(arguments.seconds, arguments.concurrency))
