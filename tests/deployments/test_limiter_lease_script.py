"""The script's lease acquire and give-back, in a run with other calls, decide
exactly as the same calls made one run each (the run's shared window state
must not change any reply)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments.limiter import _script
from deployments.limiter_batch import LimiterBatch
from deployments.limiter_reply import Check, check_for, windows_from
from deployments.limiter_settings import Quota
from tests.deployments.test_limiter import FakeClock

pytestmark = pytest.mark.integration

QUOTAS = [
    Quota(window=10, requests=400, tokens=40_000),
    Quota(window=60, requests=1000),
    Quota(window=10, requests=300, shadow=True),
]


def checks(prefix: str, key: str) -> tuple[Check, ...]:
    return tuple(check_for(prefix, "key", key, key, quota, 20) for quota in QUOTAS)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_leases_in_a_shared_run_decide_as_runs_of_their_own(
    redis_client: aioredis.Redis, seed: int
) -> None:
    rng = random.Random(seed)
    clock = FakeClock()

    def now() -> str:
        return str(round(clock.now * 1_000_000))

    alone = LimiterBatch(redis_client, _script(), now)
    together = LimiterBatch(redis_client, _script(), now)
    granted: list[tuple[Any, Any, int, int]] = []  # each side's entries, requests, tokens
    outcomes = {0: 0, 1: 0}  # leases refused, granted
    for _ in range(60):
        clock.now += rng.choice([0.0, 0.01, 0.3, 0.7, 4.0])
        calls: list[tuple[str, int, int, int]] = []  # key, tokens, lease requests, for_us
        for _ in range(rng.randint(1, 5)):
            lease = rng.random() < 0.4
            calls.append(
                (
                    rng.choice("ab"),
                    rng.randint(0, 400) * (rng.randint(2, 40) if lease else 1),
                    rng.randint(2, 40) if lease else 0,
                    rng.choice([50_000, 400_000, 1_000_000]) if lease else 0,
                )
            )
        count = min(len(granted), rng.randint(0, 2))
        backs = [granted.pop(rng.randrange(len(granted))) for _ in range(count)]
        replies_alone: list[Any] = []
        for entries, _, requests, tokens in backs:
            await alone.settle(entries, -tokens, 10, requests=-requests)
        for key, tokens, requests, for_us in calls:
            lease = (requests, for_us) if requests else None
            replies_alone.append(await alone.acquire(checks("{lsa}", key), tokens, 10, lease))
        giving = [together.settle(e, -t, 10, requests=-r) for _, e, r, t in backs]
        acquiring = [
            together.acquire(checks("{lsb}", key), tokens, 10, (r, for_us) if r else None)
            for key, tokens, r, for_us in calls
        ]
        replies_together = (await asyncio.gather(*giving, *acquiring))[len(giving) :]
        assert replies_together == replies_alone
        pairs = zip(calls, replies_alone, replies_together, strict=True)
        for (key, tokens, requests, _), a, b in pairs:
            values = [int(v) for v in a]
            if requests:
                outcomes[values[2]] += 1
            if requests and values[2] == 1:  # granted: give part of it back later
                back_r, back_t = rng.randint(0, requests), rng.randint(0, tokens)
                entries_a = windows_from(checks("{lsa}", key), values, 0, 0)
                entries_b = windows_from(checks("{lsb}", key), [int(v) for v in b], 0, 0)
                granted.append((entries_a, entries_b, back_r, back_t))
    assert outcomes[0] > 3 and outcomes[1] > 3
