"""The state layer every stage shares: one asyncio Redis client per replica.

``REDIS_URL`` (or ``store.url``) selects an external Redis. With neither, the
first replica starts an embedded Valkey inside a detached Ray actor, once per
cluster, and every replica asks that actor for its address. The actor restarts a
server that dies; the server dies with the actor (and the cluster), its data stays
on disk for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os

import ray
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from serve_app.embedded_store import EmbeddedStore
from serve_app.store_settings import StoreSettings

log = logging.getLogger(__name__)

EMBEDDED_ACTOR_NAME = "llm-gateway-embedded-store"
EMBEDDED_NAMESPACE = "llm_gateway"


def stale_connection_retry() -> Retry:
    """One immediate retry on a fresh connection when a pooled one turns out closed:
    after a Redis restart or failover, or a server's idle ``timeout``, each pooled
    connection fails once, and that failure would refuse a request (a budget check
    fails closed). Timeouts are not retried: the command may have run, and a stalled
    Redis should degrade a stage, not double its wait."""
    return Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))


class Store:
    def __init__(self, url: str, settings: StoreSettings) -> None:
        self.url = url
        self.redis: aioredis.Redis = aioredis.from_url(
            url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
            max_connections=settings.max_connections,
            retry=stale_connection_retry(),
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
        # A server that dies (OOM, a kill) comes back on the same port with the same
        # data; the replicas' clients hold its address and reconnect by themselves.
        self._server.supervise()

    def url(self) -> str:
        self._server.ensure_running()
        return self._server.url

    def restarts(self) -> int:
        return self._server.restarts


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
