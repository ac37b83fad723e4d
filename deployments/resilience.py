"""Breakers, bulkheads, retries and fallbacks around the provider client.

A model's chain is its balance group in the order the balancer picked for
this call (``deployments/balancer.py``), else its primary, then its fallbacks.

For each target of a model's fallback chain, in order: ask the target's
breaker for permission (one Redis round trip; while it is open, a refusal is
repeated from memory for up to ``refusal_cache_s``), take a bulkhead slot,
call the upstream, record the outcome (one round trip; slow by measured
duration; a success is recorded off the response path), then retry the same
target (safe failures only, within the deadline) or move on to the next.
A 429/503 carrying ``retry-after`` opens the breaker for exactly that long.
No lock is held across the upstream call.

For a stream, ``attempt`` returns once the upstream's first chunk arrived:
the breaker records the time to first chunk, nothing is retried after it,
and the bulkhead slot is held until ``ResilienceResult.release()``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis.asyncio as aioredis

from deployments.balancer import Balancer
from deployments.breaker import (
    BreakerSettings,
    BreakerSnapshot,
    BreakerState,
    BreakerStore,
    Decision,
    Outcome,
    Record,
    classify,
    open_error,
)
from deployments.breaker_store import FailoverBreakerStore, RedisBreakerStore
from deployments.bulkhead import Bulkhead
from deployments.limiter_decision import LimitDecision
from deployments.resilience_settings import ResilienceSettings, Target, UpstreamPolicy
from deployments.retry import RetryPolicy, context_overflow, retry_after_s, should_fall_back
from deployments.retry_budget import RetryBudget
from deployments.target_limits import TargetLimitedError, TargetLimits
from serve_app.errors import (
    GatewayError,
    NotFoundError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)

T = TypeVar("T")
LEASE_GRACE_S = 1.0  # a probe's lease outlives its deadline a little
MAX_BACKGROUND = 32  # outcomes recorded off the response path at once (pool connections)
# Successes wait this long to be recorded together: one round trip for many calls.
DEFER_S = 0.005
MAX_DEFERRED = 512
log = logging.getLogger(__name__)

__all__ = [
    "Resilience",
    "ResilienceMetrics",
    "ResilienceResult",
    "ResilienceSettings",
    "Target",
    "UpstreamPolicy",
]


@dataclass
class ResilienceMetrics:
    """Counters for a metrics collector to read (this replica's share)."""

    transitions: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # breaker, from, to
    refused: Counter[str] = field(default_factory=Counter)  # breaker
    retries: Counter[str] = field(default_factory=Counter)  # upstream
    retries_over_budget: Counter[str] = field(default_factory=Counter)  # upstream
    fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)  # from, to breaker
    picks: Counter[tuple[str, str]] = field(default_factory=Counter)  # model, upstream/model
    context_fallbacks: Counter[str] = field(default_factory=Counter)  # breaker that overflowed
    bulkhead_rejected: Counter[str] = field(default_factory=Counter)  # upstream
    target_limited: Counter[str] = field(default_factory=Counter)  # upstream/model at rpm/tpm
    states: dict[str, BreakerState] = field(default_factory=dict)  # last state seen


@dataclass
class ResilienceResult(Generic[T]):
    value: T
    target: Target
    attempts: int  # upstream calls made, retries and fallbacks included
    release: Callable[[], None] = lambda: None  # streams: call when the stream ends
    # The call's total tokens, once known (None: none reported), for the target's tpm.
    settle: Callable[[int | None], None] = lambda tokens: None

    def headers(self) -> dict[str, str]:
        return {"x-upstream": self.target.upstream, "x-attempts": str(self.attempts)}


