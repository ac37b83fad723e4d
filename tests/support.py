"""Helpers the test modules share: the mock provider in a thread, gateway
settings for tests, and deploying the gateway on the session's Ray."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis.asyncio as aioredis

from serve_app.embedded_store import EmbeddedStore, free_port
from serve_app.ingress import Gateway
from serve_app.mock_provider import MockBehaviour, MockProvider
from serve_app.mock_provider.server import start
from serve_app.settings import GatewayArgs, hash_key

LOCAL_KEY = "sk-local"
OTHER_KEY = "sk-other-tenant"


class MockServer:
    """The mock provider on a free loopback port, in a thread of this process,
    so tests can both call it over HTTP and inspect ``behaviour`` directly."""

    def __init__(self) -> None:
        self.behaviour = MockBehaviour()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._stopped = asyncio.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = await start(MockProvider(self.behaviour), "127.0.0.1", self.port)
        self._listening.set()
        async with server:
            await self._stopped.wait()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self._thread.start()
        if not self._listening.wait(timeout=10):
            raise RuntimeError("the mock provider did not start listening")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
        self._loop.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s")


def gateway_args(mock_url: str, redis_url: str, **overrides: Any) -> GatewayArgs:
    """The test profile: the mock upstream, a dead upstream, two tenants' keys."""
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config: dict[str, Any] = {
        "upstreams": {
            "mock": {"base_url": mock_url, "read_timeout_s": 2.0},
            "dead": {"base_url": dead, "connect_timeout_s": 1.0},
        },
        "models": [
            {"name": "mock-gpt", "upstream": "mock"},
            {"name": "mock-embed", "upstream": "mock", "kind": "embeddings"},
            {"name": "dead-gpt", "upstream": "dead"},
        ],
        "api_keys": [
            {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "tenant": "local", "admin": True},
            {"name": "other", "key_sha256": hash_key(OTHER_KEY), "tenant": "other"},
        ],
        "store": {"url": redis_url},
        "max_body_bytes": 64 * 1024,
        # Issue 2's tests look at single upstream calls: no retries, and a breaker
        # that neither trips on a handful of faults nor stays open after a 429.
        "resilience": {
            "default": {
                "retry": {"max_attempts": 1},
                "breaker": {"minimum_calls": 1000, "max_open_for_s": 0.001},
            }
        },
    }
    config.update(overrides)
    return GatewayArgs.model_validate(config)


def deploy_gateway(
    args: GatewayArgs, name: str, route_prefix: str, replicas: int = 2, semantic: bool = False
) -> None:
    """The gateway on the session's Ray; with ``semantic``, its semantic cache deployment too."""
    from ray import serve

    from deployments.semantic_cache import SemanticCacheDeployment
    from serve_app.app import GatewayIngress

    semantic_app = None
    if semantic:
        semantic_app = SemanticCacheDeployment.options(  # type: ignore[attr-defined]
            ray_actor_options={"num_cpus": 0}
        ).bind(args.semantic_cache, args.store)
    app = GatewayIngress.options(  # type: ignore[attr-defined]
        num_replicas=replicas, ray_actor_options={"num_cpus": 0}
    ).bind(args, semantic_app)
    serve.run(app, name=name, route_prefix=route_prefix)


def chat_body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": content}], **extra}


def quota_key(**quota: int) -> tuple[str, dict[str, Any]]:
    """A key of its own (quota windows outlive a test) with a one-minute ``quota``
    (``tokens=``, ``requests=``): its secret, and the ``gateway_args`` overrides
    (``api_keys``, ``limits``) that make it."""
    name = f"q-{uuid.uuid4().hex[:8]}"
    return f"sk-{name}", {
        "api_keys": [{"name": name, "key_sha256": hash_key(f"sk-{name}"), "tenant": name}],
        "limits": {"per_key": {"overrides": {name: [{"window": "1m", **quota}]}}},
    }


def tpm_key(tokens: int) -> tuple[str, dict[str, Any]]:
    return quota_key(tokens=tokens)


def auth(key: str = LOCAL_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=30)


@contextlib.asynccontextmanager
async def in_process(gateway: Gateway, key: str) -> AsyncIterator[httpx.AsyncClient]:
    """``gateway`` started in this process (no Ray), and a client of it with ``key``."""
    await gateway.start()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway.asgi()), base_url="http://gw", headers=auth(key)
    )
    try:
        yield client
    finally:
        await client.aclose()
        await gateway.aclose()


@dataclass
class OwnStore:
    """A server of the test's own, to kill and start again, and a client on it."""

    server: EmbeddedStore
    client: aioredis.Redis

    async def kill(self) -> None:
        await asyncio.to_thread(self.server.kill)

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)
