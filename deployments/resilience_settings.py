"""Settings of the resilience stage: per-upstream breaker, bulkhead and retry
policies, each public model's ordered fallback chain, and the groups of
interchangeable targets a model's calls are balanced over (``config.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.breaker import BreakerSettings
from deployments.bulkhead import BulkheadSettings
from deployments.retry import RetrySettings


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str
    model: str  # the upstream's own model name

    @property
    def breaker_model(self) -> str:
        """The model name its breaker goes by (``breaker_scope: model``)."""
        return self.model


class SharedBreakerTarget(Target):
    """A target whose breaker goes by another name than its model: a wildcard's matches
    share the wildcard's (one deployment, as LiteLLM cools one down), since clients
    choose them. Not a config type: only the request path makes one."""

    shared_breaker: str

    @property
    def breaker_model(self) -> str:
        return self.shared_breaker


class WeightedTarget(Target):
    weight: float = Field(1.0, gt=0)  # a share of the calls, or of the capacity (least-busy)
    # The provider's quota for this target, kept cluster-wide (deployments/target_limits.py).
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


class BalanceGroup(BaseModel):
    """Targets that serve one public model interchangeably, and how a call picks one.

    ``weighted``: at random, in proportion to the weights. ``least-busy``: the fewest
    calls from this replica that picked the target and have not ended (streams
    included), per unit of weight.
    ``lowest-latency``: the fastest recent calls from this replica (an average over
    successes, a stream's up to its first chunk); targets within ``latency_buffer``
    of the fastest share the calls by weight, a target not measured within
    ``latency_ttl_s`` (or whose last call failed that long ago) is tried first again.
    ``lowest-cost``: the target whose model has the lowest price (input plus output
    rate, from ``cost.pricing``) first, LiteLLM's cost-based routing; targets at one
    price share the calls by weight, and targets with no price come after priced ones.
    Whatever is picked, the group's other targets follow it in the request's chain,
    then the model's fallbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["weighted", "least-busy", "lowest-latency", "lowest-cost"] = "weighted"
    targets: list[WeightedTarget] = Field(min_length=1)
    latency_buffer: float = Field(0.1, ge=0)
    latency_ttl_s: float = Field(60.0, gt=0)

    @field_validator("targets")
    @classmethod
    def _distinct(cls, targets: list[WeightedTarget]) -> list[WeightedTarget]:
        seen = [(t.upstream, t.model) for t in targets]
        if len(set(seen)) != len(seen):
            raise ValueError("a balance group lists the same upstream and model twice")
        return targets


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
    balance: dict[str, BalanceGroup] = Field(default_factory=dict)  # public model -> group
    # public model -> the targets that take over when a request overflows its context window
    context_fallbacks: dict[str, list[Target]] = Field(default_factory=dict)
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
