"""A balanced target's rpm/tpm (LiteLLM's deployment limits), against a real store:
a target at its limit is passed over, every target at its limit is a 429 with
the soonest retry, and a call gives back the tokens it did not use."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments.breaker_store import MemoryBreakerStore
from deployments.limiter import RateLimiter
from deployments.limiter_settings import LimiterSettings
from deployments.resilience import Resilience, ResilienceSettings, Target
from deployments.target_limits import TargetLimitedError, TargetLimits

pytestmark = pytest.mark.integration


def _resilience(redis_client: aioredis.Redis, *targets: dict[str, Any]) -> Resilience:
    settings = ResilienceSettings.model_validate(
        {"balance": {"gpt": {"strategy": "weighted", "targets": list(targets)}}}
    )
    prefix = f"{{test-targets-{uuid.uuid4().hex[:8]}}}"  # the store outlives the test
    limiter = RateLimiter(redis_client, LimiterSettings(key_prefix=prefix))
    return Resilience(
        settings, MemoryBreakerStore(), target_limits=TargetLimits(limiter, settings.balance)
    )


async def _called(target: Target) -> str:
    return target.upstream


async def test_a_target_at_its_rpm_is_passed_over_then_all_are_a_429(
    redis_client: aioredis.Redis,
) -> None:
    res = _resilience(
        redis_client,
        {"upstream": "a", "model": "m", "rpm": 2},
        {"upstream": "b", "model": "m", "rpm": 1},
    )
    chain = [Target(upstream="a", model="m"), Target(upstream="b", model="m")]
    served = [(await res.call(chain, _called, 30)).value for _ in range(3)]
    assert served == ["a", "a", "b"]
    with pytest.raises(TargetLimitedError) as limited:
        await res.call(chain, _called, 30)
    assert limited.value.status_code == 429
    assert 0 < int(limited.value.headers["retry-after"]) <= 60
    assert "requests per minute" in limited.value.message  # the soonest to free a slot
    assert res.metrics.target_limited == {"a/m": 2, "b/m": 1}


async def test_a_call_gives_back_the_tokens_it_did_not_use(
    redis_client: aioredis.Redis,
) -> None:
    res = _resilience(redis_client, {"upstream": "a", "model": "m", "tpm": 100})
    chain = [Target(upstream="a", model="m")]
    first = await res.call(chain, _called, 30, tokens=60)
    first.settle(10)  # it used 10 of the 60 it held
    second = await res.call(chain, _called, 30, tokens=60)  # 10 + 60 fit 100
    assert second.value == "a"
    # Unsettled, the 60 stay held: 10 + 60 + 60 is past 100.
    with pytest.raises(TargetLimitedError):
        await res.call(chain, _called, 30, tokens=60)
    second.settle(None)  # no usage reported: all of it back
    assert (await res.call(chain, _called, 30, tokens=60)).value == "a"


async def test_targets_without_limits_cost_no_store_call(redis_client: aioredis.Redis) -> None:
    res = _resilience(redis_client, {"upstream": "a", "model": "m"})
    assert res.target_limits is None  # none of its targets has limits: nothing to ask
    assert (await res.call([Target(upstream="a", model="m")], _called, 30)).value == "a"


async def test_every_call_to_the_upstream_model_counts_as_another_models_fallback_too(
    redis_client: aioredis.Redis,
) -> None:
    res = _resilience(redis_client, {"upstream": "a", "model": "m", "rpm": 1})

    async def primary_down(target: Target) -> str:
        if target.upstream == "down":
            raise ConnectionError("refused")
        return target.upstream

    as_fallback = [Target(upstream="down", model="x"), Target(upstream="a", model="m")]
    assert (await res.call(as_fallback, primary_down, 30)).value == "a"
    with pytest.raises(TargetLimitedError):
        await res.call([Target(upstream="a", model="m")], _called, 30)


async def test_a_probe_passed_over_at_its_rpm_gives_its_permit_back(
    redis_client: aioredis.Redis,
) -> None:
    """The breaker is asked first: a half-open probe's permit taken for a target at its
    limit would otherwise wait out its lease with no call to judge it by."""
    settings = ResilienceSettings.model_validate(
        {
            "default": {"breaker": {"permitted_calls_in_half_open": 1}},
            "balance": {"gpt": {"targets": [{"upstream": "a", "model": "m", "rpm": 1}]}},
        }
    )
    prefix = f"{{test-targets-{uuid.uuid4().hex[:8]}}}"
    limiter = RateLimiter(redis_client, LimiterSettings(key_prefix=prefix))
    res = Resilience(
        settings, MemoryBreakerStore(), target_limits=TargetLimits(limiter, settings.balance)
    )
    target = Target(upstream="a", model="m")
    assert (await res.call([target], _called, 30)).value == "a"  # the minute's one call
    cfg = settings.default.breaker
    await res.store.open_for("a/m", cfg, 0.05)
    await asyncio.sleep(0.1)  # now half-open: one probe at a time
    with pytest.raises(TargetLimitedError):
        await res.call([target], _called, 30)
    await res.drain()
    assert (await res.store.acquire("a/m", cfg, 30)).allowed  # the probe permit came back
