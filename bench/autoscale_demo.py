"""Issue 7's end-to-end autoscaling demo on a local Ray: a load step takes the
ingress from 1 replica to several, and back down after the load stops.

    python -m bench.autoscale_demo [--load-s 40] [--connections 48]

Prints the replica-count timeline and the scaling record (``/admin/scaling``)
the custom policy wrote, with the signal that drove each change.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import httpx

from bench.loadgen import run_wrk
from bench.serve_cluster import AUTH, BODY, cluster, deploy, gateway_args, wait_http

AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 8,
    "metrics_interval_s": 1,
    "look_back_period_s": 5,
    "upscale_delay_s": 2,
    "downscale_delay_s": 10,
    "policy": {
        "policy_function": "serve_app.autoscaling_policy:policy",
        "policy_kwargs": {
            "request_rate_per_replica": 15,
            "queue_depth_per_replica": 25,
            "p95_latency_s": 1.0,
            "cpu_percent": 70,
            "memory_percent": 80,
        },
    },
}


def replicas(app: str = "scaling") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["Gateway"]
    return sum(status.replica_states.values()) if status.replica_states else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--load-s", type=int, default=40)
    parser.add_argument("--connections", type=int, default=48)
    parser.add_argument("--settle-s", type=int, default=90)
    args = parser.parse_args(argv)

    timeline: list[tuple[float, int]] = []
    with cluster(mock_args=("--latency-ms", "100"), record_scaling=True) as running:
        from serve_app.app import GatewayIngress

        app = GatewayIngress.options(
            autoscaling_config=AUTOSCALING, ray_actor_options={"num_cpus": 0}
        ).bind(gateway_args(running.mock_port, running.redis_url))
        deploy(app, "scaling", "/")
        url, port = running.url(), running.port
        wait_http(url)
        start = time.monotonic()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                timeline.append((round(time.monotonic() - start, 1), replicas()))
                time.sleep(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(3)
        load = run_wrk(url, args.connections, args.load_s, BODY, headers=AUTH)
        load_end = time.monotonic() - start
        deadline = time.monotonic() + args.settle_s
        while time.monotonic() < deadline and replicas() > 1:
            time.sleep(1)
        time.sleep(2)
        stop.set()
        watcher.join()
        record = httpx.get(f"http://127.0.0.1:{port}/admin/scaling", headers=AUTH, timeout=10)
        peak = max(n for _, n in timeline)
        print(
            f"load: {args.connections} connections for {args.load_s}s -> "
            f"{load.requests_per_s:.0f} req/s, p50 {load.p50_ms:.0f} ms, p99 {load.p99_ms:.0f} ms"
        )
        changes = [(t, n) for i, (t, n) in enumerate(timeline) if i == 0 or timeline[i - 1][1] != n]
        print("replicas over time (s, count), changes only:", changes)
        print(
            f"load stopped at {load_end:.0f}s; peak {peak} replicas; "
            f"final {timeline[-1][1]} replica(s)"
        )
        print("scaling record:", json.dumps(record.json(), indent=1)[:4000])
        ok = peak > 1 and timeline[-1][1] == 1
        print("verdict:", "PASS" if ok else "FAIL", "(scaled up under load and back down after)")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
