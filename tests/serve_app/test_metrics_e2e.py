"""The gateway's metrics reach Prometheus through Ray's metrics agent."""

from __future__ import annotations

import os

import httpx
import pytest

from serve_app.mock_provider import MockBehaviour
from tests.support import MockServer, auth, chat_body, client, deploy_gateway, gateway_args

pytestmark = [pytest.mark.ray, pytest.mark.integration]


def test_stage_metrics_are_exported(
    serve_port: int, mock_server: MockServer, redis_url: str, mock_behaviour: MockBehaviour
) -> None:
    from ray import serve

    budgets = {"tenants": {"local": {"daily_usd": "1000"}}}
    args = gateway_args(mock_server.base_url, redis_url, budgets=budgets)
    deploy_gateway(args, "metrics-e2e", "/metrics-e2e", 1)
    try:
        with client(f"http://127.0.0.1:{serve_port}/metrics-e2e") as http:
            for _ in range(3):
                body = chat_body("metrics", temperature=0)
                assert http.post("/v1/chat/completions", json=body, headers=auth()).is_success
        url = f"http://127.0.0.1:{os.environ['GATEWAY_TEST_METRICS_PORT']}/metrics"
        wanted = {
            "ray_gateway_requests_total",
            "ray_gateway_request_duration_seconds_bucket",
            "ray_gateway_upstream_duration_seconds_bucket",
            "ray_gateway_cache_results_total",
            "ray_gateway_tokens_total",
            "ray_gateway_budget_remaining_usd",  # refreshed every 10 s
        }
        found: set[str] = set()
        import time

        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not wanted <= found:
            text = httpx.get(url, timeout=5).text
            found = {name for name in wanted if f"\n{name}{{" in text}
            if 'application="metrics-e2e"' not in text:
                found = set()
            time.sleep(1)
        assert wanted <= found, wanted - found
        # The replica's buffered histogram, read as Prometheus reads a native one.
        name, labels = "ray_gateway_request_duration_seconds", 'route="chat/completions"'
        deadline = time.monotonic() + 45
        while True:
            text = httpx.get(url, timeout=5).text
            series = [
                line
                for line in text.splitlines()
                if 'application="metrics-e2e"' in line and labels in line
            ]
            inf = _values(series, f"{name}_bucket{{", 'le="+Inf"')
            count = _values(series, f"{name}_count{{")
            if (inf and inf[0] >= 3 and count == inf) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert inf and inf[0] >= 3 and count == inf, series
        assert _values(series, f"{name}_bucket{{", 'le="0.001"')[0] <= inf[0]
        assert _values(series, f"{name}_sum{{")[0] > 0
    finally:
        serve.delete("metrics-e2e")


def _values(lines: list[str], prefix: str, *having: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(prefix) and all(h in line for h in having)
    ]
