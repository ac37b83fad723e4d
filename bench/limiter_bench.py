"""Limiter decisions per second and decision latency against loopback Redis.

``python -m bench.limiter_bench [--seconds 2] [--concurrency 1 16]``

Uses ``REDIS_URL`` when set (its keys go under a fresh {hash tag} and are
deleted afterwards), else starts an embedded Valkey for the run. Every request
passes 1, 3 or 6 windows, each limiting requests and tokens, with limits high
enough that all are admitted: the steady-state path, logs growing to their
``precision`` entries; each request settles to half its token reservation,
as an answer would. One process, asyncio tasks sharing one client.
Each row runs twice: "exact" (``lease_requests: 0``, every decision is
decided in the store) and "leased" (the default: a busy key far from its
limits is decided from leases, deployments/limiter_lease.py).
"server us" is the script's own time per decision inside the server, "runs"
the script runs per decision (settlements and leases included).
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


def settings(windows: int, prefix: str, leases: bool) -> LimiterSettings:
    quotas = [{"window": w, "requests": 10**9, "tokens": 10**12} for w in WINDOWS[:windows]]
    extra = {} if leases else {"lease_requests": 0}
    return LimiterSettings.model_validate(
        {"key_prefix": prefix, "per_key": {"default": quotas}, **extra}
    )


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
            limiter.settle_soon(decision, 50)
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
        print(f"{'mode':>6} {'windows':>7} {'tasks':>5} {'decisions/s':>12}", end="")
        print(f" {'p50 ms':>8} {'p99 ms':>8} {'server us':>10} {'runs':>6}")
        for windows in (1, 3, 6):
            for mode in ("exact", "leased"):
                limiter = RateLimiter(client, settings(windows, prefix, mode == "leased"))
                for concurrency in concurrencies:
                    before = await _script_stats(client)
                    rate, latencies = await run(limiter, seconds, concurrency)
                    await limiter.drain()
                    after = await _script_stats(client)
                    usec, calls = after[0] - before[0], after[1] - before[1]
                    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                    print(f"{mode:>6} {windows:>7} {concurrency:>5} {rate:>12}", end="")
                    # Per decision, not per script call: concurrent decisions share one run.
                    count = max(len(latencies), 1)
                    print(f" {p50:>8.3f} {p99:>8.3f} {usec / count:>10.1f} {calls / count:>6.2f}")


async def _script_stats(client: aioredis.Redis) -> tuple[int, int]:
    """Server time spent in scripts so far, and script runs (INFO commandstats)."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    return int(stats["usec"]), int(stats["calls"])


async def _delete(client: aioredis.Redis, prefix: str) -> None:
    async for key in client.scan_iter(match=prefix.replace("{", "[{]") + "*", count=1000):
        await client.delete(key)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    arguments = parser.parse_args()
    asyncio.run(main(arguments.seconds, arguments.concurrency))
