"""Settings of the limiter stage: ``config.yaml``'s ``args.limits``.

A quota is one window with a request limit, a token limit or both. Each scope
(API key, end user, tenant, model) has a default list of quotas, applied to
every key/user/tenant/model separately, and per-name overrides that replace
the default list for that name (an empty list: unlimited)::

    limits:
      failure_mode: open
      per_key:
        default:
          - {window: 1m, requests: 60, tokens: 90000}
          - {window: 1d, requests: 10000}
        overrides:
          batch-jobs:
            - {window: 1h, tokens: 5000000, shadow: true}
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from deployments.concurrency import ConcurrencySettings

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([a-z]+)")
MAX_WINDOW_S = 366 * 86400.0


def parse_duration(value: object) -> float:
    """``"90s"``, ``"1h30m"``, ``"500ms"``, ``"1d"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"a window must be a duration such as '1m' or '90s', not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip().lower())
    else:
        raise ValueError(f"a window must be a duration such as '1m' or '90s', not {value!r}")
    if not math.isfinite(seconds) or seconds < 0.001:
        raise ValueError(f"a window must be at least 1ms, got {value!r}")
    if seconds > MAX_WINDOW_S:
        raise ValueError(f"a window must be at most 366d, got {value!r}")
    return seconds


def _parse_text(text: str) -> float:
    if not text:
        raise ValueError("a window must not be empty: use e.g. '1m', '90s', '1h30m'")
    position, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        number, unit = match.groups()
        if unit not in _UNIT_SECONDS:
            raise ValueError(
                f"unknown window unit {unit!r} in {text!r}: use one of ms, s, m, h, d, w"
            )
        total += float(number) * _UNIT_SECONDS[unit]
        position = match.end()
    if position != len(text):
        raise ValueError(
            f"cannot read window {text!r}: write a number and a unit (ms, s, m, h, d, w), "
            "e.g. '1m', '90s', '1h30m'"
        )
    return total


Duration = Annotated[float, BeforeValidator(parse_duration)]


def format_window(seconds: float) -> str:
    """The shortest exact spelling: 60.0 -> '1m', 5400.0 -> '1h30m', 0.25 -> '250ms'."""
    remaining_ms = round(seconds * 1000)
    parts: list[str] = []
    for unit in ("w", "d", "h", "m", "s", "ms"):
        size = round(_UNIT_SECONDS[unit] * 1000)
        count, remaining_ms = divmod(remaining_ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quota(_Strict):
    """Limits over one sliding window. ``shadow``: decide and report, never block."""

    window: Duration
    requests: int | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)
    shadow: bool = False

    @model_validator(mode="after")
    def _limits_something(self) -> Quota:
        if self.requests is None and self.tokens is None:
            raise ValueError(
                f"quota over {format_window(self.window)} sets neither requests nor tokens"
            )
        return self


def unique_windows(quotas: tuple[Quota, ...]) -> tuple[Quota, ...]:
    seen: set[tuple[float, bool]] = set()
    for quota in quotas:
        if (quota.window, quota.shadow) in seen:
            kind = "shadow quota" if quota.shadow else "quota"
            raise ValueError(f"more than one {kind} over window {format_window(quota.window)}")
        seen.add((quota.window, quota.shadow))
    return quotas


class ScopeQuotas(_Strict):
    default: tuple[Quota, ...] = ()
    overrides: dict[str, tuple[Quota, ...]] = Field(default_factory=dict)

    @field_validator("default")
    @classmethod
    def _check_default(cls, quotas: tuple[Quota, ...]) -> tuple[Quota, ...]:
        return unique_windows(quotas)

    @field_validator("overrides")
    @classmethod
    def _check_overrides(
        cls, overrides: dict[str, tuple[Quota, ...]]
    ) -> dict[str, tuple[Quota, ...]]:
        for name, quotas in overrides.items():
            try:
                unique_windows(quotas)
            except ValueError as exc:
                raise ValueError(f"override {name!r}: {exc}") from None
        return overrides

    def for_name(self, name: str) -> tuple[Quota, ...]:
        return self.overrides.get(name, self.default)

    @property
    def empty(self) -> bool:
        return not self.default and not any(self.overrides.values())


class LimiterSettings(_Strict):
    enabled: bool = True
    # open: admit when the store is unreachable; closed: answer 503.
    failure_mode: Literal["open", "closed"] = "open"
    # Completion tokens reserved when a chat request sets no max_tokens.
    default_max_tokens: int = Field(1024, ge=0)
    # At most this many log entries per window and name; a hit leaves its window
    # at most window/precision late (see deployments/limiter.py).
    precision: int = Field(100, ge=1, le=10_000)
    # A busy route far from its limits is decided from leases of at most this
    # many requests, each for at most lease_max_s (deployments/limiter_lease.py
    # states the accuracy cost); 0: every decision is one store round trip.
    lease_requests: int = Field(256, ge=0, le=10_000)
    lease_max_s: float = Field(1.0, gt=0, le=60)
    # Bound on one store round trip, connecting and retries included.
    store_timeout_s: float = Field(0.5, gt=0, le=10)
    # Every key shares this {hash tag}: one script touches all of them.
    key_prefix: str = Field("{rl}", pattern=r"^\{[^{}]+\}")
    per_key: ScopeQuotas = ScopeQuotas()
    per_user: ScopeQuotas = ScopeQuotas()
    per_tenant: ScopeQuotas = ScopeQuotas()
    per_model: ScopeQuotas = ScopeQuotas()
    # Requests in flight at once per key and tenant (deployments/concurrency.py).
    max_parallel: ConcurrencySettings = ConcurrencySettings()

    @property
    def limits_anything(self) -> bool:
        """Some quota may apply to some request: the limiter has work to do."""
        scopes = (self.per_key, self.per_user, self.per_tenant, self.per_model)
        return self.enabled and not all(scope.empty for scope in scopes)
