"""The limiter script's reply, read: the checks a request passes, and what an
acquire's reply says about each of their windows (``acquire()`` in
limiter_acquire.lua has the reply's layout)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from deployments.limiter_decision import (
    DIMENSIONS,
    NEVER,
    LimitDecision,
    LimitHit,
    Outcome,
    Scope,
    WindowState,
)
from deployments.limiter_settings import Quota


@dataclass(frozen=True, slots=True)
class Check:
    """One quota applied to one key/user/tenant/model."""

    scope: Scope
    name: str
    quota: Quota
    window_us: int
    resolution_us: int
    log_key: str
    costs_key: str
    spec: bytes  # as limiter_batch.lua reads it: window resolution limits shadow


def check_for(
    prefix: str, scope: Scope, name: str, ident: str, quota: Quota, precision: int
) -> Check:
    """The check of one quota applied to one key/user/tenant/model (``ident``
    names it in its keys): its two keys and its limits as the script reads them."""
    window_us = round(quota.window * 1_000_000)
    key = f"{prefix}:{scope}:{quote(ident, safe='')}:{window_us}" + (
        ":shadow" if quota.shadow else ""
    )
    resolution = max(1, window_us // precision)
    spec = b"%d %d %d %d %d" % (
        window_us,
        resolution,
        -1 if quota.requests is None else quota.requests,
        -1 if quota.tokens is None else quota.tokens,
        1 if quota.shadow else 0,
    )
    return Check(scope, name, quota, window_us, resolution, key + ":log", key + ":cost", spec)


def decision_from(checks: Sequence[Check], tokens: int, reply: list[int]) -> LimitDecision:
    now, enforced_ok, all_ok = reply[0], reply[1] == 1, reply[2] == 1
    windows = windows_from(checks, reply, 1, tokens)
    if all_ok:  # every window admits: no limit to name
        return LimitDecision(True, "allowed", tokens, 0.0, now, windows)
    return _judge(windows, tokens, now, enforced_ok)


def windows_from(
    checks: Sequence[Check], reply: list[int], requests: int, tokens: int
) -> tuple[WindowState, ...]:
    """Each window as an acquire's reply left it; a window that recorded the
    acquire counts its ``requests`` and ``tokens`` as used."""
    now, enforced_ok, all_ok = reply[0], reply[1] == 1, reply[2] == 1
    windows: list[WindowState] = []
    at = 3
    for check in checks:
        used_r, used_t, oldest, wait_r, wait_t = reply[at : at + 5]
        at += 5
        quota, window_us = check.quota, check.window_us
        recorded = enforced_ok and (all_ok or not quota.shadow)
        windows.append(
            WindowState(
                check.scope,
                check.name,
                window_us,
                quota.shadow,
                quota.requests,
                quota.tokens,
                used_r + requests if recorded else used_r,
                used_t + tokens if recorded else used_t,
                recorded,
                # a lease's usage is stamped ahead (limiter_lease.py)
                min(window_us, max(0, oldest + window_us - now)) if oldest >= 0 else 0,
                wait_r,
                wait_t,
                check.log_key,
                check.costs_key,
                now - now % check.resolution_us,
                check.resolution_us,
            )
        )
    return tuple(windows)


def _judge(
    windows: tuple[WindowState, ...], tokens: int, now: int, enforced_ok: bool
) -> LimitDecision:
    """Name the binding limit: the one whose wait is longest (a never-fit first)."""
    enforced: list[tuple[int, LimitHit]] = []
    shadow: list[LimitHit] = []
    for window in windows:
        for dimension in DIMENSIONS:
            wait = window.wait_us(dimension)
            if wait == 0:
                continue
            if window.shadow:
                shadow.append(window.hit(dimension))
            else:
                rank = 2**62 if wait == NEVER else wait
                enforced.append((rank, window.hit(dimension)))
    if not enforced_ok:
        rank, hit = max(enforced, key=lambda pair: pair[0])
        retry = NEVER if rank == 2**62 else rank
        return LimitDecision(
            False, "rejected", tokens, 0.0, now, windows, hit, tuple(shadow), retry
        )
    outcome: Outcome = "shadow_rejected" if shadow else "allowed"
    first = shadow[0] if shadow else None
    return LimitDecision(True, outcome, tokens, 0.0, now, windows, first, tuple(shadow))
