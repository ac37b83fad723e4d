"""Leases: a replica takes a small share of every window of a route (key, user,
tenant, model) in one store call and admits requests from it locally, with no
round trip, until the share is spent or the lease ends. A request's token
settlement goes into the lease it came from; the next lease is asked for when
the current one is three-quarters spent and waits as a spare; what a lease
leaves goes back to the store when it ends, or on in the spare when both are
recorded in the same slice. Leases follow demand: 8 requests at first, twice
as many each time one runs out, half when one ends mostly unused, at most
``lease_requests``.

Only where that cannot change a decision much: a lease is granted only while
the route has steady traffic (two store readings - exact admissions or lease
grants - at different times within one slice of its shortest window), only
while it keeps every window, shadow ones included, at most half full - the
script checks that atomically - even if the route's usage (all replicas')
keeps growing at the pace seen between those two readings for the lease's
lifetime, and a lease holds at most 1/32 of any limit. Limits under 64
requests (or tokens for 64 requests) a window, the second half of every
window, and a burst out of quiet are therefore decided one request at a time.

What it costs in accuracy (deployments/limiter.py has the exact algorithm):

* never over-admitting still holds: a lease is recorded in full in every
  window before its first request, atomically, in the current slice's entry,
  stamped when the lease ends (at most ``lease_max_s`` after it starts and
  never past the end of that slice), so it leaves each window no earlier than
  any request it admitted;
* under-admission, while leases are live: their unused part counts as used
  for other replicas; a lease holds at most 1/32 of a limit and a route at
  most two (the spare is asked for once the current lease is three-quarters
  spent), so under 1/25 of a limit per replica and route, until the lease
  ends (<= ``lease_max_s``, and <= one slice of the shortest window: 0.6 s for
  a minute window at precision 100) and its unused part is given back
  (``limiter_settle.lua``). Routes that share a window (the users of one
  tenant, say) each hold their own; however many there are, leases never take
  a window past half its limit;
* a live lease keeps admitting while the store is down, fail-closed or not:
  it is usage the store has recorded already (for at most its lifetime);
  a lease the store cannot take back keeps counting its unused part until
  that leaves the window;
* headers of a leased admission show the windows as the lease found them plus
  what this replica has admitted from it since (other replicas' usage in the
  meantime is not seen, for at most the lease's lifetime).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from deployments.limiter_decision import (
    LimitDecision,
    Tightest,
    WindowState,
    headers_for,
    tightest,
)

SHARE = 32  # a lease holds at most 1/SHARE of any limit of its route
MIN_REQUESTS = 2  # a smaller lease saves nothing over the exact decision it rides on
FIRST_REQUESTS = 8  # a route's first lease; then it follows demand


def lease_size(
    windows: Sequence[WindowState],
    before: Sequence[WindowState],
    elapsed_us: int,
    lifetime_us: int,
    tokens: int,
    wanted: int,
) -> int:
    """Requests a lease may hold, each reserving ``tokens`` (0: none), after a
    decision that left ``windows`` ``elapsed_us`` after one that left ``before``:
    the route's usage, all replicas', growing at that pace for the lease's
    ``lifetime_us``, must leave room for it in the lower half of every window."""
    size = wanted
    for now, then in zip(windows, before, strict=True):
        for limit, used, was, per in (
            (now.requests_limit, now.requests_used, then.requests_used, 1),
            (now.tokens_limit, now.tokens_used, then.tokens_used, tokens),
        ):
            if limit is None or per == 0:
                continue
            coming = max(0, used - was) * lifetime_us // elapsed_us
            room = min(limit // SHARE, limit // 2 - used - coming)
            size = min(size, room // per)
    return size if size >= MIN_REQUESTS else 0


def next_size(size: int, granted: int, left: int, most: int) -> int:
    """The route's next lease, after one of ``granted`` requests ended with ``left``
    unused: twice as big when it ran out, half when it was mostly left over."""
    if left == 0:
        return min(most, max(size, granted) * 2)
    if left * 4 > granted * 3:
        return max(MIN_REQUESTS, size // 2)
    return size


@dataclass(slots=True)
class Lease:
    """A granted share: ``requests`` and ``tokens`` still to admit, until the
    local clock reads ``deadline`` (the store's ``until`` mapped onto it, early
    rather than late)."""

    entries: tuple[WindowState, ...]  # where the lease is recorded (given back there)
    requests: int
    tokens: int
    at_us: int  # the store's clock when it granted the lease
    started: float  # the local clock before the lease was asked for
    deadline: float
    granted: int = field(init=False)
    # The tightest windows' admitted usage as last seen (unused leases not
    # counted), and what the lease admitted since: the headers it answers with.
    _tight: list[Tightest] = field(init=False)
    since_requests: int = 0
    since_tokens: int = 0
    ended: bool = False  # given back: settlements go to the store
    timer: asyncio.TimerHandle | None = None  # ends it on time

    def __post_init__(self) -> None:
        self.granted = self.requests
        self._tight = tightest(self.entries)

    def rebase(
        self, windows: tuple[WindowState, ...], spare: Lease | None = None
    ) -> tuple[WindowState, ...]:
        """Windows an exact decision read from the store, which counts this
        lease (and the route's spare) in full: returned, and the lease's headers
        based on them, with their unused parts not counted as used."""
        requests, tokens = self.requests, self.tokens
        if spare is not None:
            requests, tokens = requests + spare.requests, tokens + spare.tokens
        windows = tuple(
            replace(w, requests_used=w.requests_used - requests, tokens_used=w.tokens_used - tokens)
            for w in windows
        )
        self._tight = tightest(windows)
        self.since_requests = self.since_tokens = 0
        return windows

    def inherit(self, ended: Lease) -> bool:
        """Take over what an ended lease left, if both are recorded in the same
        entries (one slice): nothing then goes back to the store. True if so."""
        for mine, theirs in zip(self.entries, ended.entries, strict=True):
            if mine.slice_us != theirs.slice_us or mine.log_key != theirs.log_key:
                return False
        self.requests += ended.requests
        self.tokens += ended.tokens
        self.granted += ended.requests
        # This lease's windows counted the ended one in full as used.
        self._tight = [
            (dim, limit, remaining + (ended.requests if dim == "requests" else ended.tokens), reset)
            for dim, limit, remaining, reset in self._tight
        ]
        ended.requests = ended.tokens = 0
        return True

    def absorb(self, delta: int) -> bool:
        """Settle a request it admitted within the lease: a refund goes back into
        it, a charge comes out of it if it can; False when the store must."""
        if self.ended or delta > self.tokens:
            return False
        self.tokens -= delta
        self.since_tokens += delta
        return True

    def take(self, tokens: int, now: float) -> LimitDecision | None:
        """Admit one request reserving ``tokens`` from the lease, or None when the
        lease has ended or cannot cover it. Its headers are the tightest windows
        less what the lease admitted since (every window loses the same, so the
        tightest stays the tightest)."""
        if self.requests < 1 or tokens > self.tokens or now >= self.deadline:
            return None
        self.requests -= 1
        self.tokens -= tokens
        self.since_requests += 1
        self.since_tokens += tokens
        elapsed_us = round((now - self.started) * 1_000_000)
        spent = {"requests": self.since_requests, "tokens": self.since_tokens}
        now_tight: list[Tightest] = [
            (dimension, limit, max(0, remaining - spent[dimension]), max(0, reset - elapsed_us))
            for dimension, limit, remaining, reset in self._tight
        ]
        decision = LimitDecision(True, "allowed", tokens, 0.0, self.at_us + elapsed_us)
        decision.lease, decision.headers = self, headers_for(now_tight)
        return decision
