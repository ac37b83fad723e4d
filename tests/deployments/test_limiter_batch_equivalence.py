"""A script run that carries many calls decides exactly as the same calls made
one at a time: same admissions, counts, resets, waits and binding limit, with
settlements, shadow quotas, rejections and several keys in the mix."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments.limiter import RateLimiter
from deployments.limiter_decision import LimitDecision
from deployments.limiter_settings import LimiterSettings
from tests.deployments.test_limiter import FakeClock, ctx

pytestmark = pytest.mark.integration

QUOTAS: list[dict[str, Any]] = [
    {"window": "10s", "requests": 7, "tokens": 900},
    {"window": "1m", "requests": 30},
    {"window": "1h", "tokens": 12000},
    {"window": "10s", "requests": 4, "shadow": True},
]


def settings(prefix: str) -> LimiterSettings:
    return LimiterSettings.model_validate(
        {
            "key_prefix": prefix,
            "precision": 20,
            "store_timeout_s": 10,
            "per_key": {"default": QUOTAS},
            "per_model": {"default": [{"window": "30s", "requests": 15, "tokens": 2500}]},
        }
    )


def summary(decision: LimitDecision) -> tuple[Any, ...]:
    windows = tuple(
        (
            w.window_us,
            w.shadow,
            w.requests_used,
            w.tokens_used,
            w.recorded,
            w.reset_us,
            w.requests_wait_us,
            w.tokens_wait_us,
            w.slice_us,
        )
        for w in decision.windows
    )
    hit = decision.hit.label if decision.hit else None
    shadow = tuple(h.label for h in decision.shadow_hits)
    return decision.allowed, decision.outcome, decision.retry_after_us, hit, shadow, windows


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batched_runs_decide_as_calls_made_one_at_a_time(
    redis_client: aioredis.Redis, seed: int
) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    alone = RateLimiter(redis_client, settings("{rla}"), clock=clock)
    together = RateLimiter(redis_client, settings("{rlb}"), clock=clock)
    held: list[tuple[LimitDecision, LimitDecision]] = []
    for _ in range(40):
        clock.now += rng.choice([0.0, 0.05, 0.4, 1.3, 6.0, 15.0])
        settles = []
        for _ in range(rng.randint(0, 3)):
            if held:
                pair = held.pop(rng.randrange(len(held)))
                settles.append((pair, rng.choice([None, 0, 30, 150, 400])))
        calls = [
            ctx(key=rng.choice("ab"), model=rng.choice("mn"), prompt=rng.randint(0, 300))
            for _ in range(rng.randint(1, 6))
        ]
        for (one, _), tokens in settles:  # settlements go first in a run
            await alone.settle(one, tokens)
        one_by_one = [await alone.evaluate(c) for c in calls]
        settling = [together.settle(two, tokens) for (_, two), tokens in settles]
        batched = await asyncio.gather(*settling, *(together.evaluate(c) for c in calls))
        batched = batched[len(settling) :]
        assert [summary(d) for d in batched] == [summary(d) for d in one_by_one]
        held += [(a, b) for a, b in zip(one_by_one, batched, strict=True) if a.allowed]
