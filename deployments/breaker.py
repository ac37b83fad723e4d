"""Circuit breaker state machine with Resilience4j semantics, as pure logic.

States CLOSED / OPEN / HALF_OPEN plus FORCED_OPEN, DISABLED and METRICS_ONLY.
CLOSED records outcomes in a sliding window (COUNT_BASED: the last N calls;
TIME_BASED: N one-second buckets) and opens once at least ``minimum_calls``
are recorded and the failure rate or the slow-call rate reaches its
threshold. OPEN refuses until the wait ends, then the next permission request
moves it to HALF_OPEN, which hands out exactly ``permitted_calls_in_half_open``
permits and decides on their outcomes: reopen (the wait may grow
exponentially) or close with fresh metrics.

Every call carries the generation (state epoch) its permit was issued in: an
outcome that arrives after the state moved on is dropped, so a slow call from
before an opening never counts in the fresh window. Half-open permits are
leases: a replica that dies holding one cannot wedge the breaker.

``BreakerMachine`` is this algorithm on an injected millisecond clock;
``breaker_store.lua`` is the same algorithm run atomically in Redis. Both sit
behind ``BreakerStore`` and pass one contract test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import IntEnum
from typing import Literal, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import CircuitOpenError, UpstreamError


class BreakerState(IntEnum):
    # The values are the wire encoding shared with breaker_store.lua.
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2
    FORCED_OPEN = 3
    DISABLED = 4
    METRICS_ONLY = 5


class Outcome(IntEnum):
    SUCCESS = 0
    FAILURE = 1
    SLOW_SUCCESS = 2
    SLOW_FAILURE = 3
    IGNORED = 4  # neither success nor failure; a half-open permit is given back

    @property
    def failed(self) -> bool:
        return self in (Outcome.FAILURE, Outcome.SLOW_FAILURE)

    @property
    def slow(self) -> bool:
        return self in (Outcome.SLOW_SUCCESS, Outcome.SLOW_FAILURE)


class BreakerSettings(BaseModel):
    """One breaker's thresholds (Resilience4j names; gateway-sized defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_rate_threshold: float = Field(50.0, gt=0, le=100)  # percent
    slow_call_rate_threshold: float = Field(100.0, gt=0, le=100)  # percent
    slow_call_duration_s: float = Field(30.0, gt=0)
    window_type: Literal["COUNT_BASED", "TIME_BASED"] = "COUNT_BASED"
    window_size: int = Field(50, ge=1, le=1000)  # calls, or seconds when TIME_BASED
    minimum_calls: int = Field(10, ge=1)  # no rate ("unknown") below it
    permitted_calls_in_half_open: int = Field(3, ge=1)
    wait_in_open_s: float = Field(30.0, gt=0)
    wait_multiplier: float = Field(1.0, ge=1.0)  # > 1: exponential wait on repeated openings
    max_wait_in_open_s: float = Field(300.0, gt=0)
    max_wait_in_half_open_s: float = Field(0.0, ge=0)  # 0: half-open waits for its probes
    max_open_for_s: float = Field(300.0, gt=0)  # cap on an upstream's retry-after


class Transition(NamedTuple):
    from_state: BreakerState
    to_state: BreakerState


class Decision(NamedTuple):
    """The answer to a permission request (a permit when allowed) or a record."""

    allowed: bool
    state: BreakerState
    generation: int
    permit_id: int = 0  # > 0 only for a half-open probe
    retry_after_ms: int = 0  # when refused: the remaining open time
    transition: Transition | None = None
    local: bool = False  # issued by a replica-local fallback store


class BreakerSnapshot(NamedTuple):
    name: str
    state: BreakerState
    generation: int
    calls: int
    failed_calls: int
    slow_calls: int
    failure_rate: float | None  # percent; None ("unknown") below minimum_calls
    slow_call_rate: float | None
    not_permitted: int
    half_open_in_flight: int
    half_open_calls: int
    open_remaining_ms: int


# Outcomes to record: (breaker name, settings, permit, outcome, open-for seconds, how many
# equal outcomes: successes under one CLOSED permit are recorded as one call).
Record = tuple[str, BreakerSettings, Decision, Outcome, float, int]


