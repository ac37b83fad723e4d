"""Replay a traffic trace through a model of the autoscaling stack, to size a cluster.

``python -m bench scale-sim TRACE [--scales 1,10,100] [--capacity 80] [--out scale.html]``

TRACE is a CSV of ``t_seconds,rps`` or a named shape (step, ramp, spike, diurnal). Each second:
the gateway's own policy (``serve_app.autoscaling_policy``) sees the look-back averages of the
signals a replica would report, Ray's delay and scaling-factor logic turns its answer into a
target, replicas start on Ray worker pods (pod start-up), pods on nodes (node provisioning).
Load beyond ``replicas x capacity`` queues; p95 is projected from utilisation and queue.
The latency model is a sizing aid, not a measurement: feed it the capacity the benchmarks measure.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray.serve.autoscaling_policy import _apply_delay_logic, _apply_scaling_factors
from ray.serve.config import AutoscalingConfig

from serve_app.autoscaling_policy import (
    METRIC_CPU,
    METRIC_MEMORY,
    METRIC_P95_LATENCY,
    METRIC_REQUEST_RATE,
    MultiSignalPolicy,
)
from serve_app.scaling_record import ScalingSample, judge

Trace = list[tuple[float, float]]  # (t seconds, req/s), t ascending


@dataclass(frozen=True, slots=True)
class SimParams:
    capacity_rps: float = 80.0  # req/s one replica serves at its latency floor (measure it)
    base_p95_s: float = 0.05  # gateway p95 at low load
    cpu_at_capacity: float = 90.0  # replica CPU % when fully busy
    memory_percent: float = 35.0
    replicas_per_pod: int = 4  # Serve replicas per Ray worker pod (pod CPUs / num_cpus)
    pods_per_node: int = 4
    replica_start_s: float = 5.0
    pod_start_s: float = 40.0  # image pull + Ray start
    node_provision_s: float = 90.0  # cluster autoscaler / Karpenter
    pod_idle_timeout_s: float = 120.0  # KubeRay idleTimeoutSeconds
    min_replicas: int = 1
    max_replicas: int = 1000
    target_ongoing: float = 32.0
    look_back_s: float = 30.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0


@dataclass(slots=True)
class Tick:
    t: float
    rps: float
    ready: int
    target: int
    pods: int
    nodes: int
    queue: float
    p95_s: float
    driver: str


@dataclass(slots=True)
class Cluster:
    """Replica, pod and node start times; ``inf``-free lists of ready times."""

    replicas: list[float] = field(default_factory=list)
    pods: list[float] = field(default_factory=list)
    nodes: list[float] = field(default_factory=list)
    pod_idle_since: float | None = None

    def ready(self, items: list[float], t: float) -> int:
        return sum(1 for r in items if r <= t)

    def scale_to(self, target: int, t: float, p: SimParams) -> None:
        while len(self.replicas) > target:  # starting replicas go first
            self.replicas.remove(max(self.replicas))
        while len(self.replicas) < target:
            slot = len(self.replicas) // p.replicas_per_pod
            if slot >= len(self.pods):
                self._add_pod(t, p)
            self.replicas.append(max(t, sorted(self.pods)[slot]) + p.replica_start_s)
        self._release_pods(t, p)

    def _add_pod(self, t: float, p: SimParams) -> None:
        node_slot = len(self.pods) // p.pods_per_node
        if node_slot >= len(self.nodes):
            self.nodes.append(t + p.node_provision_s)
        self.pods.append(max(t, sorted(self.nodes)[node_slot]) + p.pod_start_s)

    def _release_pods(self, t: float, p: SimParams) -> None:
        needed = math.ceil(len(self.replicas) / p.replicas_per_pod)
        if len(self.pods) <= needed:
            self.pod_idle_since = None
            return
        self.pod_idle_since = self.pod_idle_since if self.pod_idle_since is not None else t
        if t - self.pod_idle_since >= p.pod_idle_timeout_s:
            self.pods = sorted(self.pods)[:needed]
            self.pod_idle_since = None


def project_p95(rps: float, ready: int, queue: float, p: SimParams) -> tuple[float, float]:
    """(p95 seconds, utilisation): an M/M/1-like stretch of the floor plus the queue's wait."""
    capacity = ready * p.capacity_rps
    if capacity <= 0:
        return math.inf, 1.0
    rho = min(rps / capacity, 0.98)
    return p.base_p95_s / (1.0 - rho) + queue / capacity, rho


