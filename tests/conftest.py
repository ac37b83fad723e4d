"""Session-wide fixtures: one Redis, one mock provider, one Ray cluster.

Redis: the one at ``REDIS_URL`` when set, otherwise an embedded Valkey the
session starts on a free port (tests may kill and restart it to test failures).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from serve_app.embedded_store import EmbeddedStore, free_port
from serve_app.mock_provider import MockBehaviour
from tests.support import MockServer, OwnStore


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStore | None]:
    if os.environ.get("REDIS_URL"):
        yield None
        return
    store = EmbeddedStore(data_dir=Path(tmp_path_factory.mktemp("valkey")))
    store.start()
    yield store
    store.stop()


@pytest.fixture(scope="session")
def redis_url(embedded_store: EmbeddedStore | None) -> str:
    if embedded_store is None:
        return os.environ["REDIS_URL"]
    return embedded_store.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on a flushed database: each test starts from empty state."""
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def own_store(tmp_path: Path) -> AsyncIterator[OwnStore]:
    server = EmbeddedStore(data_dir=tmp_path / "own-valkey")
    url = await asyncio.to_thread(server.start)
    client = aioredis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    yield OwnStore(server, client)
    await client.aclose()
    await asyncio.to_thread(server.stop)


@pytest.fixture
async def replicas(
    redis_url: str, redis_client: aioredis.Redis
) -> AsyncIterator[list[aioredis.Redis]]:
    """Separate clients, as separate ingress replicas would have (the first is
    the flushed fixture client)."""
    clients = [redis_client] + [aioredis.from_url(redis_url) for _ in range(3)]
    yield clients
    for client in clients[1:]:
        await client.aclose()


@pytest.fixture(scope="session")
def mock_server() -> Iterator[MockServer]:
    server = MockServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mock_behaviour(mock_server: MockServer) -> Iterator[MockBehaviour]:
    """The mock's behaviour, reset before and after each test that uses it."""
    mock_server.behaviour.reset()
    yield mock_server.behaviour
    mock_server.behaviour.reset()


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    """One Ray cluster and Serve instance for the whole session, shut down at its end."""
    import ray
    from ray import serve

    port = free_port()
    metrics_port = free_port()
    os.environ["GATEWAY_TEST_METRICS_PORT"] = str(metrics_port)
    # As `make run` starts replicas: user code on the replica's own event loop.
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    ray.init(
        address="local",  # a cluster of our own, never a developer's running one
        _metrics_export_port=metrics_port,
        num_cpus=4,  # logical CPUs: test replicas reserve none, the machine has 2 cores
        include_dashboard=False,
        log_to_driver=False,
        namespace="llm_gateway_tests",
    )
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config={"enable_access_log": False},
    )
    yield port
    serve.shutdown()
    ray.shutdown()
