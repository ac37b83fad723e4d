"""Requests and tokens per minute for one upstream target of a balanced model, as
LiteLLM's router keeps a deployment's ``rpm``/``tpm``: the provider's own quota
for that deployment (an Azure deployment's TPM, an organisation's RPM), kept
cluster-wide so the gateway moves calls to the group's other targets before the
provider answers 429.

Each call of a target with limits takes one request and the request's token
reservation from a one-minute sliding window (the limiter's atomic script, so
every replica shares it), and gives back what the call did not use once its
usage is known (an upstream error gives back all its tokens; the request still
counts: the provider saw it). A target at its limit is passed over like a target
whose breaker is open; when every target is, the request gets a 429 with the
soonest ``retry-after``. A store failure admits the call: these limits protect
the provider's quota, which answers for itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from deployments.limiter import RateLimiter
from deployments.limiter_decision import LimitDecision
from deployments.limiter_reply import Check, check_for
from deployments.limiter_settings import Quota
from deployments.resilience_settings import BalanceGroup, Target
from deployments.store_errors import STORE_ERRORS
from serve_app.errors import RateLimitError

log = logging.getLogger(__name__)
WINDOW_S = 60.0


class TargetLimitedError(RateLimitError):
    """A target at its rpm/tpm: the next target is tried (not an upstream answer)."""


class TargetLimits:
    def __init__(self, limiter: RateLimiter, balance: Mapping[str, BalanceGroup]) -> None:
        self._limiter = limiter
        settings = limiter.settings
        self._checks: dict[tuple[str, str], tuple[Check, ...]] = {}
        for group in balance.values():
            for target in group.targets:
                if target.rpm is None and target.tpm is None:
                    continue
                quota = Quota(window=WINDOW_S, requests=target.rpm, tokens=target.tpm)
                name = f"{target.upstream}/{target.model}"
                check = check_for(
                    settings.key_prefix, "model", name, f"target:{name}", quota, settings.precision
                )
                self._checks[(target.upstream, target.model)] = (check,)

    def __bool__(self) -> bool:
        return bool(self._checks)

    async def admit(self, target: Target, tokens: int) -> LimitDecision | None:
        """A call's share of the target's minute (None: the target has no limits, or
        the store could not be asked); ``TargetLimitedError`` when it does not fit."""
        checks = self._checks.get((target.upstream, target.model))
        if checks is None:
            return None
        try:
            decision = await self._limiter.check(checks, tokens)
        except STORE_ERRORS:
            log.warning("target limits: the store failed; %s admitted", checks[0].name)
            return None
        if decision.allowed:
            return decision
        refusal, hit = decision.error(), decision.hit
        assert hit is not None  # a rejection names its limit
        raise TargetLimitedError(
            f"The upstream target {checks[0].name} is at its limit of {hit.limit}"
            f" {hit.dimension} per minute.",
            headers={k: v for k, v in refusal.headers.items() if k.startswith("retry-after")},
        )

    def settle(self, decision: LimitDecision | None, total_tokens: int | None) -> None:
        """The call's real usage (None: none reported, every reserved token back)."""
        if decision is not None:
            self._limiter.settle_soon(decision, total_tokens)


__all__ = ["TargetLimitedError", "TargetLimits"]
