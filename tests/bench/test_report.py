import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.analyze import build_report, exit_code
from bench.html import render_html
from bench.records import REQUESTS_FILE, USERS_FILE
from bench.report import render_text, write_all
from bench.runner import RawOutcome, RunOptions
from bench.scenarios import SCENARIOS
from bench.shapes import Constant
from bench.slo import SLO
from tests.bench.helpers import rec

T0 = 1_700_000_000.0
REPLICAS = "ray_serve_deployment_replica_healthy{deployment=Ingress}"


def _run_dir(tmp_path: Path, n: int = 200, latency: float = 20.0) -> Path:
    lines = []
    for i in range(n):
        kind = "repeat" if i % 2 else "unique"
        cache = "HIT" if kind == "repeat" else "MISS"
        r = rec(
            T0 + i * 0.05,
            3.0 if cache == "HIT" else latency,
            kind=kind,
            cache=cache,
            cost=0.0001,
            stream=i % 5 == 0,
            ttft_ms=12.0 if i % 5 == 0 else None,
        )
        lines.append(r.to_json())
    (tmp_path / REQUESTS_FILE).write_text("\n".join(lines) + "\n")
    users = [{"t": T0 + s, "users": 4} for s in range(10)] + [{"t": T0 + 10, "users": 0}]
    (tmp_path / USERS_FILE).write_text("\n".join(json.dumps(u) for u in users) + "\n")
    return tmp_path


def _report(tmp_path: Path, scenario: str = "smoke", slo: SLO | None = None, **obs: object) -> dict:
    opts = RunOptions(
        SCENARIOS[scenario], "http://gw", tmp_path, slo or SLO(latency_p95_ms=100), "test.yaml"
    )
    metrics = {REPLICAS: [(T0 + 1.5, 1.0), (T0 + 6, 3.0)]}
    outcome = RawOutcome(Constant(4, 10), 0, metrics, {}, dict(obs))
    return build_report(opts, outcome)


def test_build_report_summary_and_verdict(tmp_path: Path) -> None:
    report = _report(_run_dir(tmp_path))
    assert report["summary"]["requests"] == 200
    assert report["duration_s"] == 10.0
    assert report["metrics"][REPLICAS] == [[1.5, 1.0], [6.0, 3.0]]  # rebased on the run start
    assert report["verdict"]["outcome"] == "pass" and exit_code(report) == 0


def test_breached_slo_exits_1_and_no_requests_exits_2(tmp_path: Path) -> None:
    report = _report(_run_dir(tmp_path, latency=500.0), slo=SLO(latency_p99_ms=100))
    assert (report["verdict"]["outcome"], exit_code(report)) == ("fail", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert exit_code(_report(empty)) == 2


def test_a_warmup_is_charted_but_not_judged(tmp_path: Path) -> None:
    """Slow requests in the first seconds after a fresh start (pools, replicas, caches
    warming up) breach the SLO unless ``--warmup`` leaves them out of the verdict."""
    lines = [rec(T0 + i * 0.05, 900.0 if i < 40 else 20.0).to_json() for i in range(200)]
    (tmp_path / REQUESTS_FILE).write_text("\n".join(lines) + "\n")
    (tmp_path / USERS_FILE).write_text(json.dumps({"t": T0 + 10, "users": 0}) + "\n")
    slo = SLO(latency_p95_ms=100)
    assert _report(tmp_path, slo=slo)["verdict"]["outcome"] == "fail"
    opts = RunOptions(SCENARIOS["smoke"], "http://gw", tmp_path, slo, "test.yaml", warmup_s=2.5)
    report = build_report(opts, RawOutcome(Constant(4, 10), 0, {}, {}, {}))
    assert report["verdict"]["outcome"] == "pass" and report["warmup_s"] == 2.5
    assert report["summary"]["requests"] == 150 and report["summary"]["rps"] == 20.0
    assert sum(w["requests"] for w in report["windows"]) == 200  # all of it charted
    assert "; the first 2.5 s left out" in render_text(report)


def test_criteria_scenarios_gate_on_criteria(tmp_path: Path) -> None:
    report = _report(_run_dir(tmp_path), scenario="scale", slo=SLO(latency_p99_ms=1))
    assert report["verdict"]["slo_passed"] is False
    assert report["verdict"]["criteria"][0]["outcome"] == "pass"  # 1 -> 3 replicas
    assert exit_code(report) == 0
    breaker = _report(tmp_path, scenario="breaker")
    assert (breaker["verdict"]["outcome"], exit_code(breaker)) == ("inconclusive", 3)


def test_text_summary(tmp_path: Path) -> None:
    text = render_text(_report(_run_dir(tmp_path)))
    assert text.startswith("bench smoke against http://gw: PASS (exit 0)")
    assert "200 requests in 10.0 s = 20.0 req/s; 0 errors" in text
    assert "[ok  ] latency p95 ms" in text


def test_write_all_produces_every_report(tmp_path: Path) -> None:
    report = _report(_run_dir(tmp_path))
    paths = write_all(report, tmp_path / "out", run_dir=tmp_path)
    assert set(paths) == {"json", "windows_csv", "text", "html", "requests_csv"}
    assert json.loads(paths["json"].read_text())["scenario"] == "smoke"
    rows = list(csv.DictReader(paths["windows_csv"].open()))
    assert len(rows) == len(report["windows"]) == 10
    # A gauge holds its last scraped value until the window's end; nothing before the 1st scrape.
    assert [rows[i][REPLICAS] for i in (0, 1, 5, 9)] == ["", "1.0", "3.0", "3.0"]
    assert len(list(csv.DictReader(paths["requests_csv"].open()))) == 200


def test_html_is_self_contained_with_valid_svg_charts(tmp_path: Path) -> None:
    fault = {"start_epoch": T0 + 3, "end_epoch": T0 + 6, "hang_s": 2.0, "upstream_calls": 1}
    html = render_html(_report(_run_dir(tmp_path), fault=fault))
    assert not re.search(r"<script|<link|src=|@import|url\(", html)
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    titles = [ET.fromstring(s).attrib["aria-label"] for s in svgs]
    assert titles[:3] == ["Latency per window (successful requests)", "Throughput", "Active users"]
    assert "Replicas (Prometheus)" in titles
    assert "injected upstream fault" in html
    assert "Verdict: PASS" in html


@pytest.mark.parametrize("outcome", ["pass", "fail", "inconclusive"])
def test_verdict_banner_class(tmp_path: Path, outcome: str) -> None:
    report = _report(_run_dir(tmp_path))
    report["verdict"]["outcome"] = outcome
    assert f'class="verdict {outcome}"' in render_html(report)
