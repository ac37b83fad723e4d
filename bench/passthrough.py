"""Issue 2's benchmark: (a) the mock provider directly, (b) a no-op Serve app,
(c) the gateway passing through to the mock, in the same run and ingress mode.

    python -m bench.passthrough [--duration 5] [--connections 1,16,64] [--default-proxy]

Floors: (c) req/s at 16 connections >= 50 % of (b), the median of interleaved
rounds; (c) p50 at 1 connection <= (b) p50 + 3 ms.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from bench.loadgen import LoadResult, run_wrk
from bench.paired import Paired, paired_rounds
from bench.serve_cluster import AUTH, BODY, cluster, deploy_gateway, wait_http


def measure(url: str, connections: list[int], duration_s: float) -> list[LoadResult]:
    run_wrk(url, 4, 1.0, BODY, headers=AUTH)  # warm up pools and replicas
    return [run_wrk(url, c, duration_s, BODY, headers=AUTH) for c in connections]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds at 16")
    parser.add_argument("--default-proxy", action="store_true")
    parser.add_argument("--out", default="bench/results/passthrough.json")
    args = parser.parse_args(argv)
    connections = [int(c) for c in args.connections.split(",")]

    with cluster(args.default_proxy) as running:
        deploy_gateway("gateway", "/", running)
        targets = {
            "a_mock_direct": f"http://127.0.0.1:{running.mock_port}/v1/chat/completions",
            "b_noop_serve": running.url("/noop"),
            "c_gateway": running.url(),
        }
        for url in targets.values():
            wait_http(url)
        results = {name: measure(url, connections, args.duration) for name, url in targets.items()}
        # The floor's ratio: no-op and gateway back to back in rounds (bench/paired.py).
        noop, gateway = targets["b_noop_serve"], targets["c_gateway"]
        paired = paired_rounds(noop, gateway, 16, args.duration, args.rounds, BODY, AUTH)
    report(results, paired, args.default_proxy, Path(args.out))
    return 0


def report(
    results: dict[str, list[LoadResult]], paired: Paired, default_proxy: bool, out: Path
) -> None:
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
    ratio = paired.ratio
    print(f"gateway/no-op req/s at 16 connections (floor 50%): {paired.describe()}")
    p50_added = None
    if 1 in by["c_gateway"]:
        p50_added = by["c_gateway"][1].p50_ms - by["b_noop_serve"][1].p50_ms
        print(f"gateway p50 added at 1 connection: {p50_added:+.2f} ms (floor <= 3 ms)")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "mode": mode,
        "results": {k: [asdict(r) for r in v] for k, v in results.items()},
        "ratio_rps_16": ratio,
        "ratio_rps_16_rounds": paired.ratios,
        "p50_added_ms_1": p50_added,
    }
    out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
