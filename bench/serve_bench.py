"""Issues 3-5's Serve-level benchmarks, each against a no-op Serve app measured in
the same run and ingress mode (HAProxy unless --default-proxy):

    python -m bench.serve_bench limiter   # req/s with the limiter on vs off (floor >= 85 %)
    python -m bench.serve_bench cache     # exact-hit req/s vs no-op (>= 50 %), hit p99 at 25 conns
    python -m bench.serve_bench breaker   # refusal latency when open; healthy model's req/s
                                          # while another upstream hangs (>= 90 %)
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.loadgen import LoadResult, run_wrk
from bench.paired import paired_measures, paired_rounds
from bench.serve_cluster import AUTH, OPTIONS, cluster, deploy, gateway_args, wait_http

ROUNDS = 5  # interleaved rounds behind each ratio floor (bench/paired.py); --rounds


def body(content: str, model: str = "mock-gpt", **extra: Any) -> str:
    payload = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return orjson.dumps(payload).decode()


def gateway(name: str, mock_port: int, redis_url: str, **extra: Any) -> None:
    from serve_app.app import GatewayIngress

    app = GatewayIngress.options(**OPTIONS).bind(gateway_args(mock_port, redis_url, **extra))
    deploy(app, name, f"/{name}")


def wrk(url: str, conns: int, seconds: float, payload: str) -> LoadResult:
    return run_wrk(url, conns, seconds, payload, headers=AUTH)


def limiter_bench(
    port: int, mock_port: int, redis: str, seconds: float, rounds: int = ROUNDS
) -> dict[str, Any]:
    windows = [{"window": w, "requests": 10**9, "tokens": 10**12} for w in ("1m", "1h", "1d")]
    gateway("off", mock_port, redis)
    gateway("on", mock_port, redis, limits={"per_key": {"default": windows}})
    payload = body("limiter bench")
    urls = {n: f"http://127.0.0.1:{port}/{n}/v1/chat/completions" for n in ("off", "on")}
    for url in urls.values():
        wait_http(url)
        wrk(url, 4, 1, payload)
    rows = {n: [wrk(u, 1, seconds, payload)] for n, u in urls.items()}
    paired = paired_rounds(urls["off"], urls["on"], 16, seconds, rounds, payload, AUTH)
    rows["off"] += paired.base
    rows["on"] += paired.other
    print(f"limiter on/off req/s at 16 conns: {paired.describe()}")
    return {"rows": rows, "floors": {"limiter on/off req/s at 16 conns (>= 85%)": paired.ratio}}


def cache_bench(
    port: int, mock_port: int, redis: str, seconds: float, rounds: int = ROUNDS
) -> dict[str, Any]:
    gateway("cached", mock_port, redis)
    payload = body("what is the capital of France?", temperature=0)
    url = f"http://127.0.0.1:{port}/cached/v1/chat/completions"
    noop = f"http://127.0.0.1:{port}/noop/v1/chat/completions"
    wait_http(url)
    first = httpx.post(url, content=payload, headers=AUTH, timeout=10)
    hit = httpx.post(url, content=payload, headers=AUTH, timeout=10)
    assert hit.headers.get("x-cache") == "HIT", (first.headers, hit.headers)
    wrk(url, 4, 1, payload)
    paired = paired_rounds(noop, url, 16, seconds, rounds, payload, AUTH)
    print(f"exact-hit/no-op req/s at 16 conns: {paired.describe()}")
    rows = {
        "noop": [*paired.base, wrk(noop, 25, seconds, payload)],
        "exact_hit": [*paired.other, wrk(url, 25, seconds, payload)],
    }
    return {
        "rows": rows,
        "floors": {
            "exact-hit/no-op req/s at 16 conns (>= 50%)": paired.ratio,
            "exact-hit p99 ms at 25 conns (< 100)": rows["exact_hit"][-1].p99_ms,
        },
    }


def _hang(url: str, payload: str, stop: threading.Event, conns: int) -> list[threading.Thread]:
    def loop() -> None:
        # Clients of the hanging model behave like the OpenAI SDKs: a 503 with
        # retry-after (bulkhead full, breaker open) is retried after that wait.
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post(url, content=payload, headers=AUTH)
                except httpx.HTTPError:
                    continue
                if response.status_code == 503:
                    stop.wait(float(response.headers.get("retry-after", "1")))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(conns)]
    for t in threads:
        t.start()
    return threads


def breaker_bench(
    port: int, mock_port: int, redis: str, seconds: float, rounds: int = ROUNDS
) -> dict[str, Any]:
    base = f"http://127.0.0.1:{mock_port}/v1"
    upstreams = {"healthy": {"base_url": base}, "sick": {"base_url": base, "read_timeout_s": 20}}
    models = [
        {"name": "mock-gpt", "upstream": "healthy"},
        {"name": "mock-hang", "upstream": "sick"},
    ]
    resilience = {
        "default": {"retry": {"max_attempts": 1}},
        "upstreams": {
            "sick": {
                "bulkhead": {"max_concurrent": 8, "max_queued": 8},
                "retry": {"max_attempts": 1},
                "breaker": {"slow_call_duration_s": 2, "minimum_calls": 1000},
            },
        },
    }
    gateway(
        "resilient", mock_port, redis, upstreams=upstreams, models=models, resilience=resilience
    )
    url = f"http://127.0.0.1:{port}/resilient/v1/chat/completions"
    admin = f"http://127.0.0.1:{port}/resilient/admin/breakers/open"
    noop = f"http://127.0.0.1:{port}/noop/v1/chat/completions"
    healthy, hang = body("healthy"), body("hang", model="mock-hang")
    wait_http(url)
    # Refusal latency: force the healthy model's breaker open, measure, close it again.
    name = "healthy/mock-gpt"
    httpx.post(admin, json={"name": name}, headers=AUTH, timeout=10).raise_for_status()
    refusals = [wrk(url, c, seconds, healthy) for c in (1, 16)]
    httpx.post(admin.replace("/open", "/close"), json={"name": name}, headers=AUTH, timeout=10)
    noop_rows = [wrk(noop, c, seconds, healthy) for c in (1, 16)]
    wrk(url, 4, 1, healthy)

    def beside_hang() -> LoadResult:
        # Each round's hang outlasts its measurement, and is over before the next.
        httpx.post(
            f"http://127.0.0.1:{mock_port}/_mock/faults",
            json={"faults": {"mock-hang": {"hang_s": seconds + 2}}},
            timeout=5,
        ).raise_for_status()
        stop = threading.Event()
        threads = _hang(url, hang, stop, 24)
        time.sleep(1)
        beside = wrk(url, 16, seconds, healthy)
        stop.set()
        httpx.post(f"http://127.0.0.1:{mock_port}/_mock/reset", timeout=5)
        for t in threads:
            t.join(timeout=30)
        return beside

    paired = paired_measures(lambda: wrk(url, 16, seconds, healthy), beside_hang, rounds)
    print(f"healthy req/s beside a hanging upstream / alone: {paired.describe()}")
    return {
        "rows": {
            "refusal_open": refusals,
            "noop": noop_rows,
            "healthy_alone": paired.base,
            "healthy_beside_hang": paired.other,
        },
        "floors": {
            "healthy req/s beside a hanging upstream / alone (>= 90%)": paired.ratio,
            "refusal p50 ms at 1 conn (vs no-op)": refusals[0].p50_ms,
            "no-op p50 ms at 1 conn": noop_rows[0].p50_ms,
        },
    }


BENCHES: dict[str, Callable[[int, int, str, float, int], dict[str, Any]]] = {
    "limiter": limiter_bench,
    "cache": cache_bench,
    "breaker": breaker_bench,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bench", choices=[*BENCHES, "all"])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--default-proxy", action="store_true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    chosen = list(BENCHES) if args.bench == "all" else [args.bench]
    with cluster(args.default_proxy) as c:
        results = {name: BENCHES[name](c.port, c.mock_port, c.redis_url, args.duration, args.rounds)
                   for name in chosen}  # fmt: skip
    for name, result in results.items():
        print(f"\n== {name}")
        print(f"{'row':<22}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non2xx':>8}")
        for row, loads in result["rows"].items():
            for r in loads:
                print(
                    f"{row:<22}{r.connections:>6}{r.requests_per_s:>10.0f}{r.p50_ms:>9.2f}"
                    f"{r.p99_ms:>9.2f}{r.non_2xx:>8}"
                )
        for label, value in result["floors"].items():
            shown = f"{value:.0%}" if "%" in label and "ms" not in label else f"{value:.2f}"
            print(f"  {label}: {shown}")
        out = Path(args.out) / f"serve_bench_{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = {k: [asdict(r) for r in v] for k, v in result["rows"].items()}
        out.write_text(json.dumps({"rows": rows, "floors": result["floors"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
