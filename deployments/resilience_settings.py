"""Settings of the resilience stage: per-upstream breaker, bulkhead and retry
policies, and each public model's ordered fallback chain (``config.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.breaker import BreakerSettings
from deployments.bulkhead import BulkheadSettings
from deployments.retry import RetrySettings


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str
    model: str  # the upstream's own model name


class UpstreamPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    bulkhead: BulkheadSettings = Field(default_factory=BulkheadSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker_scope: Literal["upstream", "model"] = "model"  # one breaker per upstream, or per model


class ResilienceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: UpstreamPolicy = Field(default_factory=UpstreamPolicy)
    upstreams: dict[str, UpstreamPolicy] = Field(default_factory=dict)
    fallbacks: dict[str, list[Target]] = Field(default_factory=dict)  # public model -> chain
    key_prefix: str = "breaker"
    store_retry_after_s: float = Field(1.0, gt=0)  # re-try Redis this often while it is down
    # An open breaker cannot close before its wait ends (only an admin can), so a
    # replica may refuse from memory for this long without asking Redis again;
    # an admin's force-close reaches the other replicas within this delay.
    refusal_cache_s: float = Field(1.0, ge=0)
    # While a breaker is CLOSED a replica may reuse its last permit for this long
    # instead of asking Redis before every call (outcomes are still recorded; a
    # failure this replica records, or an OPEN it hears of, ends the reuse at once).
    # Other replicas' failures reach it within this delay. 0: ask every time.
    permit_cache_s: float = Field(0.25, ge=0)

    def policy(self, upstream: str) -> UpstreamPolicy:
        return self.upstreams.get(upstream, self.default)
