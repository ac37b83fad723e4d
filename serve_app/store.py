"""The state layer every stage shares: one asyncio Redis client per replica.

``REDIS_URL`` (or ``store.url``) selects an external Redis. With neither, the
first replica starts an embedded Valkey inside a detached Ray actor, once per
cluster, and every replica asks that actor for its address. The server dies
with the actor (and the cluster), its data stays on disk for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os

import ray
import redis.asyncio as aioredis

from serve_app.embedded_store import EmbeddedStore
from serve_app.store_settings import StoreSettings

log = logging.getLogger(__name__)

EMBEDDED_ACTOR_NAME = "llm-gateway-embedded-store"
EMBEDDED_NAMESPACE = "llm_gateway"


class Store:
    def __init__(self, url: str, settings: StoreSettings) -> None:
        self.url = url
        self.redis: aioredis.Redis = aioredis.from_url(
            url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
            max_connections=settings.max_connections,
            retry_on_timeout=False,
        )

    async def healthy(self, timeout_s: float = 1.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), timeout_s))
        except (aioredis.RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        await self.redis.aclose()


@ray.remote(num_cpus=0)
class EmbeddedStoreActor:
    def __init__(self, data_dir: str) -> None:
        self._server = EmbeddedStore(os.path.expanduser(data_dir))
        self._server.start()

    def url(self) -> str:
        # Restart a server that died (OOM, a kill): same data dir, same data.
        if not self._server.running():
            self._server.start()
        return self._server.url


async def embedded_url(data_dir: str) -> str:
    actor = EmbeddedStoreActor.options(  # type: ignore[attr-defined]
        name=EMBEDDED_ACTOR_NAME,
        namespace=EMBEDDED_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(data_dir)
    return str(await actor.url.remote())


async def connect(settings: StoreSettings) -> Store:
    url = settings.resolved_url()
    if url is None:
        url = await embedded_url(settings.data_dir)
        log.info("store: embedded Valkey at %s (data in %s)", url, settings.data_dir)
    return Store(url, settings)