class BreakerStore(Protocol):
    async def acquire(self, name: str, cfg: BreakerSettings, lease_s: float) -> Decision: ...

    async def record(
        self,
        name: str,
        cfg: BreakerSettings,
        permit: Decision,
        outcome: Outcome,
        open_for_s: float = 0.0,
    ) -> Decision: ...

    async def record_many(self, items: Sequence[Record]) -> list[Decision]: ...

    async def open_for(self, name: str, cfg: BreakerSettings, seconds: float) -> Decision: ...

    async def set_state(self, name: str, cfg: BreakerSettings, state: BreakerState) -> Decision: ...

    async def reset(self, name: str) -> None: ...

    async def snapshot(self, name: str, cfg: BreakerSettings) -> BreakerSnapshot: ...


# Failures that say nothing about the upstream's health when they come back
# as an answer: the client's own mistakes. 408 and 429 are the upstream's.
_UPSTREAM_FAULT_4XX = frozenset({408, 429})


def classify(exc: BaseException | None, duration_s: float, cfg: BreakerSettings) -> Outcome:
    """Map a call's result to the outcome the breaker records."""
    slow = duration_s > cfg.slow_call_duration_s
    if exc is None:
        return Outcome.SLOW_SUCCESS if slow else Outcome.SUCCESS
    if isinstance(exc, UpstreamError):
        status = exc.status_code
        if status >= 500 or status in _UPSTREAM_FAULT_4XX:
            return Outcome.SLOW_FAILURE if slow else Outcome.FAILURE
        # The upstream answered (a client 4xx): it is healthy.
        return Outcome.SLOW_SUCCESS if slow else Outcome.SUCCESS
    if isinstance(exc, TimeoutError | ConnectionError):
        return Outcome.SLOW_FAILURE if slow else Outcome.FAILURE
    # Cancellation (the client went away) and the gateway's own bugs say
    # nothing about the upstream.
    return Outcome.IGNORED


def open_error(name: str, decision: Decision) -> CircuitOpenError:
    """The 503 a refused call answers with; retry-after in whole seconds."""
    seconds = max(1, math.ceil(decision.retry_after_ms / 1000))
    return CircuitOpenError(
        f"The upstream '{name}' is unavailable (circuit {decision.state.name.lower()}); "
        f"retry in {seconds} s.",
        headers={"retry-after": str(seconds), "retry-after-ms": str(decision.retry_after_ms)},
    )


def _rate(part: int, calls: int, minimum: int) -> float | None:
    return None if calls < minimum or calls == 0 else part * 100.0 / calls


def effective_minimum(cfg: BreakerSettings) -> int:
    # A count window can never hold more calls than its size.
    if cfg.window_type == "COUNT_BASED":
        return min(cfg.minimum_calls, cfg.window_size)
    return cfg.minimum_calls


def trips(failed: int, slow: int, calls: int, cfg: BreakerSettings) -> bool:
    # Integer-friendly comparisons, identical in breaker_store.lua.
    return (
        failed * 100 >= cfg.failure_rate_threshold * calls
        or slow * 100 >= cfg.slow_call_rate_threshold * calls
    )


def ms(seconds: float) -> int:
    """Durations travel as whole milliseconds, so both stores compute the same."""
    return round(seconds * 1000)


def open_wait_ms(cfg: BreakerSettings, openings: int) -> int:
    wait = ms(cfg.wait_in_open_s)
    grown = wait * cfg.wait_multiplier ** max(0, openings - 1)
    return math.floor(min(grown, max(ms(cfg.max_wait_in_open_s), wait)))


