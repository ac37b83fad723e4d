"""What the limiter decided, and how it reads on the wire: the
``x-ratelimit-*`` headers, and the 429 with ``retry-after`` on a rejection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from deployments.limiter_settings import format_window
from serve_app.errors import RateLimitError

Scope = Literal["key", "user", "tenant", "model"]
Dimension = Literal["requests", "tokens"]
# allowed / rejected: every enforced quota admits / one does not.
# shadow_rejected: admitted, but a shadow quota would have rejected it.
# unlimited: no quota applies; disabled: limits are off.
# fail_open / fail_closed: the store did not answer (admitted / 503).
Outcome = Literal[
    "allowed", "rejected", "shadow_rejected", "unlimited", "disabled", "fail_open", "fail_closed"
]
NEVER = -1  # a wait meaning "this request can never fit"
DIMENSIONS: tuple[Dimension, ...] = ("requests", "tokens")

_WINDOW_WORDS = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day", 604800.0: "week"}


@dataclass(frozen=True, slots=True)
class LimitHit:
    """One limit a request did not fit in."""

    scope: Scope
    name: str  # the key id, user, tenant or model
    dimension: Dimension
    window_s: float
    limit: int
    used: int
    shadow: bool

    @property
    def label(self) -> str:
        """Low-cardinality name for metrics, e.g. ``key:requests:1m``."""
        return f"{self.scope}:{self.dimension}:{format_window(self.window_s)}"

    def describe(self) -> str:
        per = _WINDOW_WORDS.get(self.window_s) or format_window(self.window_s)
        return f"{self.dimension} per {per} for {self.scope} {self.name!r}"


@dataclass(slots=True)
class WindowState:
    """One window of one quota, as the decision left it (read-only: not frozen
    only because a frozen init costs each request several microseconds)."""

    scope: Scope
    name: str
    window_us: int
    shadow: bool
    requests_limit: int | None
    tokens_limit: int | None
    requests_used: int  # this request included when `recorded`
    tokens_used: int
    recorded: bool
    reset_us: int  # until the oldest usage leaves the window (remaining next rises)
    requests_wait_us: int  # 0: fits; NEVER; else until enough usage has left
    tokens_wait_us: int
    log_key: str
    costs_key: str
    slice_us: int  # the log entry that holds this request (for settlement)
    resolution_us: int

    def limit(self, dimension: Dimension) -> int | None:
        return self.requests_limit if dimension == "requests" else self.tokens_limit

    def used(self, dimension: Dimension) -> int:
        return self.requests_used if dimension == "requests" else self.tokens_used

    def wait_us(self, dimension: Dimension) -> int:
        return self.requests_wait_us if dimension == "requests" else self.tokens_wait_us

    def hit(self, dimension: Dimension) -> LimitHit:
        return LimitHit(
            self.scope,
            self.name,
            dimension,
            self.window_us / 1e6,
            self.limit(dimension) or 0,
            self.used(dimension),
            self.shadow,
        )


@dataclass(slots=True)
class LimitDecision:
    allowed: bool
    outcome: Outcome
    reserved_tokens: int
    latency_s: float = 0.0  # the whole decision, store round trip included
    at_us: int = 0  # the store's clock when it decided
    windows: tuple[WindowState, ...] = ()
    hit: LimitHit | None = None  # the binding limit of a rejection (or first shadow hit)
    shadow_hits: tuple[LimitHit, ...] = ()
    retry_after_us: int | None = None  # rejected: when it would fit; NEVER
    settled: bool = False
    lease: Any = None  # the limiter_lease.Lease that admitted it, if one did
    # A leased admission carries its headers instead of window states.
    headers: dict[str, str] | None = None

    def error(self) -> RateLimitError:
        """The 429 a rejected decision answers with."""
        hit, wait = self.hit, self.retry_after_us
        if self.allowed or hit is None or wait is None:
            raise ValueError("only a rejected decision has an error")
        headers = rate_limit_headers(self)
        if wait == NEVER:
            need = 1 if hit.dimension == "requests" else self.reserved_tokens
            headers["x-should-retry"] = "false"
            message = (
                f"Request can never fit: it needs {need} {hit.dimension}, "
                f"over the limit of {hit.limit} {hit.describe()}."
            )
        else:
            headers["retry-after"] = str(-(-wait // 1_000_000))
            headers["retry-after-ms"] = str(-(-wait // 1000))
            message = (
                f"Rate limit reached: {hit.describe()} (limit {hit.limit}, used {hit.used}). "
                f"Try again in {format_reset(wait)}."
            )
        return RateLimitError(message, headers=headers)


def format_reset(us: int) -> str:
    """OpenAI's spelling of a duration: ``12ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    ms = -(-us // 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    whole, millis = divmod(ms, 1000)
    hours, whole = divmod(whole, 3600)
    minutes, whole = divmod(whole, 60)
    seconds = f"{whole}.{millis:03d}".rstrip("0") if millis else str(whole)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


Tightest = tuple[Dimension, int, int, int]  # dimension, limit, remaining, reset (us)


def tightest(windows: tuple[WindowState, ...]) -> list[Tightest]:
    """Per dimension, the enforced window with the least remaining (then the
    later reset): what the ``x-ratelimit-*`` headers show."""
    best_r: tuple[int, int, int] | None = None
    best_t: tuple[int, int, int] | None = None
    for window in windows:
        if window.shadow:
            continue
        if (limit := window.requests_limit) is not None:
            candidate = (max(0, limit - window.requests_used), -window.reset_us, limit)
            if best_r is None or candidate < best_r:
                best_r = candidate
        if (limit := window.tokens_limit) is not None:
            candidate = (max(0, limit - window.tokens_used), -window.reset_us, limit)
            if best_t is None or candidate < best_t:
                best_t = candidate
    out: list[Tightest] = []
    for dimension, best in (("requests", best_r), ("tokens", best_t)):
        if best is not None:
            remaining, minus_reset, limit = best
            out.append((dimension, limit, remaining, -minus_reset))
    return out


def headers_for(tight: list[Tightest]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for dimension, limit, remaining, reset_us in tight:
        headers[f"x-ratelimit-limit-{dimension}"] = str(limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(remaining)
        headers[f"x-ratelimit-reset-{dimension}"] = format_reset(reset_us)
    return headers


def rate_limit_headers(decision: LimitDecision) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` of the tightest
    enforced window per dimension (least remaining; then the later reset)."""
    if decision.headers is not None:
        return decision.headers
    return headers_for(tightest(decision.windows))
