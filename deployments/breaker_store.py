"""Where breaker state lives: process memory, Redis, or Redis with a local fallback.

``RedisBreakerStore`` runs ``breaker_store.lua`` (the same algorithm as
``BreakerMachine``) on the server's clock, so every replica sees one state and
one set of half-open permits. Asking permission is one round trip, recording
an outcome is another; nothing is held across the upstream call.

When Redis is unreachable, ``FailoverBreakerStore`` keeps protecting the
upstreams with a replica-local breaker rather than refusing every call (a
store outage must not become an LLM outage, and failing open with no breaker
at all would let a storm through). During the outage each replica decides on
its own traffic, so half-open probes are bounded per replica, not per
cluster. Redis is retried every ``retry_primary_after_s``; once it answers,
the local state is discarded and the shared state rules again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from deployments.breaker import (
    BreakerMachine,
    BreakerSettings,
    BreakerSnapshot,
    BreakerState,
    BreakerStore,
    Decision,
    Outcome,
    Record,
    Transition,
    effective_minimum,
    ms,
)
from deployments.script_batch import ScriptBatch
from serve_app.errors import StoreUnavailableError

log = logging.getLogger(__name__)

_SCRIPT = resources.files("deployments").joinpath("breaker_store.lua").read_text()


class MemoryBreakerStore:
    """``BreakerStore`` in process memory: tests, and the fallback when Redis is down."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._machines: dict[str, BreakerMachine] = {}

    def _now_ms(self) -> int:
        return ms(self._clock())

    def _machine(self, name: str) -> BreakerMachine:
        machine = self._machines.get(name)
        if machine is None:
            machine = self._machines[name] = BreakerMachine()
        return machine

    async def acquire(self, name: str, cfg: BreakerSettings, lease_s: float) -> Decision:
        return self._machine(name).acquire(cfg, self._now_ms(), ms(lease_s))

    async def record(
        self,
        name: str,
        cfg: BreakerSettings,
        permit: Decision,
        outcome: Outcome,
        open_for_s: float = 0.0,
    ) -> Decision:
        machine = self._machine(name)
        return machine.record(cfg, self._now_ms(), permit, outcome, ms(open_for_s))

    async def record_many(self, items: Sequence[Record]) -> list[Decision]:
        decisions = []
        for name, cfg, permit, outcome, open_for_s, count in items:
            for _ in range(count):
                decision = await self.record(name, cfg, permit, outcome, open_for_s)
            decisions.append(decision)
        return decisions

    async def open_for(self, name: str, cfg: BreakerSettings, seconds: float) -> Decision:
        return self._machine(name).open_for(cfg, self._now_ms(), ms(seconds))

    async def set_state(self, name: str, cfg: BreakerSettings, state: BreakerState) -> Decision:
        return self._machine(name).set_state(cfg, self._now_ms(), state)

    async def reset(self, name: str) -> None:
        self._machines.pop(name, None)

    async def snapshot(self, name: str, cfg: BreakerSettings) -> BreakerSnapshot:
        return self._machine(name).snapshot(name, cfg, self._now_ms())


def _settings_argv(cfg: BreakerSettings) -> list[int | float]:
    return [
        0 if cfg.window_type == "COUNT_BASED" else 1,
        cfg.window_size,
        effective_minimum(cfg),
        cfg.failure_rate_threshold,
        cfg.slow_call_rate_threshold,
        ms(cfg.wait_in_open_s),
        cfg.wait_multiplier,
        ms(cfg.max_wait_in_open_s),
        cfg.permitted_calls_in_half_open,
        ms(cfg.max_wait_in_half_open_s),
        ms(cfg.max_open_for_s),
    ]


def _decision(reply: Sequence[int]) -> Decision:
    allowed, state, generation, permit_id, retry_ms, from_s, to_s = (int(x) for x in reply)
    moved = None if from_s < 0 else Transition(BreakerState(from_s), BreakerState(to_s))
    return Decision(bool(allowed), BreakerState(state), generation, permit_id, retry_ms, moved)


