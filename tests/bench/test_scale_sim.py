"""scale_sim: traces, the cluster model's delays, and the report."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from bench.scale_sim import (
    SimParams,
    load_csv,
    main,
    named_trace,
    project_p95,
    simulate,
    summarise,
)
from serve_app.autoscaling_policy import MultiSignalPolicy

FAST = SimParams(
    capacity_rps=50.0,
    upscale_delay_s=10.0,
    downscale_delay_s=60.0,
    look_back_s=10.0,
    pod_start_s=20.0,
    node_provision_s=60.0,
    replica_start_s=5.0,
)


def policy() -> MultiSignalPolicy:
    return MultiSignalPolicy(redis_url_env=None)


def step(low: float, high: float, at: int, until: int, end: int) -> list[tuple[float, float]]:
    return [(float(t), high if at <= t < until else low) for t in range(end)]


def test_csv_is_resampled_per_second_and_header_skipped(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("t_seconds,rps\n0,10\n3,40\n5,5\n")
    assert load_csv(path) == [(0, 10), (1, 10), (2, 10), (3, 40), (4, 40), (5, 5)]


def test_named_shapes_and_unknown_names() -> None:
    trace = named_trace("step", base_rps=10.0)
    assert trace[0][1] == 10.0 and trace[400][1] == 100.0
    with pytest.raises(ValueError, match="unknown shape"):
        named_trace("sawtooth", base_rps=1.0)


def test_p95_grows_with_utilisation_and_queue() -> None:
    idle, _ = project_p95(5.0, ready=2, queue=0.0, p=FAST)
    busy, _ = project_p95(90.0, ready=2, queue=0.0, p=FAST)
    queued, _ = project_p95(90.0, ready=2, queue=500.0, p=FAST)
    assert idle < busy < queued


def test_load_within_capacity_keeps_one_replica() -> None:
    ticks = simulate([(float(t), 10.0) for t in range(120)], FAST, policy())
    assert {k.ready for k in ticks} == {1}
    assert max(k.queue for k in ticks) == 0.0


def test_step_waits_for_delay_pod_and_replica_start_then_drains() -> None:
    params = replace(FAST, replicas_per_pod=1, pods_per_node=100)  # every replica needs a pod
    ticks = simulate(step(10.0, 200.0, at=30, until=400, end=600), params, policy())
    first_more = next(k.t for k in ticks if k.ready > 1)
    earliest = 30 + params.upscale_delay_s + params.pod_start_s + params.replica_start_s
    assert earliest <= first_more <= earliest + 3
    during = [k for k in ticks if 300 <= k.t < 400]
    assert min(k.ready for k in during) * params.capacity_rps >= 200.0
    assert during[-1].queue == 0.0
    assert ticks[-1].target < max(k.target for k in ticks)  # scaled back down after the step


def test_node_provisioning_adds_to_the_wait() -> None:
    params = replace(FAST, replicas_per_pod=1, pods_per_node=1)
    ticks = simulate(step(10.0, 200.0, at=30, until=300, end=300), params, policy())
    first_more = next(k.t for k in ticks if k.ready > 1)
    assert first_more >= 30 + params.upscale_delay_s + params.node_provision_s + params.pod_start_s
    assert max(k.nodes for k in ticks) >= 4


def test_more_capacity_per_replica_needs_fewer_replicas() -> None:
    trace = step(10.0, 400.0, at=30, until=400, end=450)
    small = summarise(simulate(trace, FAST, policy()), FAST)
    big_params = replace(FAST, capacity_rps=200.0)
    big = summarise(simulate(trace, big_params, policy()), big_params)
    assert big["worst_p95_s"] < small["worst_p95_s"]
    assert big["peak_queue"] < small["peak_queue"]


def test_main_prints_sizing_and_writes_svg_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("".join(f"{t},{5 if t < 60 else 40}\n" for t in range(180)))
    out = tmp_path / "report.html"
    assert main([str(trace), "--scales", "1,10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert " 1x" in printed and "10x" in printed
    text = out.read_text()
    svgs = text.count("<svg")
    assert svgs == 8  # 4 charts per scale
    first = text[text.index("<svg") : text.index("</svg>") + 6]
    ET.fromstring(first)  # well-formed
