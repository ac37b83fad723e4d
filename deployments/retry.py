"""Which failed upstream calls may be tried again, and after how long.

An LLM call has no side effect upstream, but it is not free: a request that
timed out may still have been run (and billed), so timeouts are not retried on
the same target by default; the next target in the fallback chain is tried
instead. Connection failures, 5xx and 429 are retried with exponential backoff
and jitter, never past the request's deadline, and only before any byte of a
stream reached the client (the caller stops calling once it streams).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import (
    GatewayError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)


class RetrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(2, ge=1)  # calls to one target, the first included
    initial_backoff_s: float = Field(0.2, ge=0)
    multiplier: float = Field(2.0, ge=1)
    max_backoff_s: float = Field(2.0, ge=0)
    jitter: Literal["full", "equal", "none"] = "full"
    retry_on_timeout: bool = False  # a timed-out call may have run (and cost) upstream
    max_retry_after_s: float = Field(5.0, ge=0)  # a longer retry-after: move on instead
    # Retries to an upstream stay within this share of its first calls over budget_window_s,
    # plus budget_min_per_s (deployments/retry_budget.py; Finagle's defaults).
    budget_percent: float = Field(0.2, ge=0)
    budget_min_per_s: float = Field(10.0, ge=0)
    budget_window_s: float = Field(10.0, gt=0)


_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Upstream answers about the gateway's own configuration for that upstream
# (its key, its model name): another target may well serve the request.
_FALLBACK_4XX = frozenset({401, 403, 404, 408, 409, 429})


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The upstream's retry-after (``retry-after-ms``, seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _should_retry_header(exc: BaseException) -> bool | None:
    if not isinstance(exc, GatewayError):
        return None
    value = {k.lower(): v for k, v in exc.headers.items()}.get("x-should-retry")
    return None if value is None else value.strip().lower() == "true"


def should_fall_back(exc: BaseException) -> bool:
    """Whether the next target of a fallback chain may serve after ``exc``."""
    if isinstance(exc, ServiceUnavailableError):
        return True  # refused before reaching the upstream (breaker, bulkhead)
    if isinstance(exc, UpstreamError):
        return exc.status_code >= 500 or exc.status_code in _FALLBACK_4XX
    # Our own deadline cut the call, or the transport failed untranslated.
    return isinstance(exc, TimeoutError | ConnectionError)


# How upstreams say a request does not fit the model's context window: OpenAI and
# Azure (code ``context_length_exceeded``), vLLM and llama.cpp ("maximum context
# length"), others ("context window", "prompt is too long", "too many tokens").
_OVERFLOW_MARKERS = (
    b"context_length_exceeded",
    b"maximum context length",
    b"context window",
    b"context length",
    b"prompt is too long",
    b"too many tokens",
)


def context_overflow(exc: BaseException) -> bool:
    """Whether ``exc`` is an upstream refusing a request too long for its model."""
    if not isinstance(exc, UpstreamError) or exc.status_code not in (400, 413):
        return False
    text = (exc.upstream_body or str(exc).encode()).lower()
    return any(marker in text for marker in _OVERFLOW_MARKERS)


class RetryPolicy:
    """Decides retries on one target; the random source is injectable for tests."""

    def __init__(self, settings: RetrySettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()

    def retryable(self, exc: BaseException) -> bool:
        explicit = _should_retry_header(exc)
        if explicit is not None:
            return explicit
        if isinstance(exc, UpstreamTimeoutError | TimeoutError):
            return self.settings.retry_on_timeout
        if isinstance(exc, UpstreamUnreachableError | ConnectionError):
            return True
        return isinstance(exc, UpstreamError) and exc.status_code in _RETRYABLE_STATUS

    def backoff_s(self, retry_number: int) -> float:
        """The pause before retry ``retry_number`` (1 for the first retry)."""
        s = self.settings
        ceiling = min(s.max_backoff_s, s.initial_backoff_s * s.multiplier ** (retry_number - 1))
        if s.jitter == "full":
            return self._rng.uniform(0, ceiling)
        if s.jitter == "equal":
            return ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        return ceiling

    def delay_s(self, calls_made: int, exc: BaseException, remaining_s: float) -> float | None:
        """How long to wait before calling again after ``exc``; None: do not retry here."""
        if calls_made >= self.settings.max_attempts or not self.retryable(exc):
            return None
        delay = self.backoff_s(calls_made)
        asked = retry_after_s(exc.headers) if isinstance(exc, GatewayError) else None
        if asked is not None:
            if asked > self.settings.max_retry_after_s:
                return None
            delay = max(delay, asked)
        # A retry that could not finish before the deadline only wastes the upstream's time.
        return delay if delay < remaining_s else None
