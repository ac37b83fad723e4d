"""The embedded Valkey comes back when it dies, on the same address with its data,
and stays down once stopped on purpose."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from serve_app.embedded_store import EmbeddedStore

pytestmark = pytest.mark.integration


def crash(url: str) -> None:
    """SIGKILL the server at ``url``, as the OOM killer would."""
    client = redis.Redis.from_url(url)
    pid = int(client.info("server")["process_id"])
    client.close()
    os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def write_durably(url: str, key: str, value: str) -> None:
    client = redis.Redis.from_url(url)
    client.set(key, value)
    client.execute_command("WAITAOF", 1, 0, 5000)  # on disk before the crash
    client.close()


def test_a_supervised_server_restarts_with_its_data(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path)
    store.start()
    store.supervise(interval_s=0.1)
    try:
        write_durably(store.url, "budget", "42")
        crash(store.url)
        wait_for(lambda: store.restarts == 1 and store.ping())
        client = redis.Redis.from_url(store.url)  # the same address as before
        assert client.get("budget") == b"42"
        client.close()
    finally:
        store.stop()


def test_a_stopped_server_stays_down(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path)
    store.start()
    store.supervise(interval_s=0.05)
    store.stop()
    time.sleep(0.3)
    assert not store.running() and not store.ping()
    assert store.restarts == 0


def test_without_supervision_a_crash_is_not_undone(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path)
    store.start()
    try:
        crash(store.url)
        time.sleep(0.3)
        assert not store.ping() and store.restarts == 0
        assert store.ensure_running()  # what a caller asking for the address does
        assert store.ping()
    finally:
        store.stop()


@pytest.mark.ray
def test_the_clusters_store_actor_brings_its_server_back(serve_port: int, tmp_path: Path) -> None:
    """What `make run` starts when no Redis is configured; the replicas keep its
    address, so it must come back on that address without anyone asking."""
    import ray

    from serve_app.store import EmbeddedStoreActor

    actor = EmbeddedStoreActor.options(name=f"store-{uuid.uuid4().hex[:8]}").remote(  # type: ignore[attr-defined]
        str(tmp_path)
    )
    try:
        url = ray.get(actor.url.remote(), timeout=30)
        write_durably(url, "ledger", "kept")
        crash(url)
        wait_for(lambda: ray.get(actor.restarts.remote()) == 1)
        client = redis.Redis.from_url(url)
        wait_for(lambda: bool(client.ping()))
        assert client.get("ledger") == b"kept"
        client.close()
    finally:
        ray.kill(actor)  # its server dies with it


async def test_a_store_client_outlives_a_server_restart(tmp_path: Path) -> None:
    """Every pooled connection is dead after a restart; the first call on each must
    still succeed (one refused budget check is a 503 to a paying caller)."""
    import asyncio

    from serve_app.store import Store
    from serve_app.store_settings import StoreSettings

    server = EmbeddedStore(tmp_path)
    server.start()
    store = Store(server.url, StoreSettings(url=server.url))
    try:
        await asyncio.gather(*(store.redis.ping() for _ in range(8)))  # 8 pooled connections
        server.kill()
        server.start()
        for _ in range(8):
            async with store.redis.pipeline(transaction=False) as pipe:  # as ScriptBatch sends
                pipe.incr("calls")
                assert await pipe.execute() == [_ + 1]
        assert await store.redis.get("calls") == b"8"
    finally:
        await store.aclose()
        server.stop()