class RedisBreakerStore:
    """``BreakerStore`` shared by every replica through one Redis.

    ``clock`` is for tests only: None (production) uses the server's TIME.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "breaker",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock
        self._script = client.register_script(_SCRIPT)
        self._batch = ScriptBatch(client, _SCRIPT, window_s=0.0)

    def _keys(self, name: str) -> list[str]:
        # Braces in a name would break the hash tag that keeps the keys on one slot.
        tag = name.replace("{", "(").replace("}", ")")
        base = f"{self._prefix}:{{{tag}}}"
        return [base, f"{base}:leases", f"{base}:window"]

    async def _run(self, name: str, cfg: BreakerSettings, op: str, *args: int) -> list[int]:
        now = "" if self._clock is None else str(ms(self._clock()))
        argv = [op, now, *_settings_argv(cfg), *args]
        try:
            return list(await self._script(keys=self._keys(name), args=argv))
        except RedisError as exc:
            raise StoreUnavailableError(f"breaker store unavailable: {exc}") from exc

    async def acquire(self, name: str, cfg: BreakerSettings, lease_s: float) -> Decision:
        return _decision(await self._run(name, cfg, "acquire", ms(lease_s)))

    async def record(
        self,
        name: str,
        cfg: BreakerSettings,
        permit: Decision,
        outcome: Outcome,
        open_for_s: float = 0.0,
    ) -> Decision:
        args = (permit.generation, permit.permit_id, int(outcome), ms(open_for_s))
        return _decision(await self._run(name, cfg, "record", *args))

    async def record_many(self, items: Sequence[Record]) -> list[Decision]:
        """Several outcomes in one round trip (one pipeline of the script)."""
        now = "" if self._clock is None else str(ms(self._clock()))
        calls = [
            self._batch(
                self._keys(name),
                ["record", now, *_settings_argv(cfg), permit.generation, permit.permit_id,
                 int(outcome), ms(open_for_s), count],
            )
            for name, cfg, permit, outcome, open_for_s, count in items
        ]  # fmt: skip
        try:
            replies = await asyncio.gather(*calls)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"breaker store unavailable: {exc}") from exc
        return [_decision(reply) for reply in replies]

    async def open_for(self, name: str, cfg: BreakerSettings, seconds: float) -> Decision:
        return _decision(await self._run(name, cfg, "open_for", ms(seconds)))

    async def set_state(self, name: str, cfg: BreakerSettings, state: BreakerState) -> Decision:
        return _decision(await self._run(name, cfg, "set_state", int(state)))

    async def reset(self, name: str) -> None:
        try:
            await self._client.delete(*self._keys(name))
        except RedisError as exc:
            raise StoreUnavailableError(f"breaker store unavailable: {exc}") from exc

    async def snapshot(self, name: str, cfg: BreakerSettings) -> BreakerSnapshot:
        state, gen, calls, failed, slow, refused, in_flight, ho_calls, remaining = (
            int(x) for x in await self._run(name, cfg, "snapshot")
        )
        half_open = state == BreakerState.HALF_OPEN
        minimum = cfg.permitted_calls_in_half_open if half_open else effective_minimum(cfg)

        def rate(part: int) -> float | None:
            return None if calls < minimum or calls == 0 else part * 100.0 / calls

        return BreakerSnapshot(
            name, BreakerState(state), gen, calls, failed, slow, rate(failed), rate(slow),
            refused, in_flight, ho_calls, remaining,
        )  # fmt: skip


class FailoverBreakerStore:
    """A shared store that falls back to a replica-local one while it is down."""

    def __init__(
        self,
        primary: BreakerStore,
        clock: Callable[[], float] = time.monotonic,
        retry_primary_after_s: float = 1.0,
    ) -> None:
        self._primary = primary
        self._clock = clock
        self._retry_after_s = retry_primary_after_s
        self._local = MemoryBreakerStore(clock)
        self._down_until: float | None = None
        self.failovers = 0  # times the primary was found down (a metric)

    @property
    def degraded(self) -> bool:
        return self._down_until is not None

    def _primary_up(self) -> bool:
        return self._down_until is None or self._clock() >= self._down_until

    def _mark(self, exc: StoreUnavailableError | None) -> None:
        if exc is None:
            if self._down_until is not None:
                log.warning("breaker store is back; local breaker state discarded")
                self._local = MemoryBreakerStore(self._clock)
                self._down_until = None
            return
        if self._down_until is None:
            self.failovers += 1
            log.warning("breaker store down, using local breakers: %s", exc)
        self._down_until = self._clock() + self._retry_after_s

    async def acquire(self, name: str, cfg: BreakerSettings, lease_s: float) -> Decision:
        if self._primary_up():
            try:
                decision = await self._primary.acquire(name, cfg, lease_s)
            except StoreUnavailableError as exc:
                self._mark(exc)
            else:
                self._mark(None)
                return decision
        return (await self._local.acquire(name, cfg, lease_s))._replace(local=True)

    async def record(
        self,
        name: str,
        cfg: BreakerSettings,
        permit: Decision,
        outcome: Outcome,
        open_for_s: float = 0.0,
    ) -> Decision:
        if permit.local:
            decision = await self._local.record(name, cfg, permit, outcome, open_for_s)
            return decision._replace(local=True)
        try:
            return await self._primary.record(name, cfg, permit, outcome, open_for_s)
        except StoreUnavailableError as exc:
            # The shared permit means nothing to the local breaker: the outcome is lost.
            self._mark(exc)
            return Decision(False, permit.state, permit.generation, local=True)

    async def record_many(self, items: Sequence[Record]) -> list[Decision]:
        shared = [i for i, item in enumerate(items) if not item[2].local]
        decisions: list[Decision | None] = [None] * len(items)
        for i, item in enumerate(items):
            if item[2].local:
                [decision] = await self._local.record_many([item])
                decisions[i] = decision._replace(local=True)
        if shared:
            try:
                replies = await self._primary.record_many([items[i] for i in shared])
            except StoreUnavailableError as exc:
                self._mark(exc)  # the outcomes are lost, as in ``record``
                replies = [
                    Decision(False, items[i][2].state, items[i][2].generation, local=True)
                    for i in shared
                ]
            for i, reply in zip(shared, replies, strict=True):
                decisions[i] = reply
        return [d for d in decisions if d is not None]

    async def open_for(self, name: str, cfg: BreakerSettings, seconds: float) -> Decision:
        try:
            return await self._primary.open_for(name, cfg, seconds)
        except StoreUnavailableError as exc:
            self._mark(exc)
            return (await self._local.open_for(name, cfg, seconds))._replace(local=True)

    async def set_state(self, name: str, cfg: BreakerSettings, state: BreakerState) -> Decision:
        # Admin actions must reach the shared state or fail loudly.
        return await self._primary.set_state(name, cfg, state)

    async def reset(self, name: str) -> None:
        await self._primary.reset(name)
        await self._local.reset(name)

    async def snapshot(self, name: str, cfg: BreakerSettings) -> BreakerSnapshot:
        return await self._primary.snapshot(name, cfg)
