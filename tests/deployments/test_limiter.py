"""The limiter against a real Redis (the session's embedded Valkey or REDIS_URL)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments.limiter import RateLimiter
from deployments.limiter_decision import NEVER, LimitDecision
from deployments.limiter_settings import LimiterSettings
from serve_app.context import Principal, RequestContext
from serve_app.errors import RateLimitError

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0  # a realistic epoch: microsecond stamps near 2**51


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ctx(
    key: str = "k1",
    tenant: str = "t1",
    user: str | None = None,
    model: str = "m1",
    prompt: int = 0,
    max_tokens: int | None = 0,
    route: str = "chat",
) -> RequestContext:
    return RequestContext(
        request_id="r",
        principal=Principal(key_id=key, tenant=tenant),
        route=route,
        model=model,
        body={},
        end_user=user,
        prompt_tokens_estimate=prompt,
        max_tokens=max_tokens,
    )


def limits(**scopes: Any) -> LimiterSettings:
    return LimiterSettings.model_validate(scopes)


def per_key(*quotas: dict[str, Any], **extra: Any) -> LimiterSettings:
    # A generous store timeout: two shared cores can stall a burst of 200 for a while,
    # and these tests are about counting, not about timeouts.
    extra.setdefault("store_timeout_s", 10)
    return limits(per_key={"default": list(quotas)}, **extra)


def window(decision: LimitDecision, seconds: float, shadow: bool = False) -> Any:
    (found,) = [
        w for w in decision.windows if w.window_us == seconds * 1_000_000 and w.shadow == shadow
    ]
    return found


@pytest.mark.parametrize(
    ("k", "windows"),
    [(1, ["1m"]), (7, ["90s"]), (50, ["1m", "1h"]), (120, ["1m", "1h", "1d"])],
)
async def test_concurrent_acquires_from_replicas_admit_exactly_k(
    replicas: list[aioredis.Redis], k: int, windows: list[str]
) -> None:
    # The longer windows get looser limits: the tightest one must bind exactly.
    quotas = [{"window": w, "requests": k + 3 * i} for i, w in enumerate(windows)]
    limiters = [RateLimiter(client, per_key(*quotas)) for client in replicas]
    decisions = await asyncio.gather(
        *(limiters[i % len(limiters)].evaluate(ctx()) for i in range(200))
    )
    assert {d.outcome for d in decisions} == {"allowed", "rejected"}
    assert sum(d.allowed for d in decisions) == k
    probe = await limiters[0].evaluate(ctx())
    assert [w.requests_used for w in probe.windows] == [k] * len(windows)


@pytest.mark.parametrize("k", [3, 40])
async def test_concurrent_token_reservations_admit_exactly_k(
    replicas: list[aioredis.Redis], k: int
) -> None:
    settings = per_key({"window": "1m", "tokens": 100 * k})
    limiters = [RateLimiter(client, settings) for client in replicas]
    decisions = await asyncio.gather(
        *(limiters[i % 4].evaluate(ctx(prompt=60, max_tokens=40)) for i in range(200))
    )
    assert {d.outcome for d in decisions} == {"allowed", "rejected"}
    assert sum(d.allowed for d in decisions) == k


async def test_a_request_rejected_by_the_day_consumes_nothing_from_the_minute(
    redis_client: aioredis.Redis,
) -> None:
    day = {"window": "1d", "requests": 2}
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "requests": 3}, day))
    assert [(await limiter.evaluate(ctx())).allowed for _ in range(2)] == [True, True]
    rejected = await limiter.evaluate(ctx())
    assert rejected.hit is not None and rejected.hit.label == "key:requests:1d"
    assert window(rejected, 60).requests_used == 2
    assert not any(w.recorded for w in rejected.windows)

    # Raise the day limit at run time: the minute window still has exactly one slot.
    limiter.reconfigure(per_key({"window": "1m", "requests": 3}, {**day, "requests": 10}))
    assert (await limiter.evaluate(ctx())).allowed
    last = await limiter.evaluate(ctx())
    assert not last.allowed and last.hit is not None and last.hit.label == "key:requests:1m"


async def test_hits_spread_over_a_window_then_a_slot_frees_when_the_oldest_leaves(
    redis_client: aioredis.Redis,
) -> None:
    clock = FakeClock()
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "requests": 3}), clock=clock)
    for offset in (0, 20, 40):
        clock.now = T0 + offset
        assert (await limiter.evaluate(ctx())).allowed
    headers = limiter.headers(await limiter.evaluate(ctx()))
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "20s"  # the hit at 0 leaves at 60

    clock.now = T0 + 59.999
    with pytest.raises(RateLimitError) as caught:
        await limiter.acquire(ctx())
    assert caught.value.headers["retry-after-ms"] == "1"
    assert caught.value.headers["retry-after"] == "1"
    assert "requests per minute for key 'k1'" in caught.value.message

    clock.now = T0 + 60
    admitted = await limiter.acquire(ctx())
    assert limiter.headers(admitted)["x-ratelimit-reset-requests"] == "20s"  # the hit at 20
    clock.now = T0 + 60.5
    rejected = await limiter.evaluate(ctx())
    assert rejected.retry_after_us == 19_500_000  # the hit at 20 leaves at 80
    assert rejected.error().headers["retry-after"] == "20"


async def test_hits_sharing_a_slice_leave_at_most_a_slice_late(
    redis_client: aioredis.Redis,
) -> None:
    # precision 10 over 10 s: 1 s slices; hits at .2 and .7 share one entry stamped .7.
    clock = FakeClock(T0 + 0.2)
    settings = per_key({"window": "10s", "requests": 2}, precision=10)
    limiter = RateLimiter(redis_client, settings, clock=clock)
    assert (await limiter.evaluate(ctx())).allowed
    clock.now = T0 + 0.7
    assert (await limiter.evaluate(ctx())).allowed
    clock.now = T0 + 10.2  # the first hit's exact release time
    late = await limiter.evaluate(ctx())
    assert not late.allowed and late.retry_after_us == 500_000
    clock.now = T0 + 10.7
    assert (await limiter.evaluate(ctx())).allowed


async def test_retry_after_waits_for_enough_tokens_to_leave(
    redis_client: aioredis.Redis,
) -> None:
    clock = FakeClock()
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "tokens": 1000}), clock=clock)
    for offset, size in ((0, 300), (10, 300), (20, 300)):
        clock.now = T0 + offset
        assert (await limiter.evaluate(ctx(prompt=size))).allowed
    clock.now = T0 + 30
    # 900 used: 400 more needs 300 to leave (the hit at 0), 500 more needs 400 (two hits).
    rejected = await limiter.evaluate(ctx(prompt=400))
    assert rejected.hit is not None and rejected.hit.dimension == "tokens"
    assert rejected.retry_after_us == 30_000_000  # the hit at 0 leaves at 60
    rejected = await limiter.evaluate(ctx(prompt=500))
    assert rejected.retry_after_us == 40_000_000  # needs the hit at 10 gone too


async def test_tokens_are_reserved_then_settled_to_real_usage(
    redis_client: aioredis.Redis,
) -> None:
    limiter = RateLimiter(
        redis_client, per_key({"window": "1m", "tokens": 1000}, default_max_tokens=300)
    )
    first = await limiter.acquire(ctx(prompt=100, max_tokens=None))  # 100 + default 300
    assert first.reserved_tokens == 400
    assert limiter.headers(first)["x-ratelimit-remaining-tokens"] == "600"
    await limiter.settle(first, 150)  # refund 250
    await limiter.settle(first, 10)  # a second settlement changes nothing
    second = await limiter.acquire(ctx(prompt=100, max_tokens=200))
    assert window(second, 60).tokens_used == 150 + 300
    await limiter.settle(second, 500)  # the answer ran long: charge 200 more
    third = await limiter.evaluate(ctx())
    assert window(third, 60).tokens_used == 650


async def test_an_upstream_error_refunds_the_whole_reservation(
    redis_client: aioredis.Redis,
) -> None:
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "requests": 5, "tokens": 500}))
    failed = await limiter.acquire(ctx(prompt=200, max_tokens=200))
    await limiter.settle(failed, None)
    after = await limiter.evaluate(ctx(prompt=500))
    assert after.allowed  # all 500 tokens are free again; the request itself still counts
    assert window(after, 60).requests_used == 2


async def test_embeddings_reserve_only_their_input(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "tokens": 100}))
    decision = await limiter.acquire(ctx(prompt=30, max_tokens=None, route="embeddings"))
    assert decision.reserved_tokens == 30


async def test_a_request_that_can_never_fit_says_so_and_consumes_nothing(
    redis_client: aioredis.Redis,
) -> None:
    limiter = RateLimiter(redis_client, per_key({"window": "1m", "requests": 5, "tokens": 100}))
    with pytest.raises(RateLimitError) as caught:
        await limiter.acquire(ctx(prompt=150))
    assert caught.value.headers["x-should-retry"] == "false"
    assert "retry-after" not in caught.value.headers
    assert "needs 150 tokens" in caught.value.message
    probe = await limiter.evaluate(ctx())
    assert window(probe, 60).requests_used == 1


async def test_shadow_quotas_report_but_never_block(redis_client: aioredis.Redis) -> None:
    settings = per_key(
        {"window": "1m", "requests": 5}, {"window": "1m", "requests": 1, "shadow": True}
    )
    limiter = RateLimiter(redis_client, settings)
    assert (await limiter.acquire(ctx())).outcome == "allowed"
    second = await limiter.acquire(ctx())
    assert second.outcome == "shadow_rejected"
    assert second.hit is not None and second.hit.shadow and second.shadow_hits == (second.hit,)
    # As if it were enforced: the shadow window did not record the request it would refuse.
    assert window(second, 60, shadow=True).requests_used == 1
    assert window(second, 60).requests_used == 2
    assert limiter.headers(second)["x-ratelimit-limit-requests"] == "5"


async def test_each_scope_counts_its_own_name(redis_client: aioredis.Redis) -> None:
    one = [{"window": "1m", "requests": 1}]
    settings = limits(
        per_user={"default": one},
        per_model={"default": one, "overrides": {"big": [{"window": "1m", "requests": 2}]}},
    )
    limiter = RateLimiter(redis_client, settings)
    assert (await limiter.evaluate(ctx(user="alice", model="a"))).allowed
    # Same user name in another tenant is another user; another model has its own quota.
    assert (await limiter.evaluate(ctx(user="alice", tenant="t2", model="b"))).allowed
    repeat = await limiter.evaluate(ctx(user="alice", model="c"))
    assert (
        repeat.hit is not None and repeat.hit.describe() == "requests per minute for user 'alice'"
    )
    assert (await limiter.evaluate(ctx(model="big"))).allowed
    assert (await limiter.evaluate(ctx(model="big"))).allowed
    assert not (await limiter.evaluate(ctx(model="big"))).allowed


async def test_no_quota_or_disabled_needs_no_store(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client, limits())
    assert (await limiter.evaluate(ctx())).outcome == "unlimited"
    limiter.reconfigure(per_key({"window": "1m", "requests": 0}, enabled=False))
    assert (await limiter.evaluate(ctx())).outcome == "disabled"


async def test_the_observer_sees_every_decision(redis_client: aioredis.Redis) -> None:
    seen: list[LimitDecision] = []

    class Observer:
        def on_decision(self, decision: LimitDecision) -> None:
            seen.append(decision)

        def on_store_error(self, operation: str) -> None:
            raise AssertionError(operation)

        def on_lease(self, granted: int, used: int) -> None:
            raise AssertionError("no lease for a limit of 1")

    limiter = RateLimiter(
        redis_client, per_key({"window": "1m", "requests": 1}), observer=Observer()
    )
    await limiter.evaluate(ctx())
    with pytest.raises(RateLimitError):
        await limiter.acquire(ctx())
    assert [d.outcome for d in seen] == ["allowed", "rejected"]
    assert seen[1].hit is not None and seen[1].hit.label == "key:requests:1m"
    assert all(d.latency_s > 0 for d in seen)
    assert seen[1].retry_after_us not in (None, NEVER)


async def test_idle_windows_expire(redis_client: aioredis.Redis) -> None:
    settings = per_key({"window": "90s", "requests": 5}, precision=90)
    decision = await RateLimiter(redis_client, settings).acquire(ctx())
    (state,) = decision.windows
    for key in (state.log_key, state.costs_key):
        # The window, plus one slice (an entry's stamp moves up to a slice), plus 1 s.
        assert 90_000 < await redis_client.pttl(key) <= 92_000


def test_the_reservation_holds_max_tokens_for_every_completion_asked_for() -> None:
    """n (chat), best_of and several prompts (``/v1/completions``) each multiply the
    completion tokens a request may produce; embeddings produce none."""
    import redis.asyncio as aioredis

    limiter = RateLimiter(aioredis.Redis(), limits(default_max_tokens=50))  # never connects
    one = ctx(prompt=10, max_tokens=100)
    assert limiter.reservation(one) == 110
    one.choices = 4
    assert limiter.reservation(one) == 410
    unset = ctx(prompt=10, max_tokens=None)
    unset.choices = 3
    assert limiter.reservation(unset) == 160
    embeddings = ctx(prompt=10, max_tokens=None, route="embeddings")
    embeddings.choices = 3
    assert limiter.reservation(embeddings) == 10
