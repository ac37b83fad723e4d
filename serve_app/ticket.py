"""An admitted request's reservations (rate-limit tokens, budget), settled once.

Hits and coalesced followers keep their request slot but give their reserved
tokens back: they cost the upstream nothing. A failed call refunds both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.budget import Reservation
from deployments.concurrency import Slot
from deployments.cost import Charge, ServedBy
from deployments.limiter_decision import LimitDecision
from deployments.tasks import Background
from deployments.tokens import estimate_text_tokens, reported_total
from serve_app.context import RequestContext
from serve_app.errors import GatewayError
from serve_app.stages import Stages

log = logging.getLogger(__name__)
_BACKGROUND = Background(log, "background work")


def in_background(work: Coroutine[Any, Any, Any]) -> None:
    """Fire and forget (cache writes), finished at shutdown."""
    _BACKGROUND.spawn(work)


async def drain_background() -> None:
    """Wait for the fire-and-forget work still running: a replica shutting down
    finishes it rather than dropping it."""
    await _BACKGROUND.drain()


@dataclass
class Ticket:
    ctx: RequestContext
    stages: Stages
    decision: LimitDecision
    reservation: Reservation
    slot: Slot | None = None  # its place among the requests in flight, if limited
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    settled: bool = False
    handed_over: bool = False  # settled by work that outlives the request (``hand_over``)
    # Set once the upstream has answered: bills that answer if the request ends in an
    # error or a cancellation before its own billing (the call is paid for either way).
    answered: Callable[[], object] | None = None
    _renewal: asyncio.TimerHandle | None = None  # a stream's next slot and hold renewal
    touched: float | None = None  # when a stream last passed a chunk on (None: none yet)

    @classmethod
    async def admit(cls, ctx: RequestContext, stages: Stages) -> Ticket:
        """Take the request's quota, its place among the requests in flight and its budget
        hold. A client that leaves meanwhile (Serve cancels the request) does not stop
        the store's writes (the batches shield them): admission then runs to its end in
        the background and gives all of it back, as a failed request does."""
        parallel = stages.limiter.settings.max_parallel
        if not (
            stages.limiter.limits(ctx)
            or ctx.principal.max_parallel is not None
            or parallel.limits_anything
            or stages.cost.holds(ctx)
        ):
            return await cls._admit(ctx, stages)  # nothing to hold: no store, no task
        admitting = asyncio.ensure_future(cls._admit(ctx, stages))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            admitting.add_done_callback(_give_back)
            raise

    @classmethod
    async def _admit(cls, ctx: RequestContext, stages: Stages) -> Ticket:
        decision = await stages.limiter.acquire(ctx)  # raises 429 with its headers
        ctx.response_headers.update(stages.limiter.headers(decision))
        slot = None
        try:
            parallel = stages.limiter.settings.max_parallel
            if ctx.principal.max_parallel is not None or parallel.limits_anything:
                slot = await stages.concurrency.acquire(ctx, parallel)
            reservation = await stages.cost.admit(ctx)
        except GatewayError as exc:
            stages.limiter.settle_soon(decision, None)
            if slot is not None:
                in_background(stages.concurrency.release(slot))
            exc.headers = {**ctx.response_headers, **exc.headers}
            raise
        ticket = cls(ctx, stages, decision, reservation, slot)
        if ctx.stream and (slot is not None or reservation.budgets):
            ticket._keep_alive()
        return ticket

    def _keep_alive(self) -> None:
        """A stream runs as long as its chunks keep coming, past ``request_timeout_s``:
        its slot and budget hold are renewed while it does (at a third of the shorter
        of their lifetimes), so neither lapses under it as a dead replica's do. One
        that passed no chunk for a whole lifetime (longer than any upstream's
        ``read_timeout_s`` lets a live stream pause) is renewed no more: whatever holds
        it is stuck, and its slot and hold lapse as a dead replica's."""
        lives = [self.slot.lease_s] if self.slot is not None else []
        if self.reservation.budgets:
            lives.append(self.stages.cost.guard.settings.hold_ttl_s)
        every = min(lives) / 3
        self._renewal = asyncio.get_running_loop().call_later(every, self._renew, every)

    def touch(self) -> None:
        """A stream passed a chunk on: it still runs."""
        self.touched = time.monotonic()

    def _renew(self, every: float) -> None:
        # Before its first chunk a stream is bounded by its deadlines, not by this.
        stuck = self.touched is not None and time.monotonic() - self.touched > 3 * every
        if self.settled or stuck:
            self._renewal = None
            return
        if self.slot is not None:
            in_background(self.stages.concurrency.renew(self.slot))
        if self.reservation.budgets:
            in_background(self.stages.cost.guard.renew(self.reservation))
        self._renewal = asyncio.get_running_loop().call_later(every, self._renew, every)

    def finish(
        self,
        usage: Mapping[str, Any] | None,
        *,
        served_by: ServedBy,
        cache: str,
        upstream: str = "",
        upstream_model: str | None = None,
        attempts: int = 0,
        status: str = "ok",
        written: Callable[[], str] = str,
    ) -> Charge | None:
        """Bill the request. ``written`` gives what the answer wrote, asked for only
        when the usage reports no token count (the completion is then estimated)."""
        if self.settled:
            return None
        reported = reported_total(usage)
        completion_text = "" if reported is not None else written()  # before settling: may raise
        self.settled = True
        stages, ctx = self.stages, self.ctx
        tokens: int | None = 0
        if served_by == "upstream":
            tokens = reported
            if tokens is None:
                tokens = ctx.prompt_tokens_estimate + estimate_text_tokens(completion_text)
        self._settle_limits(tokens)
        try:
            charge = stages.cost.finish(
                ctx,
                self.reservation,
                usage,
                started_ms=self.started_ms,
                completion_text=completion_text,
                served_by=served_by,
                cache=cache,
                upstream=upstream,
                status=status,
                attempts=attempts,
                served_model=upstream_model,
            )
        except BaseException:
            stages.cost.release(self.reservation)  # settled now: abort() would not release it
            raise
        self._record(charge)
        return charge

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """Anything raised inside refunds the reservations and, for a client-facing
        error, carries the rate-limit headers every response has."""
        try:
            yield
        except BaseException as exc:
            if not self.handed_over:
                self.abort()
            if isinstance(exc, GatewayError):
                exc.headers = {**self.ctx.response_headers, **exc.headers}
            raise

    def hand_over(self) -> None:
        """The request is gone but work it started goes on: that work settles the
        ticket (``finish`` or ``fail``) when it ends, not the request's failure."""
        self.handed_over = True

    def abort(self) -> None:
        """The request ends in an error or a cancellation: an answer the upstream made
        is billed all the same (``answered``); anything else is given back."""
        if self.answered is None or self.settled:
            self.fail()
            return
        try:
            self.answered()
        except Exception:
            log.exception("billing an answered request failed: its reservations are released")
            self.fail()

    def fail(self) -> None:
        if self.settled:
            return
        self.settled = True
        self._settle_limits(None)
        self.stages.cost.release(self.reservation)

    def _settle_limits(self, tokens: int | None) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
        self.stages.limiter.settle_soon(self.decision, tokens)
        if self.slot is not None:
            in_background(self.stages.concurrency.release(self.slot))

    def _record(self, charge: Charge) -> None:
        sink, model = self.stages.metrics, self.ctx.model
        sink.inc(
            "gateway_spend_usd_total",
            float(charge.cost),
            {"model": model, "tenant": self.ctx.principal.tenant},
        )
        if charge.savings:
            sink.inc(
                "gateway_savings_usd_total",
                float(charge.savings),
                {"model": model, "served_by": charge.served_by},
            )
        usage = charge.usage
        sink.inc(
            "gateway_tokens_total", float(usage.prompt_tokens), {"model": model, "kind": "prompt"}
        )
        sink.inc(
            "gateway_tokens_total",
            float(usage.completion_tokens),
            {"model": model, "kind": "completion"},
        )


def _give_back(admitted: asyncio.Future[Ticket]) -> None:
    """The admission of a request whose client left has ended: undo what it took."""
    if not admitted.cancelled() and admitted.exception() is None:
        admitted.result().fail()
