"""Gateway keys created at run time through the admin API, kept in Redis.

A team gets a key without a redeploy: ``POST /admin/keys`` answers its secret
once, and Redis keeps only its sha256 digest (as ``config.yaml`` does), so a
copy of the store leaks no key. Such a key is never an admin key, and is
limited, budgeted and billed under its name like a configured one: by the
``limits``, ``budget`` and ``max_parallel_requests`` it was made (or later
changed) with, else by the configured per-key ones.

Each replica remembers what it looked up, found or not, for ``cache_s``: a key
costs one Redis read per replica every ``cache_s``, however busy. Creating,
changing, rotating or revoking a key is announced on a pub/sub channel and every replica forgets its
copy as the announcement arrives; one whose subscription was down forgets all
it remembers as it subscribes again, and is never more than ``cache_s`` late.
While the store is down a key a replica has seen keeps working from its copy;
a key it has not seen is answered 503.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.budget import BudgetLimit
from deployments.limiter_settings import Quota, unique_windows
from deployments.pubsub import Message, follow_channel
from deployments.store_errors import STORE_ERRORS
from deployments.tasks import cancel_and_wait
from serve_app.context import Principal
from serve_app.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    StoreUnavailableError,
)
from serve_app.settings import TENANT_NAME, TenantName, hash_key, model_is_known

log = logging.getLogger(__name__)

# One hash tag: both hashes live in one slot of a Redis Cluster, as the scripts need.
BY_NAME = "gw:{keys}:by_name"  # name -> digest
BY_DIGEST = "gw:{keys}:by_digest"  # digest -> the key's record (JSON)
CHANGED = "gw:{keys}:changed"  # announces a digest created, changed, rotated or revoked
SECRET_PREFIX = "sk-gw-"
MAX_REMEMBERED = 10_000  # lookups a replica keeps (unknown keys included)
_TENANT = re.compile(TENANT_NAME)

_CREATE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
# The key keeps its name and settings under a new secret; the old secret stops at once.
_ROTATE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
local record = redis.call('HGET', KEYS[2], old)
redis.call('HDEL', KEYS[2], old)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], record)
return {old, record}
"""
# The record of the key ``name`` replaced, if it still is the one the change was made to.
_UPDATE = """
local digest = redis.call('HGET', KEYS[1], ARGV[1])
if not digest then return false end
if redis.call('HGET', KEYS[2], digest) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], digest, ARGV[3])
return digest
"""
_REVOKE = """
local digest = redis.call('HGET', KEYS[1], ARGV[1])
if not digest then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], digest)
return digest
"""


class KeyChange(BaseModel):
    """What ``PATCH /admin/keys/{name}`` takes: the fields given replace the key's
    (``null``: every model, the configured limits or budget, no expiry)."""

    model_config = ConfigDict(extra="forbid")

    user: str | None = Field(None, max_length=256)
    models: list[str] | None = None  # the models it may use; none: every model
    expires_in_s: float | None = Field(None, gt=0, le=10 * 365 * 86_400)  # none: never
    # Its own quotas and budget, in place of the configured per-key ones (LiteLLM's
    # rpm_limit, tpm_limit and max_budget on /key/generate); none: the configured ones.
    limits: tuple[Quota, ...] | None = None
    budget: BudgetLimit | None = None
    max_parallel_requests: int | None = Field(None, ge=1)  # in flight at once, all replicas

    @field_validator("limits")
    @classmethod
    def _one_quota_a_window(cls, limits: tuple[Quota, ...] | None) -> tuple[Quota, ...] | None:
        return None if limits is None else unique_windows(limits)


class KeySpec(KeyChange):
    """What ``POST /admin/keys`` takes."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    tenant: TenantName = "default"


@dataclass(frozen=True, slots=True)
class RuntimeKey:
    name: str
    tenant: str
    user: str | None
    models: list[str] | None
    created_ms: int
    expires_ms: int | None = None  # epoch ms; past it the key is refused until deleted
    limits: tuple[Quota, ...] | None = None
    budget: BudgetLimit | None = None
    max_parallel_requests: int | None = None

    def expired(self, now_ms: float) -> bool:
        return self.expires_ms is not None and now_ms >= self.expires_ms

    def principal(self, tenant_models: frozenset[str] | None = None) -> Principal:
        models = None if self.models is None else frozenset(self.models)
        return Principal(
            key_id=self.name,
            tenant=self.tenant,
            user=self.user,
            models=models,
            tenant_models=tenant_models,
            quotas=self.limits,
            budget=self.budget,
            max_parallel=self.max_parallel_requests,
        )

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON values (what the store holds and the admin API shows)."""
        record = asdict(self)
        if self.limits is not None:
            record["limits"] = [q.model_dump(mode="json") for q in self.limits]
        if self.budget is not None:
            record["budget"] = self.budget.model_dump(mode="json")
        return record

    def to_json(self) -> bytes:
        return orjson.dumps(self.as_dict())

    @classmethod
    def from_json(cls, raw: bytes) -> RuntimeKey:
        record = orjson.loads(raw)
        limits, budget = record.pop("limits", None), record.pop("budget", None)
        return cls(
            **record,
            limits=None if limits is None else tuple(Quota.model_validate(q) for q in limits),
            budget=None if budget is None else BudgetLimit.model_validate(budget),
        )


