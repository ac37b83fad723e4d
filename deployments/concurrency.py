"""Requests in flight at once per key or tenant, across every replica (LiteLLM's
``max_parallel_requests``): a client that opens a hundred streams at once waits
for its own, instead of holding the upstream's connections for everyone.

Each limited key and tenant has a sorted set in Redis of the request ids in
flight, scored by when their slot lapses. One script run drops lapsed slots,
checks every applicable limit and, only if all have room, takes a slot in each;
the request gives them back when it settles (answered, failed, or its stream
ended). A slot lapses on its own ``lease_s`` after it was taken (by default the
request deadline plus a minute), so a replica that dies does not hold its slots
for ever. A store failure admits the request, as the rate
limiter's ``failure_mode: open`` does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from deployments.store_errors import STORE_ERRORS
from serve_app.context import RequestContext
from serve_app.errors import RateLimitError

log = logging.getLogger(__name__)
PREFIX = "gw:{parallel}"  # one hash tag: a request's sets are in one Cluster slot

# KEYS: the sets; ARGV: now ms, lapse ms, request id, then one limit per set.
# Returns 0 when every set had room (a slot is taken in each), else the 1-based
# index of the first set that is full.
_ACQUIRE = """
local now, lapse, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, lapse, id)
  redis.call('PEXPIREAT', key, lapse)
end
return 0
"""
_RELEASE = """
for _, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[1]) end
return 0
"""
# KEYS: the sets; ARGV: the new lapse ms, request id. A slot still held lapses then,
# and its set no sooner; one given back (or lapsed) is not taken again.
_RENEW = """
local lapse, id = tonumber(ARGV[1]), ARGV[2]
for _, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, id) then
    redis.call('ZADD', key, lapse, id)
    redis.call('PEXPIREAT', key, lapse, 'GT')
  end
end
return 0
"""


class ParallelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: int | None = Field(None, ge=1)  # none: unlimited
    overrides: dict[str, int | None] = Field(default_factory=dict)

    def for_name(self, name: str) -> int | None:
        return self.overrides[name] if name in self.overrides else self.default


class ConcurrencySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_key: ParallelLimits = ParallelLimits()
    per_tenant: ParallelLimits = ParallelLimits()
    lease_s: float | None = Field(None, gt=0)  # none: the request deadline plus a minute

    @property
    def limits_anything(self) -> bool:
        """Some limit may apply (cheap: asked for every request)."""
        key, tenant = self.per_key, self.per_tenant
        return bool(key.default or key.overrides or tenant.default or tenant.overrides)


@dataclass(frozen=True, slots=True)
class Slot:
    call_id: str  # RequestContext.call_id
    keys: tuple[str, ...]
    lease_s: float = 0.0  # how long it lasts from when it was taken, or last renewed


class ConcurrencyLimiter:
    def __init__(self, redis: aioredis.Redis, default_lease_s: float = 660.0) -> None:
        """``default_lease_s``: how long a slot lasts when the settings say not (the
        request deadline plus a minute: no request holds a slot past its own end)."""
        self._redis = redis
        self._default_lease_s = default_lease_s
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)

    async def acquire(self, ctx: RequestContext, settings: ConcurrencySettings) -> Slot | None:
        """A slot in each limited set (None: no limit applies, or the store failed);
        ``RateLimitError`` when one is full."""
        principal = ctx.principal
        key_limit = principal.max_parallel or settings.per_key.for_name(principal.key_id)
        subjects = [
            (scope, name, limit)
            for scope, name, limit in (
                ("key", principal.key_id, key_limit),
                ("tenant", principal.tenant, settings.per_tenant.for_name(principal.tenant)),
            )
            if limit is not None
        ]
        if not subjects:
            return None
        keys = tuple(f"{PREFIX}:{scope}:{name}" for scope, name, _ in subjects)
        now_ms = int(time.time() * 1000)
        lease_s = settings.lease_s or self._default_lease_s
        args = [now_ms, now_ms + int(lease_s * 1000), ctx.call_id]
        try:
            full = int(await self._acquire(keys=keys, args=[*args, *(s[2] for s in subjects)]))
        except STORE_ERRORS:
            log.warning("concurrency limits: the store failed; request %s admitted", ctx.request_id)
            return None
        if full:
            scope, name, limit = subjects[full - 1]
            raise RateLimitError(
                f"Too many requests in flight for {scope} '{name}': at most {limit} at once.",
                code="too_many_concurrent_requests",
                headers={"retry-after": "1"},
            )
        return Slot(ctx.call_id, keys, lease_s)

    async def renew(self, slot: Slot) -> None:
        """Its lease again from now (a stream still running); a slot given back stays so."""
        lapse = int((time.time() + slot.lease_s) * 1000)
        try:
            await self._renew(keys=slot.keys, args=[lapse, slot.call_id])
        except STORE_ERRORS:  # the next renewal tries again
            log.warning("concurrency slot of %s not renewed", slot.call_id)

    async def release(self, slot: Slot) -> None:
        try:
            await self._release(keys=slot.keys, args=[slot.call_id])
        except STORE_ERRORS:  # it lapses on its own
            log.warning("concurrency slot of %s not given back; it lapses", slot.call_id)
