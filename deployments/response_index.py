"""Which upstream holds each stored response the gateway created, and which tenant
owns it (the Responses API, ``serve_app/responses.py``).

An upstream keeps a response (``store``, its default) under an id, and every
tenant calls it with the gateway's one upstream key: without this index, any
caller who learned an id could read, continue or delete another tenant's
conversation. So the gateway serves ``previous_response_id`` and
``/v1/responses/{id}`` only for ids it recorded here, for the tenant that made
them, and sends each to the upstream that holds it (a fallback upstream would not
know the id). Entries outlive the upstream's own retention (OpenAI keeps
responses 30 days) by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from deployments.store_errors import STORE_ERRORS
from serve_app.errors import StoreUnavailableError

PREFIX = "gw:resp:"
# An upstream's ids are short and plain (OpenAI's: resp_ and 48 hex digits); anything
# else is refused before it becomes part of a store key or an upstream path.
RESPONSE_ID = re.compile(r"[A-Za-z0-9_\-]{1,128}")


@dataclass(frozen=True, slots=True)
class ResponseOwner:
    tenant: str
    upstream: str  # the upstream that holds it
    model: str  # the public model it was made with
    key_id: str  # the key that made it (for the record: a tenant's keys share its responses)
    # The conversation's length once this response is in it (its usage's total): what
    # the upstream reads again for a request that continues it, and bills as input.
    context_tokens: int = 0


def _store_error() -> StoreUnavailableError:
    return StoreUnavailableError(
        "The gateway cannot look up stored responses while its state store (Redis) is"
        " unreachable; retry shortly."
    )


class ResponseIndex:
    def __init__(self, redis: aioredis.Redis, retention_s: int) -> None:
        self._redis = redis
        self._retention_s = retention_s

    async def remember(self, response_id: str, owner: ResponseOwner) -> None:
        """Record a response the upstream now holds. A failure raises
        ``StoreUnavailableError``: the caller decides what an unrecorded one costs."""
        value = orjson.dumps(
            [owner.tenant, owner.upstream, owner.model, owner.key_id, owner.context_tokens]
        )
        try:
            await self._redis.set(PREFIX + response_id, value, ex=self._retention_s)
        except STORE_ERRORS:
            raise _store_error() from None

    async def find(self, response_id: str) -> ResponseOwner | None:
        """The response's owner, or None for an id the gateway never recorded (or one
        past retention). An unreachable store raises: a request that names an id
        cannot be sent anywhere safely without knowing whose it is."""
        if not RESPONSE_ID.fullmatch(response_id):
            return None
        try:
            raw = await self._redis.get(PREFIX + response_id)
        except STORE_ERRORS:
            raise _store_error() from None
        if raw is None:
            return None
        # Entries recorded before context_tokens was kept have four fields.
        tenant, upstream, model, key_id, *rest = orjson.loads(raw)
        context_tokens = rest[0] if rest and isinstance(rest[0], int) else 0
        return ResponseOwner(tenant, upstream, model, key_id, max(0, context_tokens))

    async def forget(self, response_id: str) -> None:
        try:
            await self._redis.delete(PREFIX + response_id)
        except STORE_ERRORS:
            raise _store_error() from None


__all__ = ["RESPONSE_ID", "ResponseIndex", "ResponseOwner"]
