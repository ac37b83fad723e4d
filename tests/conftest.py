"""Session-wide fixtures: one Redis and (for Ray tests) one Ray cluster.

Redis: the one at ``REDIS_URL`` when set, otherwise an embedded Valkey the
session starts on a free port (and may kill/restart to test failures).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from serve_app.embedded_store import EmbeddedStore


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