class _Window:
    """COUNT_BASED ring of outcome codes, or TIME_BASED per-second buckets."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.size = size
        self.ring: list[Outcome | None] = [None] * size
        self.head = 0
        self.totals = [0, 0, 0]  # calls, failed, slow (COUNT_BASED)
        self.buckets: list[list[int]] = [[-1, 0, 0, 0] for _ in range(size)]  # sec, c, f, s

    def add(self, outcome: Outcome, now_ms: int) -> None:
        if self.kind == "COUNT_BASED":
            old = self.ring[self.head]
            if old is not None:
                self.totals[0] -= 1
                self.totals[1] -= int(old.failed)
                self.totals[2] -= int(old.slow)
            self.ring[self.head] = outcome
            self.head = (self.head + 1) % self.size
            self.totals[0] += 1
            self.totals[1] += int(outcome.failed)
            self.totals[2] += int(outcome.slow)
            return
        sec = now_ms // 1000
        bucket = self.buckets[sec % self.size]
        if bucket[0] != sec:
            bucket[:] = [sec, 0, 0, 0]
        bucket[1] += 1
        bucket[2] += int(outcome.failed)
        bucket[3] += int(outcome.slow)

    def counts(self, now_ms: int) -> tuple[int, int, int]:
        if self.kind == "COUNT_BASED":
            return self.totals[0], self.totals[1], self.totals[2]
        oldest = now_ms // 1000 - self.size
        live = [b for b in self.buckets if b[0] > oldest]
        return sum(b[1] for b in live), sum(b[2] for b in live), sum(b[3] for b in live)


class BreakerMachine:
    """One breaker's state; every method takes the current time in ms."""

    def __init__(self) -> None:
        self.state = BreakerState.CLOSED
        self.generation = 0
        self.openings = 0
        self.open_until_ms = 0
        self.half_open_since_ms = 0
        self.half_open = [0, 0, 0]  # calls, failed, slow recorded in this half-open
        self.leases: dict[int, int] = {}  # half-open permit id -> lease expiry ms
        self.next_permit = 0
        self.not_permitted = 0
        self.window: _Window | None = None

    def _window(self, cfg: BreakerSettings) -> _Window:
        # A reconfigured window starts empty rather than being misread.
        w = self.window
        if w is None or w.kind != cfg.window_type or w.size != cfg.window_size:
            w = self.window = _Window(cfg.window_type, cfg.window_size)
        return w

    def _to(
        self, state: BreakerState, cfg: BreakerSettings, now_ms: int, open_ms: int = 0
    ) -> Transition:
        old = self.state
        self.state = state
        self.generation += 1
        self.leases.clear()
        self.half_open = [0, 0, 0]
        if state in (BreakerState.CLOSED, BreakerState.METRICS_ONLY):
            self.window = None
        if state == BreakerState.CLOSED:
            self.openings = 0
        elif state == BreakerState.OPEN:
            if open_ms <= 0:
                self.openings += 1
                open_ms = open_wait_ms(cfg, self.openings)
            self.open_until_ms = now_ms + open_ms
        elif state == BreakerState.HALF_OPEN:
            self.half_open_since_ms = now_ms
        return Transition(old, state)

    def _decision(
        self,
        allowed: bool,
        permit_id: int = 0,
        retry_after_ms: int = 0,
        transition: Transition | None = None,
    ) -> Decision:
        return Decision(allowed, self.state, self.generation, permit_id, retry_after_ms, transition)

    def acquire(self, cfg: BreakerSettings, now_ms: int, lease_ms: int) -> Decision:
        moved: Transition | None = None
        if self.state == BreakerState.OPEN and now_ms >= self.open_until_ms:
            moved = self._to(BreakerState.HALF_OPEN, cfg, now_ms)
        if (
            self.state == BreakerState.HALF_OPEN
            and cfg.max_wait_in_half_open_s > 0
            and now_ms >= self.half_open_since_ms + ms(cfg.max_wait_in_half_open_s)
        ):
            moved = self._to(BreakerState.OPEN, cfg, now_ms)
        if self.state in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            self.not_permitted += 1
            remaining = (
                self.open_until_ms - now_ms
                if self.state == BreakerState.OPEN
                else ms(cfg.wait_in_open_s)
            )
            return self._decision(False, retry_after_ms=remaining, transition=moved)
        if self.state != BreakerState.HALF_OPEN:
            return self._decision(True, transition=moved)
        self.leases = {p: exp for p, exp in self.leases.items() if exp > now_ms}
        if self.half_open[0] + len(self.leases) >= cfg.permitted_calls_in_half_open:
            self.not_permitted += 1
            return self._decision(False, retry_after_ms=1000, transition=moved)
        self.next_permit += 1
        self.leases[self.next_permit] = now_ms + lease_ms
        return self._decision(True, permit_id=self.next_permit, transition=moved)

    def record(
        self,
        cfg: BreakerSettings,
        now_ms: int,
        permit: Decision,
        outcome: Outcome,
        open_for_ms: int = 0,
    ) -> Decision:
        current = permit.generation == self.generation
        if open_for_ms > 0:
            # The upstream's own retry-after is news whatever state we are in.
            if current:
                self.leases.pop(permit.permit_id, None)
            return self.open_for(cfg, now_ms, open_for_ms)
        if not current:
            return self._decision(False)  # the state moved on since the permit
        if self.state == BreakerState.HALF_OPEN:
            return self._record_half_open(cfg, now_ms, permit.permit_id, outcome)
        if outcome == Outcome.IGNORED or self.state not in (
            BreakerState.CLOSED,
            BreakerState.METRICS_ONLY,
        ):
            return self._decision(False)
        window = self._window(cfg)
        window.add(outcome, now_ms)
        calls, failed, slow = window.counts(now_ms)
        if (
            self.state == BreakerState.CLOSED
            and calls >= effective_minimum(cfg)
            and trips(failed, slow, calls, cfg)
        ):
            return self._decision(False, transition=self._to(BreakerState.OPEN, cfg, now_ms))
        return self._decision(False)

    def _record_half_open(
        self, cfg: BreakerSettings, now_ms: int, permit_id: int, outcome: Outcome
    ) -> Decision:
        if self.leases.pop(permit_id, None) is None or outcome == Outcome.IGNORED:
            return self._decision(False)  # an expired lease, or a permit given back
        counts = self.half_open
        counts[0] += 1
        counts[1] += int(outcome.failed)
        counts[2] += int(outcome.slow)
        if counts[0] < cfg.permitted_calls_in_half_open:
            return self._decision(False)
        reopen = trips(counts[1], counts[2], counts[0], cfg)
        target = BreakerState.OPEN if reopen else BreakerState.CLOSED
        return self._decision(False, transition=self._to(target, cfg, now_ms))

    def open_for(self, cfg: BreakerSettings, now_ms: int, duration_ms: int) -> Decision:
        """Open for an upstream-given duration (retry-after), never shortening an opening."""
        duration_ms = min(duration_ms, ms(cfg.max_open_for_s))
        if self.state in (
            BreakerState.FORCED_OPEN,
            BreakerState.DISABLED,
            BreakerState.METRICS_ONLY,
        ):
            return self._decision(False)
        if self.state == BreakerState.OPEN:
            self.open_until_ms = max(self.open_until_ms, now_ms + duration_ms)
            return self._decision(False, retry_after_ms=self.open_until_ms - now_ms)
        moved = self._to(BreakerState.OPEN, cfg, now_ms, open_ms=duration_ms)
        return self._decision(False, retry_after_ms=duration_ms, transition=moved)

    def set_state(self, cfg: BreakerSettings, now_ms: int, state: BreakerState) -> Decision:
        """Admin: force a state. CLOSED means closed with fresh metrics."""
        return self._decision(False, transition=self._to(state, cfg, now_ms))

    def snapshot(self, name: str, cfg: BreakerSettings, now_ms: int) -> BreakerSnapshot:
        calls, failed, slow = self._window(cfg).counts(now_ms)
        if self.state == BreakerState.HALF_OPEN:
            calls, failed, slow = self.half_open
        minimum = (
            cfg.permitted_calls_in_half_open
            if self.state == BreakerState.HALF_OPEN
            else effective_minimum(cfg)
        )
        in_flight = sum(1 for exp in self.leases.values() if exp > now_ms)
        remaining = self.open_until_ms - now_ms if self.state == BreakerState.OPEN else 0
        return BreakerSnapshot(
            name, self.state, self.generation, calls, failed, slow,
            _rate(failed, calls, minimum), _rate(slow, calls, minimum),
            self.not_permitted, in_flight, self.half_open[0], max(0, remaining),
        )  # fmt: skip
