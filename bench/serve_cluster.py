"""What every Serve-level benchmark starts: an embedded store, a mock provider
in its own process, a local Ray with Serve (HAProxy ingress unless asked
otherwise) and the no-op app at ``/noop`` as the same-run baseline."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from serve_app.embedded_store import EmbeddedStore, free_port
from serve_app.settings import GatewayArgs, hash_key

BODY = orjson.dumps(
    {"model": "mock-gpt", "messages": [{"role": "user", "content": "benchmark me"}]}
).decode()
AUTH = {"Authorization": "Bearer sk-bench"}
OPTIONS: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}


@dataclass(frozen=True)
class Cluster:
    port: int  # Serve's HTTP port
    mock_port: int
    redis_url: str

    def url(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{prefix}/v1/chat/completions"


def wait_http(url: str, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, content=BODY, headers=AUTH, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s}s")


def gateway_args(mock_port: int, redis_url: str, **extra: object) -> GatewayArgs:
    return GatewayArgs.model_validate(
        {
            "upstreams": {"mock": {"base_url": f"http://127.0.0.1:{mock_port}/v1"}},
            "models": [{"name": "mock-gpt", "upstream": "mock"}],
            "api_keys": [
                {"name": "bench", "key_sha256": hash_key("sk-bench"), "tenant": "b", "admin": True}
            ],
            "store": {"url": redis_url},
            **extra,
        }
    )


def deploy(app: object, name: str, prefix: str) -> None:
    from ray import serve

    serve.run(app, name=name, route_prefix=prefix)


def deploy_gateway(name: str, prefix: str, cluster: Cluster, **extra: Any) -> None:
    from serve_app.app import GatewayIngress

    args = gateway_args(cluster.mock_port, cluster.redis_url, **extra)
    deploy(GatewayIngress.options(**OPTIONS).bind(args), name, prefix)


@contextmanager
def cluster(
    default_proxy: bool = False, mock_args: tuple[str, ...] = (), record_scaling: bool = False
) -> Iterator[Cluster]:
    """``record_scaling``: point Ray's processes (the autoscaling policy in the
    controller) at the store through REDIS_URL, which must be set before Ray starts."""
    import ray
    from ray import serve

    from bench.noop_app import NoOpIngress

    store = EmbeddedStore(tempfile.mkdtemp(prefix="bench-valkey-"))
    store.start()
    if record_scaling:
        os.environ["REDIS_URL"] = store.url
    if not default_proxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # before Ray starts
        # As `make run` stops replicas: a short drain behind HAProxy (scripts/run.sh).
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "3")
    # As `make run` starts replicas (the no-op baseline too): user code on the replica's loop.
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    mock_port = free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "serve_app.mock_provider", "--port", str(mock_port), *mock_args]
    )
    try:
        port = free_port()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=4)
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config={"enable_access_log": False},
        )
        deploy(NoOpIngress.options(**OPTIONS).bind(), "noop", "/noop")
        yield Cluster(port, mock_port, store.url)
    finally:
        serve.shutdown()
        ray.shutdown()
        mock.terminate()
        mock.wait(timeout=10)
        store.stop()