class RuntimeKeys:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        reserved_names: Collection[str],
        models: Collection[str],
        tenant_models: Mapping[str, frozenset[str] | None] | None = None,
        cache_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``reserved_names``: the configured keys' names; ``models``: the public models."""
        self._redis = redis
        self._reserved = frozenset(reserved_names)
        self._models = frozenset(models)
        self._tenant_models = dict(tenant_models or {})
        self._cache_s = cache_s
        self._clock = clock
        self._wall = wall  # expiries are wall-clock times, shared by every replica
        # digest -> (its key, or None: no such key; until when this is trusted)
        self._seen: dict[str, tuple[RuntimeKey | None, float]] = {}
        self._generation = 0  # counts the changes heard: a read older than one is not kept
        self._create = redis.register_script(_CREATE)
        self._revoke = redis.register_script(_REVOKE)
        self._rotate = redis.register_script(_ROTATE)
        self._update = redis.register_script(_UPDATE)
        self._watcher: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # announcements are heard (set while subscribed)

    # -- the request path --------------------------------------------------------

    async def principal(self, digest: str) -> Principal | None:
        """Who holds the key with this digest; None when no such key exists, and
        ``AuthenticationError`` when it has expired."""
        key = await self.live(digest)
        return None if key is None else self.holder(key)

    def holder(self, key: RuntimeKey) -> Principal:
        """The principal of a key made at run time, with its tenant's allowlist."""
        return key.principal(self._tenant_models.get(key.tenant))

    async def live(self, digest: str) -> RuntimeKey | None:
        """The key with this digest (None: no such key), unless it has expired."""
        key = await self._key(digest)
        if key is not None and key.expired(self._wall() * 1000):
            raise AuthenticationError("This API key has expired.", code="expired_api_key")
        return key

    async def _key(self, digest: str) -> RuntimeKey | None:
        now = self._clock()
        seen = self._seen.get(digest)
        if seen is not None and now < seen[1]:
            return seen[0]
        generation = self._generation
        try:
            raw = await self._redis.hget(BY_DIGEST, digest)
        except STORE_ERRORS as exc:
            if seen is not None and seen[0] is not None:
                return seen[0]  # known here: it keeps working while the store is down
            raise StoreUnavailableError(
                "The state store (Redis) is not reachable to check this API key."
            ) from exc
        found = None if raw is None else RuntimeKey.from_json(raw)
        if found is not None and not _TENANT.fullmatch(found.tenant):
            # Made before tenant names were checked: its tenant could reach another's
            # cache namespaces and quotas. Refused until it is made again.
            log.warning(
                "key %s is refused: its tenant %r is not a valid name", found.name, found.tenant
            )
            found = None
        if generation != self._generation:
            return found  # a change was announced meanwhile: this read may predate it
        if len(self._seen) >= MAX_REMEMBERED:
            self._seen.clear()  # a flood of made-up keys must not grow the replica
        self._seen[digest] = (found, now + self._cache_s)
        return found

    # -- admin -------------------------------------------------------------------

    async def create(self, spec: KeySpec) -> tuple[str, RuntimeKey]:
        """A new key and its secret, which is shown this once."""
        if spec.name in self._reserved:
            raise _exists(spec.name, "is configured in config.yaml")
        self._check_models(spec.models)
        secret = _new_secret()
        digest = hash_key(secret)
        created_ms = int(self._wall() * 1000)
        expires_ms = None
        if spec.expires_in_s is not None:
            expires_ms = created_ms + int(spec.expires_in_s * 1000)
        key = RuntimeKey(
            spec.name,
            spec.tenant,
            spec.user,
            spec.models,
            created_ms,
            expires_ms,
            spec.limits,
            spec.budget,
            spec.max_parallel_requests,
        )
        created = await self._create(
            keys=[BY_NAME, BY_DIGEST], args=[spec.name, digest, key.to_json()]
        )
        if not created:
            raise _exists(spec.name, "exists")
        await self._announce(digest)
        return secret, key

    async def revoke(self, name: str) -> None:
        self._refuse_configured(name)
        digest = await self._revoke(keys=[BY_NAME, BY_DIGEST], args=[name])
        if not digest:
            raise _missing(name)
        await self._announce(digest)

    async def rotate(self, name: str) -> tuple[str, RuntimeKey]:
        """A new secret for the key ``name`` (its settings, expiry included, kept); the
        old secret is refused from now on, on every replica as the change is announced."""
        self._refuse_configured(name)
        secret = _new_secret()
        replaced = await self._rotate(keys=[BY_NAME, BY_DIGEST], args=[name, hash_key(secret)])
        if not replaced:
            raise _missing(name)
        old, record = replaced
        await self._announce(old)
        return secret, RuntimeKey.from_json(record)

    async def update(self, name: str, change: KeyChange) -> RuntimeKey:
        """The key ``name`` with the fields ``change`` sets replaced, its secret kept;
        every replica applies it as the change is announced."""
        self._refuse_configured(name)
        self._check_models(change.models)
        given = change.model_fields_set
        fields: dict[str, Any] = {field: getattr(change, field) for field in given}
        if "expires_in_s" in fields:
            seconds = fields.pop("expires_in_s")
            now_ms = self._wall() * 1000
            fields["expires_ms"] = None if seconds is None else int(now_ms + seconds * 1000)
        for _ in range(8):  # another admin's change in between: apply this one to it
            digest = await self._redis.hget(BY_NAME, name)
            current = None if digest is None else await self._redis.hget(BY_DIGEST, digest)
            if current is None:
                raise _missing(name)
            updated = replace(RuntimeKey.from_json(current), **fields)
            done = await self._update(
                keys=[BY_NAME, BY_DIGEST], args=[name, current, updated.to_json()]
            )
            if done is None:
                raise _missing(name)
            if done != 0:
                await self._announce(done)
                return updated
        raise StoreUnavailableError(f"The key '{name}' kept changing; try again.")

    def _check_models(self, models: list[str] | None) -> None:
        unknown = sorted(m for m in models or () if not model_is_known(m, self._models))
        if unknown:
            raise InvalidRequestError(f"No models {unknown} are configured.", param="models")

    async def listed(self) -> list[RuntimeKey]:
        records = await self._redis.hgetall(BY_DIGEST)
        return sorted((RuntimeKey.from_json(raw) for raw in records.values()), key=_by_name)

    def _refuse_configured(self, name: str) -> None:
        if name in self._reserved:
            raise InvalidRequestError(
                f"The key '{name}' is configured in config.yaml: change it there.", param="name"
            )

    def _forget(self, digest: bytes | str) -> None:
        """A change to the key with this digest (as Redis returns it) was made or heard."""
        self._generation += 1
        self._seen.pop(digest.decode() if isinstance(digest, bytes) else digest, None)

    async def _announce(self, digest: bytes | str) -> None:
        self._forget(digest)
        try:
            await self._redis.publish(CHANGED, digest)
        except STORE_ERRORS:  # written already: the others see it within cache_s
            log.warning(
                "key change not announced; other replicas learn it within %ss", self._cache_s
            )

    # -- announcements -----------------------------------------------------------

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        await cancel_and_wait(self._watcher)

    async def _watch(self) -> None:
        missed = False  # the subscription was down: announcements may have gone unheard

        async def forget(message: Message) -> None:
            nonlocal missed
            if message is None:
                return
            if message["type"] == "subscribe":
                if missed:  # ask the store again about every key (the copies stay for outages)
                    self._generation += 1
                    self._seen = {digest: (it, 0.0) for digest, (it, _) in self._seen.items()}
                    missed = False
                self.listening.set()
            elif message["type"] == "message":
                self._forget(message["data"])

        def down(_: BaseException) -> None:
            nonlocal missed
            missed = True
            self.listening.clear()
            log.debug("key announcements: store unavailable", exc_info=True)

        await follow_channel(self._redis, CHANGED, forget, on_down=down, errors=(Exception,))


def _by_name(key: RuntimeKey) -> str:
    return key.name


def _exists(name: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"A key named '{name}' {why}.", param="name", code="key_exists", status_code=409
    )


def _missing(name: str) -> NotFoundError:
    return NotFoundError(f"No key named '{name}' was created here.", code="key_not_found")


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)