def _policy_context(
    state: dict[str, Any],
    t: float,
    ready: int,
    target: int,
    window: deque[dict[str, float]],
    config: AutoscalingConfig,
) -> Any:
    mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
    custom = {
        METRIC_REQUEST_RATE: {"r": mean["rate"]},
        METRIC_P95_LATENCY: {"r": mean["p95"]},
        METRIC_CPU: {"r": mean["cpu"]},
        METRIC_MEMORY: {"r": mean["memory"]},
    }
    return SimpleNamespace(
        app_name="sim",
        deployment_name="Gateway",
        current_num_replicas=ready,
        target_num_replicas=target,
        total_num_requests=mean["ongoing"],
        total_queued_requests=mean["queue"],
        aggregated_metrics=custom,
        policy_state=state,
        current_time=t,
        config=config,
    )


def simulate(trace: Trace, p: SimParams, policy: MultiSignalPolicy) -> list[Tick]:
    config = AutoscalingConfig(
        min_replicas=p.min_replicas,
        max_replicas=p.max_replicas,
        target_ongoing_requests=p.target_ongoing,
        look_back_period_s=p.look_back_s,
        metrics_interval_s=1.0,  # the simulation samples every second
        upscale_delay_s=p.upscale_delay_s,
        downscale_delay_s=p.downscale_delay_s,
    )
    cluster = Cluster(nodes=[-math.inf], pods=[-math.inf])  # the initial pod is up
    cluster.scale_to(p.min_replicas, -p.replica_start_s, p)
    window: deque[dict[str, float]] = deque(maxlen=max(1, int(p.look_back_s)))
    state: dict[str, Any] = {}
    target, queue, ticks = p.min_replicas, 0.0, []
    for t, rps in trace:
        ready = cluster.ready(cluster.replicas, t)
        capacity = ready * p.capacity_rps
        queue = max(0.0, queue + rps - capacity)
        p95, rho = project_p95(rps, ready, queue, p)
        per = max(ready, 1)
        window.append(
            {
                "rate": min(rps, capacity) / per,
                "p95": min(p95, 60.0),
                "cpu": rho * p.cpu_at_capacity,
                "memory": p.memory_percent,
                "queue": queue,
                "ongoing": min(rps, capacity) * p.base_p95_s / 3 / (1 - rho) + queue,
            }
        )
        driver = "none"
        if ready > 0:
            desired, state = policy(_policy_context(state, t, ready, target, window, config))
            driver = state["gateway_last_decision"]["driver"]
            desired = _apply_scaling_factors(desired, ready, config)
            desired, state = _apply_delay_logic(desired, target, config, state, _now=t)
            target = min(max(desired, p.min_replicas), p.max_replicas)
            cluster.scale_to(target, t, p)
        ticks.append(
            Tick(
                t,
                rps,
                ready,
                target,
                cluster.ready(cluster.pods, t),
                cluster.ready(cluster.nodes, t),
                queue,
                p95,
                driver,
            )
        )
    return ticks


def summarise(ticks: list[Tick], p: SimParams, slo_p95_s: float = 1.0) -> dict[str, Any]:
    needed = [
        ScalingSample(
            k.t,
            k.ready,
            k.target,
            math.ceil(k.rps / p.capacity_rps / 0.8),
            k.driver,
            {"p95_latency": min(k.p95_s, 1e6)},
        )
        for k in ticks
    ]
    verdict = judge(needed)
    return {
        "peak_rps": max(k.rps for k in ticks),
        "peak_replicas": max(k.ready for k in ticks),
        "peak_pods": max(k.pods for k in ticks),
        "peak_nodes": max(k.nodes for k in ticks),
        "peak_queue": max(k.queue for k in ticks),
        "worst_p95_s": max(k.p95_s for k in ticks),
        "seconds_over_slo": sum(1 for k in ticks if k.p95_s > slo_p95_s),
        "worst_seconds_to_enough": verdict.worst_seconds_to_enough,
    }


