import json
import time
from pathlib import Path

import httpx

from bench.runner import RunOptions, _inject_fault, _write_config, probe_cost_recommendations
from bench.scenarios import SCENARIOS, FaultPlan
from bench.shapes import Constant
from bench.slo import SLO


def _opts(tmp_path: Path, scenario: str = "cost") -> RunOptions:
    return RunOptions(
        SCENARIOS[scenario],
        "http://gw",
        tmp_path,
        SLO(latency_p95_ms=50),
        "x",
        api_keys=["sk-a", "sk-b"],
        admin_key="sk-admin",
    )


async def test_cost_probe_uses_the_admin_key_and_counts(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, json={"recommendations": [{"kind": "cheaper_model"}] * 4})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        result = await probe_cost_recommendations(client, _opts(tmp_path))
    assert seen == ["Bearer sk-admin"]
    assert (result["status"], result["count"], len(result["sample"])) == (200, 4, 3)


async def test_cost_probe_reports_refusals(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": {"code": "permission_denied"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        result = await probe_cost_recommendations(client, _opts(tmp_path))
    assert (result["status"], result["count"]) == (403, 0)


async def test_fault_injection_sets_reads_and_clears(tmp_path: Path) -> None:
    calls = iter([10, 14])
    log: list[tuple[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/_mock/stats":
            return httpx.Response(200, json={"calls": next(calls)})
        log.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, json={})

    plan = FaultPlan(0.0, 0.0, {"faults": {"*": {"hang_s": 1.5, "error_rate": 1.0}}})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        result = await _inject_fault(plan, "http://mock", client, time.time(), 10)
    assert log == [("/_mock/faults", plan.payload), ("/_mock/faults", {"faults": {}})]
    assert (result["upstream_calls"], result["hang_s"]) == (4, 1.5)


async def test_fault_injection_failure_is_reported_and_still_cleared() -> None:
    log: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        log.append(request.url.path)
        return httpx.Response(404 if request.url.path == "/_mock/stats" else 200)

    plan = FaultPlan(0.0, 0.0, {"faults": {}})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        result = await _inject_fault(plan, "http://mock", client, time.time(), 10)
    assert "fault injection at http://mock failed" in result["error"]
    assert log == ["/_mock/stats", "/_mock/faults"]


def test_config_for_the_load_generator_has_no_keys(tmp_path: Path) -> None:
    _write_config(_opts(tmp_path, "stress"), Constant(3, 5))
    text = (tmp_path / "run_config.json").read_text()
    assert "sk-" not in text
    config = json.loads(text)
    assert config["shape"] == {"type": "constant", "params": {"users": 3, "duration": 5}}
    assert (
        config["stop_on_breach"]["p95_ms"] == 50 and config["stop_on_breach"]["after_users"] == 15
    )
