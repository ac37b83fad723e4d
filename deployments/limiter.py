"""The limiter stage: request and token quotas per API key, end user, tenant
and model, over several sliding windows at once, exact across replicas.

Every applicable window, both dimensions, is checked and consumed in one Lua
script, so one Redis round trip, atomically: nothing is recorded unless every
enforced window admits (``limiter_acquire.lua``). Time is the Redis server's
clock (``TIME``), so replicas agree; tests inject a clock instead. The calls
of one replica share script runs (``limiter_batch.py``): acquires made in one
event-loop iteration go together, settlements ride along with them.

Algorithm: a sliding log per window, coarsened. A window of length W keeps
entries for slices of W/precision: an entry sums the requests and tokens of
the hits in its slice and is stamped with the time of the slice's latest hit.
It counts while that stamp is within W, so

* no interval of length W ever holds more admitted usage than the limit
  (exact, never over-admitting; a settlement that charges more than was
  reserved can push a window over, and it then rejects until it drains);
* a hit is released at most W/precision after the exact moment it leaves
  (only when a later hit shares its slice); hits in different slices are
  released exactly, e.g. with precision 100 a minute window releases each hit
  within 0.6 s of the exact time, a day window within 14.4 min;
* memory is at most ``precision`` entries per window per key/user/tenant/model,
  and a decision costs O(windows) plus the entries that expired since the
  last one (each entry is removed once).

Tokens are reserved before the call (prompt estimate + ``max_tokens`` or
``default_max_tokens``) and settled to the reported usage afterwards.

Far from its limits, a busy route (key, user, tenant, model) is decided from a
lease instead: a small share of each of its windows, taken in one script run
and spent locally (``limiter_lease.py``, which states what that costs in
accuracy: never over-admitting still holds). ``lease_requests: 0`` turns that off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import redis.asyncio as aioredis

from deployments.limiter_batch import LimiterBatch
from deployments.limiter_decision import (
    LimitDecision,
    Scope,
    WindowState,
    rate_limit_headers,
)
from deployments.limiter_lease import FIRST_REQUESTS, MIN_REQUESTS, Lease, lease_size, next_size
from deployments.limiter_reply import Check, check_for, decision_from, windows_from
from deployments.limiter_settings import LimiterSettings
from deployments.store_errors import STORE_ERRORS
from deployments.tasks import wait_all
from serve_app.context import RequestContext
from serve_app.errors import StoreUnavailableError

log = logging.getLogger(__name__)

PLAN_CACHE_SIZE = 10_000  # keys/users/tenants/models whose checks are kept ready
INCIDENT_QUIET_S = 5.0  # without a store failure for this long, an incident is over


class LimiterObserver(Protocol):
    """Where the ingress records metrics (the limiter creates none itself)."""

    def on_decision(self, decision: LimitDecision) -> None: ...

    def on_store_error(self, operation: str) -> None: ...

    def on_lease(self, granted: int, used: int) -> None:
        """A lease of ``granted`` requests ended having admitted ``used``."""


@dataclass(eq=False, slots=True)
class _Route:
    """The checks of one key/user/tenant/model combination, and its leases."""

    checks: tuple[Check, ...]
    shortest_us: int  # the smallest slice among its windows
    lease: Lease | None = None  # admitting now
    spare: Lease | None = None  # asked for ahead: admits once ``lease`` is spent
    asking: bool = False  # a lease is being asked for
    retired: bool = False  # limits changed since: a lease granted now goes back
    size: int = FIRST_REQUESTS  # requests the next lease asks for, by demand
    room: int = 0  # requests the next lease may hold, by the latest two store readings
    last_us: int = 0  # the store's clock at the latest reading
    last_windows: tuple[WindowState, ...] = ()  # usage as it read then


def _script() -> str:
    package = resources.files("deployments")
    parts = ("common", "settle", "acquire", "batch")
    return "".join(
        package.joinpath(f"limiter_{part}.lua").read_text(encoding="utf-8") for part in parts
    )


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        settings: LimiterSettings,
        clock: Callable[[], float] | None = None,
        observer: LimiterObserver | None = None,
    ) -> None:
        self._redis = redis
        self._clock = clock  # seconds; None = the Redis server's clock
        self._observer = observer
        self._batch = LimiterBatch(redis, _script(), now=self._now_arg)
        self.settings = settings
        self._active = settings.limits_anything
        self._plans: dict[tuple[Scope, str], tuple[Check, ...]] = {}
        self._routes: dict[tuple[Any, ...], _Route] = {}  # key, user, tenant, model, own quotas
        self._local = clock or time.monotonic  # seconds, for lease deadlines
        self._loop: asyncio.AbstractEventLoop | None = None  # where leases live
        self._leased: set[_Route] = set()  # routes holding a lease
        self._asking: set[asyncio.Task[None]] = set()
        self.leases = 0  # granted so far
        self.leased = 0  # requests admitted from a lease
        self.incident_active = False  # the store is failing right now
        self.incidents = 0  # separate outages seen (each logged once)
        self.store_errors = 0  # failed store calls in all
        self._last_failure = 0.0  # time.monotonic() of the latest failed call

    def reconfigure(self, settings: LimiterSettings) -> None:
        """New limits from the next decision on; usage recorded so far stays."""
        self.settings = settings
        self._active = settings.limits_anything
        self._plans = {}
        self._forget_routes()

    def reservation(self, ctx: RequestContext) -> int:
        """Tokens held for a request until it settles: its prompt estimate plus, unless
        it asks for embeddings, a rerank or a moderation (which write nothing), its
        max_tokens (or ``default_max_tokens``) for each completion it asks for."""
        completion = self.settings.default_max_tokens if ctx.max_tokens is None else ctx.max_tokens
        if ctx.route in ("embeddings", "rerank", "moderations"):
            completion = 0
        return max(0, ctx.prompt_tokens_estimate) + max(0, completion) * max(1, ctx.choices)

    def limits(self, ctx: RequestContext) -> bool:
        """Whether some quota may apply to the request (else its decision takes no store)."""
        return self._active or ctx.principal.quotas is not None

    async def acquire(self, ctx: RequestContext) -> LimitDecision:
        """Decide and record; raise ``RateLimitError`` (429) on a rejection and
        ``StoreUnavailableError`` (503) when the store fails and failure_mode is closed."""
        decision = await self.evaluate(ctx)
        if not decision.allowed:
            raise decision.error()
        return decision

    async def evaluate(self, ctx: RequestContext) -> LimitDecision:
        """As ``acquire``, but a rejection is returned, not raised (a store
        failure with failure_mode closed still raises ``StoreUnavailableError``)."""
        settings, tokens = self.settings, self.reservation(ctx)
        if not self.limits(ctx):  # no quota anywhere
            return LimitDecision(True, "unlimited" if settings.enabled else "disabled", tokens)
        started = time.perf_counter()
        route = self._route(ctx, settings)
        if (lease := route.lease) is not None:
            if (leased := self._from_lease(route, lease, tokens)) is not None:
                return self._observed(leased, started)
        if not route.checks:  # quotas exist, but none for this key/user/tenant/model
            decision = LimitDecision(True, "unlimited", tokens)
        else:
            try:
                decision = await self._decide(route.checks, tokens, settings.store_timeout_s)
            except STORE_ERRORS as exc:
                self._store_failed("acquire", exc)
                closed = settings.failure_mode == "closed"
                decision = LimitDecision(not closed, "fail_closed" if closed else "fail_open", 0)
            else:
                if (lease := route.lease) is not None:  # granted while this call was out
                    decision = self._beside_lease(lease, route.spare, decision, tokens)
                if decision.outcome == "allowed" and decision.lease is None:
                    self._read(route, decision.at_us, decision.windows, tokens)
                    self._ask_ahead(route, tokens)
        return self._observed(decision, started)

    def _from_lease(self, route: _Route, lease: Lease, tokens: int) -> LimitDecision | None:
        now = self._local()
        if (leased := lease.take(tokens, now)) is None:
            self._end(route, lease)  # spent, ended, or too small: the spare takes over
            if (lease := route.lease) is None or (leased := lease.take(tokens, now)) is None:
                return None
        self.leased += 1
        if lease.requests * 4 <= lease.granted:  # mostly spent: the next one is asked now
            self._ask_ahead(route, tokens)
        return leased

    def _beside_lease(
        self, lease: Lease, spare: Lease | None, decision: LimitDecision, tokens: int
    ) -> LimitDecision:
        """An exact decision made while the route holds a lease: the store counts
        the leases' unused parts as used, the route does not; a rejection the
        lease can cover is admitted from it."""
        if not decision.allowed and (leased := lease.take(tokens, self._local())) is not None:
            self.leased += 1
            return leased
        decision.windows = lease.rebase(decision.windows, spare)
        return decision

    def _observed(self, decision: LimitDecision, started: float) -> LimitDecision:
        decision.latency_s = time.perf_counter() - started
        if self._observer is not None:
            self._observer.on_decision(decision)
        if decision.outcome == "fail_closed":
            raise StoreUnavailableError("The rate-limit store is unavailable; try again shortly.")
        return decision

    async def settle(self, decision: LimitDecision, actual_total_tokens: int | None) -> None:
        """Settle the token reservation to the real usage: ``None`` (an upstream
        error, no usage reported) refunds it all. Once per decision; never raises
        for a store failure (the answer has gone out already)."""
        if (work := self._settlement(decision, actual_total_tokens)) is None:
            return
        try:
            await self._batch.settle(*work, self.settings.store_timeout_s)
        except STORE_ERRORS as exc:
            self._store_failed("settle", exc)
            return
        self._store_ok()

    def settle_soon(self, decision: LimitDecision, actual_total_tokens: int | None) -> None:
        """``settle`` without waiting for it: queued for the next script run, no
        task of its own; ``drain`` waits for what is queued."""
        if (work := self._settlement(decision, actual_total_tokens)) is not None:
            self._batch.settle_soon(*work, self.settings.store_timeout_s, self._settled)

    async def drain(self) -> None:
        """Give every lease back and wait for the queued settlements (call at
        replica shutdown)."""
        await wait_all(self._asking)
        for route in list(self._leased):
            self._end_all(route)
        await self._batch.drain()

    def _settlement(
        self, decision: LimitDecision, actual_total_tokens: int | None
    ) -> tuple[list[WindowState], int] | None:
        if decision.settled or not decision.allowed:
            return None
        decision.settled = True
        delta = (actual_total_tokens or 0) - decision.reserved_tokens
        if delta == 0:
            return None
        if (lease := decision.lease) is None:
            windows = [w for w in decision.windows if w.recorded]
        elif lease.absorb(delta):
            return None
        else:  # the lease has ended: its entries hold the reservation
            windows = list(lease.entries)
        if not windows:
            return None
        return windows, delta

    def _settled(self, future: asyncio.Future[object]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._store_ok()
        elif isinstance(exc, STORE_ERRORS):
            self._store_failed("settle", exc)
        else:
            log.error("rate-limit settlement failed", exc_info=exc)

    def headers(self, decision: LimitDecision) -> dict[str, str]:
        return rate_limit_headers(decision)

    def _route(self, ctx: RequestContext, settings: LimiterSettings) -> _Route:
        tenant, own = ctx.principal.tenant, ctx.principal.quotas
        ident = (ctx.principal.key_id, ctx.user, tenant, ctx.model, own)
        route = self._routes.get(ident)
        if route is not None:
            return route
        if len(self._routes) >= PLAN_CACHE_SIZE:
            self._forget_routes()
        named: list[tuple[Scope, str | None, str]] = [
            ("key", ctx.principal.key_id, ctx.principal.key_id),
            # End users are named by the client, so one tenant's "alice" is not another's.
            ("user", ctx.user, f"{tenant}/{ctx.user}"),
            ("tenant", tenant, tenant),
            ("model", ctx.model, ctx.model),
        ]
        checks: list[Check] = []
        for scope, name, id_ in named:
            if name is None:
                continue
            if scope == "key" and own is not None:  # a run-time key's own: its route holds them
                prefix, precision = settings.key_prefix, settings.precision
                checks += [check_for(prefix, scope, name, id_, q, precision) for q in own]
            else:
                checks += self._plan(settings, scope, name, id_)
        shortest = min((check.resolution_us for check in checks), default=0)
        route = self._routes[ident] = _Route(tuple(checks), shortest)
        return route

    def _forget_routes(self) -> None:
        """Drop every route; their leases go back (from any thread: Serve may call
        ``reconfigure`` off the event loop)."""
        routes, self._routes = self._routes, {}
        for route in routes.values():
            route.retired = True  # a lease still being asked for goes back when granted
        for route in list(self._leased):
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._end_all, route)

    def _read(
        self, route: _Route, at_us: int, windows: tuple[WindowState, ...], tokens: int
    ) -> None:
        """A store reading of the route's usage (an exact admission, or a lease
        grant): with the one before, how big the next lease may be (``room``)."""
        before, elapsed = route.last_windows, at_us - route.last_us
        if elapsed == 0:  # the same script run: no pace to read
            return
        route.last_us, route.last_windows = at_us, windows
        settings = self.settings
        if not before or elapsed >= route.shortest_us or settings.lease_requests < MIN_REQUESTS:
            route.room = 0  # no steady traffic (or leases are off)
            return
        lifetime = min(round(settings.lease_max_s * 1_000_000), route.shortest_us)
        route.room = lease_size(windows, before, elapsed, lifetime, tokens, settings.lease_requests)

    def _ask_ahead(self, route: _Route, tokens: int) -> None:
        """Ask for the route's next lease, unless one is on its way or waiting."""
        size = min(route.size, route.room)
        if size < MIN_REQUESTS or route.asking or route.spare is not None or route.retired:
            return
        route.asking = True
        self._loop = loop = asyncio.get_running_loop()
        task = loop.create_task(self._ask_lease(route, size, tokens))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask_lease(self, route: _Route, size: int, tokens: int) -> None:
        settings = self.settings
        started = self._local()
        for_us = round(settings.lease_max_s * 1_000_000)
        try:
            reply = await self._batch.acquire(
                route.checks, size * tokens, settings.store_timeout_s, (size, for_us)
            )
        except STORE_ERRORS as exc:
            self._store_failed("lease", exc)
            return
        finally:
            route.asking = False
        self._store_ok()
        values = [int(value) for value in reply]
        if values[2] != 1:  # it no longer fits: the route stays exact
            route.room = 0
            return
        now, until = values[0], values[-1]
        self._read(route, now, windows_from(route.checks, values, size, size * tokens), tokens)
        entries = windows_from(route.checks, values, 0, 0)
        lease = Lease(entries, size, size * tokens, now, started, started + (until - now) / 1e6)
        self.leases += 1
        lease.timer = asyncio.get_running_loop().call_later(
            (until - now) / 1e6, self._end, route, lease
        )
        if route.lease is None:
            route.lease = lease
        else:
            route.spare = lease
        self._leased.add(route)
        if route.retired:
            self._end_all(route)

    def _end_all(self, route: _Route) -> None:
        for lease in (route.spare, route.lease):
            if lease is not None:
                self._end(route, lease)

    def _end(self, route: _Route, lease: Lease) -> None:
        """End one of the route's leases: a spare takes over from the lease, and
        what the lease did not admit goes back to its windows (or on in the
        spare, when both are in the same slice)."""
        if route.lease is lease:
            route.lease, route.spare = route.spare, None
        elif route.spare is lease:
            route.spare = None
        else:
            return  # ended already
        if route.lease is None:
            self._leased.discard(route)
        lease.ended = True
        if lease.timer is not None:
            lease.timer.cancel()
        most = self.settings.lease_requests
        route.size = next_size(route.size, lease.granted, lease.requests, most)
        if self._observer is not None:
            self._observer.on_lease(lease.granted, lease.granted - lease.requests)
        if route.lease is not None and route.lease.inherit(lease):
            return  # what it left goes on in the lease that took over
        if lease.requests or lease.tokens:
            self._batch.settle_soon(
                lease.entries,
                -lease.tokens,
                self.settings.store_timeout_s,
                self._settled,
                requests=-lease.requests,
            )

    def _plan(
        self, settings: LimiterSettings, scope: Scope, name: str, ident: str
    ) -> tuple[Check, ...]:
        """The checks of one key/user/tenant/model, kept until the next reconfigure."""
        plan = self._plans.get((scope, ident))
        if plan is not None:
            return plan
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.clear()
        quotas = getattr(settings, f"per_{scope}").for_name(name)
        checks = [
            check_for(settings.key_prefix, scope, name, ident, quota, settings.precision)
            for quota in quotas
        ]
        plan = self._plans[(scope, ident)] = tuple(checks)
        return plan

    async def check(self, checks: tuple[Check, ...], tokens: int) -> LimitDecision:
        """Decide ``checks`` of the caller's own (not a key/user/tenant/model route's)
        in the same atomic script run as every other decision; store errors raise.
        The decision settles like any other (``settle_soon``)."""
        return await self._decide(checks, tokens, self.settings.store_timeout_s)

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(round(self._clock() * 1_000_000))

    async def _decide(
        self, checks: tuple[Check, ...], tokens: int, timeout_s: float
    ) -> LimitDecision:
        reply = await self._batch.acquire(checks, tokens, timeout_s)
        self._store_ok()
        return decision_from(checks, tokens, [int(value) for value in reply])

    def _store_failed(self, operation: str, exc: BaseException) -> None:
        self.store_errors += 1
        self._last_failure = time.monotonic()
        if not self.incident_active:
            self.incident_active = True
            self.incidents += 1
            log.warning(
                "rate-limit store failed (%s: %r); failing %s until it answers again",
                operation,
                exc,
                self.settings.failure_mode,
            )
        if self._observer is not None:
            self._observer.on_store_error(operation)

    def _store_ok(self) -> None:
        # Calls in flight when the store fails finish in any order: an incident
        # ends only once the store has answered with no failure for a while, so
        # a flapping store is still one incident and one log line.
        if self.incident_active and time.monotonic() - self._last_failure >= INCIDENT_QUIET_S:
            self.incident_active = False
            log.warning(
                "rate-limit store answers again (%d failed calls so far)", self.store_errors
            )