def named_trace(name: str, base_rps: float, duration_s: int = 1800) -> Trace:
    def rate(t: float) -> float:
        if name == "step":  # quiet, then 10x for 10 minutes, then quiet
            return base_rps * (10.0 if 300 <= t < 900 else 1.0)
        if name == "ramp":
            return base_rps * (1.0 + 9.0 * min(t / (duration_s * 0.6), 1.0))
        if name == "spike":  # 30 s bursts of 20x every 5 minutes
            return base_rps * (20.0 if t % 300 >= 270 else 1.0)
        if name == "diurnal":
            return base_rps * (1.0 + 4.0 * (1 - math.cos(2 * math.pi * t / duration_s)) / 2)
        raise ValueError(f"unknown shape {name!r}: step, ramp, spike, diurnal or a CSV path")

    return [(float(t), rate(t)) for t in range(duration_s)]


def load_csv(path: Path) -> Trace:
    """``t_seconds,rps`` rows (a header row is skipped), resampled to one point per second."""
    points = []
    with path.open() as handle:
        for row in csv.reader(handle):
            try:
                points.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                continue
    if not points:
        raise ValueError(f"{path}: no t_seconds,rps rows")
    points.sort()
    trace, i = [], 0
    for t in range(int(points[0][0]), int(points[-1][0]) + 1):
        while i + 1 < len(points) and points[i + 1][0] <= t:
            i += 1
        trace.append((float(t), points[i][1]))  # step-hold between samples
    return trace


def load_trace(spec: str, base_rps: float) -> Trace:
    path = Path(spec)
    return load_csv(path) if path.exists() else named_trace(spec, base_rps)


def main(argv: list[str]) -> int:
    from bench.scale_report import render_html, text_table

    parser = argparse.ArgumentParser(prog="python -m bench scale-sim", description=__doc__)
    parser.add_argument("trace", help="CSV of t_seconds,rps, or step|ramp|spike|diurnal")
    parser.add_argument("--scales", default="1,10,100", help="load multipliers to size for")
    parser.add_argument("--base-rps", type=float, default=20.0, help="today's load (shapes)")
    parser.add_argument("--capacity", type=float, default=80.0, help="req/s per replica")
    parser.add_argument("--replicas-per-pod", type=int, default=4)
    parser.add_argument("--pods-per-node", type=int, default=4)
    parser.add_argument("--pod-start", type=float, default=40.0)
    parser.add_argument("--node-provision", type=float, default=90.0)
    parser.add_argument("--upscale-delay", type=float, default=30.0)
    parser.add_argument("--max-replicas", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="write an HTML report with SVG charts")
    args = parser.parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the policy logs every change
    params = SimParams(
        capacity_rps=args.capacity,
        replicas_per_pod=args.replicas_per_pod,
        pods_per_node=args.pods_per_node,
        pod_start_s=args.pod_start,
        node_provision_s=args.node_provision,
        upscale_delay_s=args.upscale_delay,
        max_replicas=args.max_replicas,
    )
    trace = load_trace(args.trace, args.base_rps)
    runs = {}
    for scale in (float(s) for s in args.scales.split(",")):
        scaled = [(t, rps * scale) for t, rps in trace]
        ticks = simulate(scaled, params, MultiSignalPolicy(redis_url_env=None))
        runs[scale] = (ticks, summarise(ticks, params))
    print(text_table({scale: summary for scale, (_, summary) in runs.items()}))
    if args.out:
        args.out.write_text(render_html(args.trace, params, runs))
        print(f"wrote {args.out}")
    return 0