class _NextTarget(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Run:
    deadline: float
    clock: Callable[[], float]
    attempts: int = 0
    last_target: Target | None = None

    def remaining(self) -> float:
        return self.deadline - self.clock()


class Resilience:
    """The orchestrator the ingress calls around the provider, plus admin operations."""

    def __init__(
        self,
        settings: ResilienceSettings,
        store: BreakerStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        target_limits: TargetLimits | None = None,
        price: Callable[[Target], float | None] = lambda target: None,
    ) -> None:
        """``price``: a target's cost per token (lowest-cost balance groups)."""
        self.settings = settings
        self.store = store
        self.target_limits = target_limits or None  # None too when no target has limits
        self.metrics = ResilienceMetrics()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._bulkheads: dict[str, Bulkhead] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._breakers: dict[str, BreakerSettings] = {}
        self._background: set[asyncio.Task[BreakerState]] = set()
        self._refusing: dict[str, tuple[float, float, Decision]] = {}  # name -> (at, until, it)
        self._permits: dict[str, tuple[float, Decision]] = {}  # name -> (until, closed permit)
        self._deferred: list[tuple[str, BreakerSettings, Decision, Outcome]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.balancer = Balancer(settings.balance, clock=clock, rng=self._rng, price=price)
        chains = (*settings.fallbacks.values(), *settings.context_fallbacks.values())
        targets = [t for chain in chains for t in chain]
        targets += [t for group in settings.balance.values() for t in group.targets]
        for target in targets:
            self.breaker_name(target)

    @classmethod
    def with_redis(
        cls,
        settings: ResilienceSettings,
        client: aioredis.Redis,
        target_limits: TargetLimits | None = None,
        price: Callable[[Target], float | None] = lambda target: None,
    ) -> Resilience:
        shared = RedisBreakerStore(client, prefix=settings.key_prefix)
        store = FailoverBreakerStore(shared, retry_primary_after_s=settings.store_retry_after_s)
        return cls(settings, store, target_limits=target_limits, price=price)

    def chain(self, model: str, primary: Target | None = None) -> list[Target]:
        """The targets to try for one call of ``model``, in order: its balance group
        as the balancer ordered it, else its configured chain (primary first), else
        just ``primary``; then the configured chain's targets not tried yet."""
        configured = self.settings.fallbacks.get(model)
        group = self.balancer.order(model, self._known_open) if self.balancer.groups else None
        if group is None:
            if configured:
                return list(configured)
            return [] if primary is None else [primary]
        first = group[0]
        self.metrics.picks[(model, f"{first.upstream}/{first.model}")] += 1
        if configured:
            group.extend(t for t in configured if t not in group)
        return group

    def overflow(self, model: str) -> list[Target]:
        """Where ``model``'s calls go when a request does not fit its context window."""
        return list(self.settings.context_fallbacks.get(model, ()))

    def _known_open(self, target: Target) -> bool:
        """Whether this replica holds a refusal from the target's breaker right now."""
        cached = self._refusing.get(self.breaker_name(target))
        return cached is not None and self._clock() < cached[1]

    def breaker_name(self, target: Target) -> str:
        policy = self.settings.policy(target.upstream)
        name = target.upstream
        if policy.breaker_scope == "model":
            name = f"{target.upstream}/{target.breaker_model}"
        self._breakers.setdefault(name, policy.breaker)
        return name

    def bulkhead(self, upstream: str) -> Bulkhead:
        found = self._bulkheads.get(upstream)
        if found is None:
            settings = self.settings.policy(upstream).bulkhead
            found = self._bulkheads[upstream] = Bulkhead(upstream, settings)
        return found

    def retry_budget(self, upstream: str) -> RetryBudget:
        found = self._budgets.get(upstream)
        if found is None:
            s = self.settings.policy(upstream).retry
            found = self._budgets[upstream] = RetryBudget(
                s.budget_percent, s.budget_min_per_s, s.budget_window_s, self._clock
            )
        return found

    async def call(
        self,
        chain: Sequence[Target],
        attempt: Callable[[Target], Awaitable[T]],
        deadline_s: float,
        *,
        stream: bool = False,
        overflow: Sequence[Target] = (),
        tokens: int = 0,
    ) -> ResilienceResult[T]:
        """Serve from the first target that can; raise the most telling error if none can.

        ``overflow``: the targets with a larger context window. When a target answers
        that the request does not fit its model's, they take over the rest of the chain
        (its other targets have the same window, or would have been listed there).
        ``tokens``: what the request may use, held on a target's tpm until ``settle``."""
        balancer, picked = self.balancer, chain[0] if chain else None
        if picked is None or not balancer.enter(picked):
            return await self._call(chain, attempt, deadline_s, stream, overflow, tokens)
        try:  # counted as in flight at its pick until the call, or its stream, ends
            result = await self._call(chain, attempt, deadline_s, stream, overflow, tokens)
        except BaseException:
            balancer.leave(picked)
            raise
        if not stream:
            balancer.leave(picked)
            return result
        release = result.release

        def release_both() -> None:
            release()
            balancer.leave(picked)

        result.release = _once_only(release_both)
        return result

    async def _call(
        self,
        chain: Sequence[Target],
        attempt: Callable[[Target], Awaitable[T]],
        deadline_s: float,
        stream: bool,
        overflow: Sequence[Target],
        tokens: int,
    ) -> ResilienceResult[T]:
        run = _Run(self._clock() + deadline_s, self._clock)
        errors: list[BaseException] = []
        previous: str | None = None
        pending = deque(chain)
        try:
            while pending:
                target = pending.popleft()
                name = self.breaker_name(target)
                if previous is not None:
                    self.metrics.fallbacks[(previous, name)] += 1
                previous = name
                try:
                    return await self._serve(target, name, attempt, run, stream, tokens)
                except _NextTarget as moved:
                    errors.append(moved.error)
                except UpstreamError as refused:
                    if not (overflow and context_overflow(refused)):
                        raise
                    self.metrics.context_fallbacks[name] += 1
                    errors.append(refused)
                    pending, overflow = deque(overflow), ()
                if run.remaining() <= 0:
                    break
            raise _final_error(errors)
        except GatewayError as exc:
            exc.headers["x-attempts"] = str(run.attempts)
            if run.last_target is not None:
                exc.headers["x-upstream"] = run.last_target.upstream
            raise

    async def _serve(
        self,
        target: Target,
        name: str,
        attempt: Callable[[Target], Awaitable[T]],
        run: _Run,
        stream: bool,
        tokens: int = 0,
    ) -> ResilienceResult[T]:
        policy = self.settings.policy(target.upstream)
        retry = RetryPolicy(policy.retry, self._rng)
        budget = self.retry_budget(target.upstream)
        calls = 0
        while True:
            remaining = run.remaining()
            if remaining <= 0:
                raise _NextTarget(UpstreamTimeoutError("The request's deadline passed."))
            permit = await self._acquire(name, policy.breaker, remaining + LEASE_GRACE_S)
            if not permit.allowed:
                self.metrics.refused[name] += 1
                raise _NextTarget(open_error(name, permit))
            share = None
            if self.target_limits is not None:
                try:
                    share = await self._target_share(self.target_limits, target, tokens)
                except BaseException:  # passed over (or cancelled) holding the permit
                    self._give_back(name, policy.breaker, permit)
                    raise
            calls += 1
            if calls == 1:
                budget.deposit()  # a first call: what retries are a share of
            try:
                result = await self._once(target, name, policy, permit, attempt, run, stream)
            except BaseException:
                self._settle_share(share, None)
                raise
            if isinstance(result, ResilienceResult):
                if share is not None:
                    result.settle = functools.partial(self._settle_share, share)
                return result
            self._settle_share(share, None)  # the provider saw the call: its tokens go back
            error, state = result
            delay = None
            if state not in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
                delay = retry.delay_s(calls, error, run.remaining())
            if delay is not None and not budget.try_withdraw():
                self.metrics.retries_over_budget[target.upstream] += 1
                delay = None
            if delay is None:
                if should_fall_back(error):
                    raise _NextTarget(error)
                raise error
            self.metrics.retries[target.upstream] += 1
            await self._sleep(delay)

    async def _target_share(
        self, limits: TargetLimits, target: Target, tokens: int
    ) -> LimitDecision | None:
        """The call's share of the target's rpm/tpm (``deployments/target_limits.py``);
        a target at its limit is passed over like one whose breaker is open."""
        try:
            return await limits.admit(target, tokens)
        except TargetLimitedError as busy:
            self.metrics.target_limited[f"{target.upstream}/{target.model}"] += 1
            raise _NextTarget(busy) from None

    def _settle_share(self, share: LimitDecision | None, used: int | None) -> None:
        if share is not None and self.target_limits is not None:
            self.target_limits.settle(share, used)

    def _give_back(self, name: str, cfg: BreakerSettings, permit: Decision) -> None:
        """A half-open probe's permit not used for a call goes back, so the breaker
        does not wait out its lease for an answer that never comes."""
        if permit.permit_id:
            self._record_later(name, cfg, permit, None, Outcome.IGNORED)

    async def _acquire(self, name: str, cfg: BreakerSettings, lease_s: float) -> Decision:
        now = self._clock()
        closed = self._permits.get(name)
        if closed is not None and now < closed[0]:
            return closed[1]
        cached = self._refusing.get(name)
        if cached is not None and now < cached[1]:
            fetched, _, refusal = cached
            if refusal.state == BreakerState.OPEN:
                left = refusal.retry_after_ms - round((now - fetched) * 1000)
                refusal = refusal._replace(retry_after_ms=max(0, left))
            return refusal._replace(transition=None)
        permit = await self.store.acquire(name, cfg, lease_s)
        self._observe(name, permit)
        reusable = permit.allowed and permit.state == BreakerState.CLOSED and not permit.permit_id
        if reusable and self.settings.permit_cache_s > 0:
            self._permits[name] = (now + self.settings.permit_cache_s, permit)
        if permit.allowed or permit.state not in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            self._refusing.pop(name, None)
            return permit
        keep = self.settings.refusal_cache_s
        if permit.state == BreakerState.OPEN:
            keep = min(keep, permit.retry_after_ms / 1000)
        self._refusing[name] = (now, now + keep, permit)
        return permit

    async def _once(
        self,
        target: Target,
        name: str,
        policy: UpstreamPolicy,
        permit: Decision,
        attempt: Callable[[Target], Awaitable[T]],
        run: _Run,
        stream: bool,
    ) -> ResilienceResult[T] | tuple[BaseException, BreakerState]:
        """One call; its result, or its error and the breaker's state after recording it."""
        bulkhead = self.bulkhead(target.upstream)
        try:
            await bulkhead.acquire(run.remaining())
        except ServiceUnavailableError as full:
            self.metrics.bulkhead_rejected[target.upstream] += 1
            if permit.permit_id:  # give a probe's permit back
                await self.store.record(name, policy.breaker, permit, Outcome.IGNORED)
            return full, permit.state
        except asyncio.CancelledError:
            self._give_back(name, policy.breaker, permit)
            raise
        run.attempts += 1
        run.last_target = target
        started = self._clock()
        deadline = asyncio.timeout(max(0.0, run.remaining()))
        balancer = self.balancer
        balancer.started(target)
        try:
            async with deadline:
                value = await attempt(target)
        except asyncio.CancelledError:
            bulkhead.release()
            balancer.abandoned(target)
            self._give_back(name, policy.breaker, permit)  # the client went away
            raise
        except Exception as exc:
            bulkhead.release()
            took = self._clock() - started
            outcome = _outcome(exc, took, policy.breaker, deadline.expired())
            if outcome.failed:  # as the breaker judges it: a 400 is not the target's fault
                balancer.finished(target, None)
            else:
                balancer.abandoned(target)
            return exc, await self._record(name, policy.breaker, permit, exc, outcome)
        took = self._clock() - started
        balancer.finished(target, took)
        # A success never changes what this request does next: record it off the response path.
        outcome = classify(None, took, policy.breaker)
        if not self._defer(name, policy.breaker, permit, outcome):
            # Redis is slower than the traffic: push back rather than pile up
            await self._record(name, policy.breaker, permit, None, outcome)
        if not stream:
            bulkhead.release()
            return ResilienceResult(value, target, run.attempts)
        return ResilienceResult(value, target, run.attempts, _once_only(bulkhead.release))

    async def _record(
        self,
        name: str,
        cfg: BreakerSettings,
        permit: Decision,
        exc: Exception | None,
        outcome: Outcome,
    ) -> BreakerState:
        if exc is not None:
            self._permits.pop(name, None)  # ask the store again before the next call
        open_for = 0.0
        if isinstance(exc, UpstreamError) and exc.status_code in (429, 503):
            open_for = retry_after_s(exc.headers) or 0.0
        decision = await self.store.record(name, cfg, permit, outcome, open_for)
        self._observe(name, decision)
        return decision.state

    def _record_later(
        self,
        name: str,
        cfg: BreakerSettings,
        permit: Decision,
        exc: Exception | None,
        outcome: Outcome,
    ) -> None:
        task = asyncio.ensure_future(self._record(name, cfg, permit, exc, outcome))
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[BreakerState]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("breaker outcome not recorded: %s", task.exception())

    def _defer(self, name: str, cfg: BreakerSettings, permit: Decision, outcome: Outcome) -> bool:
        """Queue a success's outcome for the next batch; False when the queue is full."""
        if len(self._deferred) >= MAX_DEFERRED:
            return False
        self._deferred.append((name, cfg, permit, outcome))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_deferred())
        return True

    async def _flush_deferred(self) -> None:
        await asyncio.sleep(DEFER_S)
        while self._deferred:
            batch, self._deferred = self._deferred, []
            batch = _coalesced(batch)
            try:
                decisions = await self.store.record_many(batch)
            except Exception as exc:  # never raise into nothing: the answer has gone
                log.warning("breaker outcomes not recorded: %s", exc)
                continue
            for (name, *_), decision in zip(batch, decisions, strict=True):
                self._observe(name, decision)

    async def drain(self) -> None:
        """Wait for outcomes still being recorded in the background (shutdown, tests)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)

    def _observe(self, name: str, decision: Decision) -> None:
        if decision.state != BreakerState.CLOSED:
            self._permits.pop(name, None)
        if decision.transition is not None:
            old, new = decision.transition
            self.metrics.transitions[(name, old.name, new.name)] += 1
        self.metrics.states[name] = decision.state

    # Admin operations (the ingress guards them with the admin key).

    def _settings_of(self, name: str) -> BreakerSettings:
        cfg = self._breakers.get(name)
        if cfg is None:
            raise NotFoundError(f"No breaker named '{name}'.")
        return cfg

    async def breakers(self) -> list[BreakerSnapshot]:
        names = sorted(self._breakers)
        return list(
            await asyncio.gather(*(self.store.snapshot(n, self._breakers[n]) for n in names))
        )

    async def _force(self, name: str, state: BreakerState) -> BreakerSnapshot:
        cfg = self._settings_of(name)
        self._refusing.pop(name, None)
        self._observe(name, await self.store.set_state(name, cfg, state))
        return await self.store.snapshot(name, cfg)

    async def force_open(self, name: str) -> BreakerSnapshot:
        return await self._force(name, BreakerState.FORCED_OPEN)

    async def force_close(self, name: str) -> BreakerSnapshot:
        return await self._force(name, BreakerState.CLOSED)

    async def disable(self, name: str) -> BreakerSnapshot:
        return await self._force(name, BreakerState.DISABLED)

    async def metrics_only(self, name: str) -> BreakerSnapshot:
        return await self._force(name, BreakerState.METRICS_ONLY)

    async def reset(self, name: str) -> BreakerSnapshot:
        cfg = self._settings_of(name)
        self._refusing.pop(name, None)
        await self.store.reset(name)
        self.metrics.states[name] = BreakerState.CLOSED
        return await self.store.snapshot(name, cfg)


def _outcome(exc: Exception, took_s: float, cfg: BreakerSettings, cut: bool) -> Outcome:
    if not cut:
        return classify(exc, took_s, cfg)
    # Our own deadline cut the call: it proves slowness only past the slow-call
    # threshold; a client's short deadline says nothing against the upstream.
    return Outcome.SLOW_FAILURE if took_s > cfg.slow_call_duration_s else Outcome.IGNORED


def _once_only(release: Callable[[], None]) -> Callable[[], None]:
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            release()

    return once


def _final_error(errors: list[BaseException]) -> BaseException:
    """The last upstream error; if no upstream was called, the soonest-retry refusal."""
    called = [e for e in errors if not isinstance(e, ServiceUnavailableError | TargetLimitedError)]
    if called:
        last = called[-1]
        if isinstance(last, TimeoutError):
            return UpstreamTimeoutError("The upstream did not answer before the deadline.")
        return last
    if not errors:
        return ServiceUnavailableError("No upstream is configured for this model.")

    def wait(error: BaseException) -> float:
        headers = error.headers if isinstance(error, GatewayError) else {}
        return retry_after_s(headers) or 0.0

    return min(errors, key=wait)


def _coalesced(outcomes: list[tuple[str, BreakerSettings, Decision, Outcome]]) -> list[Record]:
    """Equal outcomes under one CLOSED permit (no lease: permit id 0) become one record
    with a count, one store call for many; a half-open probe's stays its own."""
    counts: dict[tuple[str, int, Outcome], int] = {}
    first: dict[tuple[str, int, Outcome], tuple[str, BreakerSettings, Decision, Outcome]] = {}
    records: list[Record] = []
    for item in outcomes:
        name, cfg, permit, outcome = item
        if permit.permit_id:
            records.append((name, cfg, permit, outcome, 0.0, 1))
            continue
        group = (name, permit.generation, outcome)
        counts[group] = counts.get(group, 0) + 1
        first.setdefault(group, item)
    records += [(*first[group], 0.0, count) for group, count in counts.items()]
    return records
