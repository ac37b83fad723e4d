"""Issue 2's benchmark: (a) the mock provider directly, (b) a no-op Serve app,
(c) the gateway passing through to the mock, in the same run and ingress mode.

    python -m bench.passthrough [--duration 5] [--connections 1,16,64] [--default-proxy]

Floors: (c) req/s at 16 connections >= 50 % of (b); (c) p50 at 1 connection
<= (b) p50 + 3 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import orjson

from bench.loadgen import LoadResult, run_wrk
from serve_app.embedded_store import EmbeddedStore, free_port
from serve_app.settings import GatewayArgs, hash_key

BODY = orjson.dumps(
    {"model": "mock-gpt", "messages": [{"role": "user", "content": "benchmark me"}]}
).decode()
AUTH = {"Authorization": "Bearer sk-bench"}


def _wait_http(url: str, timeout_s: float = 60) -> None:
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


def start_serve(default_proxy: bool) -> int:
    if not default_proxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # before Ray starts
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=4)
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config={"enable_access_log": False},
    )
    return port


def deploy(app: object, name: str, prefix: str) -> None:
    from ray import serve

    serve.run(app, name=name, route_prefix=prefix)


def measure(url: str, connections: list[int], duration_s: float) -> list[LoadResult]:
    run_wrk(url, 4, 1.0, BODY, headers=AUTH)  # warm up pools and replicas
    return [run_wrk(url, c, duration_s, BODY, headers=AUTH) for c in connections]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--default-proxy", action="store_true")
    parser.add_argument("--out", default="bench/results/passthrough.json")
    args = parser.parse_args(argv)
    connections = [int(c) for c in args.connections.split(",")]

    from ray import serve

    from bench.noop_app import NoOpIngress
    from serve_app.app import GatewayIngress

    store = EmbeddedStore(tempfile.mkdtemp(prefix="bench-valkey-"))
    store.start()
    mock_port = free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "serve_app.mock_provider", "--port", str(mock_port)]
    )
    try:
        port = start_serve(args.default_proxy)
        options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
        deploy(NoOpIngress.options(**options).bind(), "noop", "/noop")
        gateway = GatewayIngress.options(**options).bind(gateway_args(mock_port, store.url))
        deploy(gateway, "gateway", "/")
        targets = {
            "a_mock_direct": f"http://127.0.0.1:{mock_port}/v1/chat/completions",
            "b_noop_serve": f"http://127.0.0.1:{port}/noop/v1/chat/completions",
            "c_gateway": f"http://127.0.0.1:{port}/v1/chat/completions",
        }
        for url in targets.values():
            _wait_http(url)
        results = {name: measure(url, connections, args.duration) for name, url in targets.items()}
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        mock.terminate()
        mock.wait(timeout=10)
        store.stop()
    report(results, args.default_proxy, Path(args.out))
    return 0


def report(results: dict[str, list[LoadResult]], default_proxy: bool, out: Path) -> None:
    mode = "default proxy" if default_proxy else "HAProxy ingress"
    print(f"\npassthrough benchmark ({mode}); wrk on loopback")
    print(f"{'target':<16}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non2xx':>8}")
    for name, rows in results.items():
        for r in rows:
            print(
                f"{name:<16}{r.connections:>6}{r.requests_per_s:>10.0f}{r.p50_ms:>9.2f}"
                f"{r.p99_ms:>9.2f}{r.non_2xx:>8}"
            )
    by = {name: {r.connections: r for r in rows} for name, rows in results.items()}
    ratio = p50_added = None
    if 16 in by["c_gateway"]:
        ratio = by["c_gateway"][16].requests_per_s / by["b_noop_serve"][16].requests_per_s
        print(f"gateway/no-op req/s at 16 connections: {ratio:.0%} (floor 50%)")
    if 1 in by["c_gateway"]:
        p50_added = by["c_gateway"][1].p50_ms - by["b_noop_serve"][1].p50_ms
        print(f"gateway p50 added at 1 connection: {p50_added:+.2f} ms (floor <= 3 ms)")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "mode": mode,
        "results": {k: [asdict(r) for r in v] for k, v in results.items()},
        "ratio_rps_16": ratio,
        "p50_added_ms_1": p50_added,
    }
    out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
