"""End to end: ``python -m bench`` as a user runs it, against a gateway started in
the test (on the session's Ray) in front of the mock provider.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.__main__ import main
from serve_app.mock_provider import Latency
from tests.support import MockServer, deploy_gateway, gateway_args

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bench_target(serve_port: int, mock_server: MockServer, redis_url: str) -> Iterator[str]:
    from ray import serve

    mock_server.behaviour.reset()
    mock_server.behaviour.config.latency = Latency(fixed_ms=5, per_token_ms=1)
    deploy_gateway(gateway_args(mock_server.base_url, redis_url), "bench", "/bench-gw")
    try:
        yield f"http://127.0.0.1:{serve_port}/bench-gw"
    finally:
        serve.delete("bench")
        mock_server.behaviour.reset()


@pytest.fixture
def metrics_url(tmp_path: Path) -> Iterator[str]:
    """A static Prometheus endpoint, as Ray's metrics export port would serve."""
    served = tmp_path / "prom"
    served.mkdir()
    (served / "metrics").write_text(
        'ray_serve_deployment_replica_healthy{deployment="Ingress",replica="a"} 1\n'
        'ray_serve_deployment_replica_healthy{deployment="Ingress",replica="b"} 1\n'
    )
    port = _free_port()
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(args, cwd=served, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(url, timeout=1).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.1)


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bench", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_smoke_run_produces_every_report_and_passes(
    bench_target: str, metrics_url: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    out = tmp_path / "out"
    args = ["--duration", "4s", "--out", str(out), "--metrics-url", metrics_url]
    done = _bench("run", "smoke", "--host", bench_target, *args, "--metrics-interval", "1s")
    assert time.monotonic() - started < 20
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS (exit 0)" in done.stdout
    for name in ("result.json", "windows.csv", "requests.csv", "summary.txt", "report.html"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "result.json").read_text())
    summary = result["summary"]
    assert summary["requests"] >= 20 and summary["errors"] == 0
    assert summary["streams"] > 0 and summary["ttft_ms"]["p50"] is not None
    assert summary["itl_ms"]["p50"] is not None  # chunks timed one by one, not read in a lump
    assert set(summary["kinds"]) == {"repeat", "paraphrase", "unique"}
    assert "sk-local" not in (out / "run_config.json").read_text()
    replicas = result["metrics"]["ray_serve_deployment_replica_healthy{deployment=Ingress}"]
    assert len(replicas) >= 3 and {v for _, v in replicas} == {2.0}
    assert "Replicas (Prometheus)" in (out / "report.html").read_text()


def test_impossible_slo_fails_the_run(bench_target: str, tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("slo:\n  latency_p50_ms: 0.001\n  error_rate_max: 0.0\n")
    out = tmp_path / "out"
    done = _bench(
        "run",
        "smoke",
        "--host",
        bench_target,
        "--duration",
        "3s",
        "--slo",
        str(slo),
        "--out",
        str(out),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[FAIL] latency p50 ms" in done.stdout
    report = json.loads((out / "result.json").read_text())
    assert report["verdict"]["outcome"] == "fail"
    assert [c["name"] for c in report["verdict"]["checks"] if c["outcome"] == "fail"] == [
        "latency p50 ms"
    ]


def test_unreachable_host_is_an_error_not_a_pass(tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{_free_port()}"
    done = _bench("run", "smoke", "--host", host, "--duration", "2s", "--out", str(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr  # every request failed: error rate 100 %
    assert "connection" in done.stdout


def test_compare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def write(name: str, scale: float) -> Path:
        windows = [{"requests": 9, "p95": (90 + i) * scale, "rps": 10.0} for i in range(10)]
        summary = {"latency_ms": {"p95": 95 * scale}, "rps": 10.0, "error_rate": 0.0}
        path = tmp_path / name
        path.write_text(json.dumps({"summary": summary, "windows": windows}))
        return path

    base, slower = write("base.json", 1.0), write("slow.json", 1.5)
    assert main(["compare", str(base), str(base)]) == 0
    assert main(["compare", str(base), str(slower)]) == 1
    assert "REGRESSION: latency_p95_ms" in capsys.readouterr().out


def test_list_and_missing_scale_sim(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("baseline", "stress", "spike", "peak", "scale", "soak", "replay", "breaker"):
        assert f"\n{name} " in "\n" + listed
    if not (ROOT / "bench" / "scale_sim.py").exists():
        assert main(["scale-sim", "--help"]) == 2
        assert "scale_sim.py is missing" in capsys.readouterr().err
