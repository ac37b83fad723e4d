"""A section of the config that an admin replaces at run time (limits, budgets).

``PUT /admin/<section>`` writes the new section to Redis and announces it on a
pub/sub channel: every replica applies it as the announcement arrives, and
re-reads it every ``poll_s`` in case it missed one. The stored section is keyed
by the configured one it overrides: a redeploy with a new section in
``config.yaml`` starts from that, not from an older PUT.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel

from deployments.pubsub import Message, follow_channel
from deployments.tasks import cancel_and_wait

log = logging.getLogger(__name__)
KEY_PREFIX = "gw:config:"
POLL_S = 2.0

M = TypeVar("M", bound=BaseModel)


class RuntimeSetting(Generic[M]):
    def __init__(
        self,
        redis: aioredis.Redis,
        name: str,
        configured: M,
        apply: Callable[[M], None],
        *,
        poll_s: float = POLL_S,
    ) -> None:
        self.name = name
        self.current = configured
        self._redis = redis
        self._configured = configured
        self._apply = apply
        self._poll_s = poll_s
        digest = hashlib.sha256(configured.model_dump_json().encode()).hexdigest()[:16]
        self.key = f"{KEY_PREFIX}{name}:{digest}"
        self._version: bytes | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def put(self, settings: M) -> None:
        """Store, apply here, and announce to the other replicas."""
        payload = settings.model_dump_json().encode()
        await self._redis.set(self.key, payload)
        self._load(payload)
        await self._redis.publish(self.key, b"changed")

    async def reset(self) -> None:
        """Back to the configured section, here and on the other replicas."""
        await self._redis.delete(self.key)
        self._load(None)
        await self._redis.publish(self.key, b"changed")

    def _load(self, payload: bytes | None) -> None:
        """Apply a stored section; none stored (deleted) means the configured one."""
        if payload == self._version:
            return
        if payload is None:
            settings = self._configured
        else:
            settings = type(self._configured).model_validate_json(payload)
        self._apply(settings)
        self.current = settings
        self._version = payload

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        await cancel_and_wait(self._watcher)

    async def _watch(self) -> None:
        async def reread(_: Message) -> None:  # on an announcement, and every poll_s
            self._load(await self._redis.get(self.key))

        def down(_: BaseException) -> None:  # a store outage must not stop the watcher
            log.debug("%s watcher: store unavailable", self.name, exc_info=True)

        await follow_channel(
            self._redis,
            self.key,
            reread,
            on_down=down,
            tick_s=self._poll_s,
            retry_s=self._poll_s,
            errors=(Exception,),
        )
