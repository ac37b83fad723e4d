"""Scaling record: effectiveness judged from synthetic samples; the Redis round trip."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app.autoscaling_policy import METRIC_P95_LATENCY, METRIC_REQUEST_RATE, MultiSignalPolicy
from serve_app.scaling_record import ScalingRecord, ScalingSample, find_load_steps, judge


def sample(t: float, current: int, desired: int, p95: float | None = None) -> ScalingSample:
    readings = {} if p95 is None else {"p95_latency": p95}
    return ScalingSample(t, current, current, desired, "request_rate", readings)


def test_a_load_step_lasts_until_enough_replicas_run() -> None:
    samples = [
        sample(0, 1, 1, 0.2),
        sample(5, 1, 4, 1.8),  # step: 4 needed, 1 running
        sample(10, 2, 5, 2.5),
        sample(15, 5, 5, 0.9),  # enough
        sample(20, 5, 5, 0.3),
    ]
    (step,) = find_load_steps(samples)
    assert (step.t_start, step.t_enough, step.seconds_to_enough) == (5, 15, 10)
    assert (step.replicas_before, step.replicas_needed) == (1, 5)
    assert step.p95_max_s == 2.5


def test_judge_summarises_steps_and_flags_an_open_one() -> None:
    samples = [
        sample(0, 1, 3),
        sample(4, 3, 3),  # 4 s
        sample(10, 3, 6, 1.2),
        sample(20, 6, 6),  # 10 s
        sample(30, 6, 9, 3.0),  # still short at the end
    ]
    verdict = judge(samples)
    assert len(verdict.steps) == 3
    assert (verdict.median_seconds_to_enough, verdict.worst_seconds_to_enough) == (7.0, 10)
    assert verdict.worst_p95_while_scaling_s == 3.0
    assert verdict.open_step


def test_no_steps_when_replicas_always_suffice() -> None:
    verdict = judge([sample(0, 2, 2), sample(5, 2, 1)])
    assert verdict.steps == () and not verdict.open_step
    assert verdict.median_seconds_to_enough is None


def ctx(state: dict[str, Any], now: float, current: int, target: int, rate: float) -> Any:
    config = AutoscalingConfig(min_replicas=1, max_replicas=8)
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Gateway", app_name="gateway"),
        deployment_name="Gateway",
        app_name="gateway",
        current_num_replicas=current,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics={
            METRIC_REQUEST_RATE: {"r": rate},
            METRIC_P95_LATENCY: {"r": 0.4},
        },
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


@pytest.mark.integration
async def test_policy_records_to_redis_and_report_reads_it(
    redis_client: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SCALING_REDIS", redis_url)
    policy = MultiSignalPolicy(redis_url_env="TEST_SCALING_REDIS", sample_interval_s=5.0)
    state: dict[str, Any] = {}
    # A load step at t=5 (45 req/s on one replica = 3x); Serve moves the target at t=10.
    ticks = [(0, 1, 1, 10.0), (5, 1, 1, 45.0), (10, 1, 3, 45.0), (15, 3, 3, 15.0)]
    for now, current, target, rate in ticks:
        _, state = policy(ctx(state, now, current, target, rate))
    assert policy._sink is not None
    policy._sink.wait_idle(timeout=10)
    policy._sink.close()

    record = ScalingRecord(redis_client)
    assert await record.deployments() == [("gateway", "Gateway")]
    (event,) = await record.events("gateway", "Gateway")
    assert (event.t, event.from_replicas, event.to_replicas) == (10, 1, 3)
    assert event.driver == "request_rate"
    assert event.readings["request_rate"] == 45.0
    report = await record.report()
    (entry,) = report["deployments"]
    assert (entry["replicas"], entry["target"]) == (3, 3)
    (step,) = entry["effectiveness"]["steps"]
    assert (step["t_start"], step["seconds_to_enough"], step["replicas_needed"]) == (5, 10, 3)


@pytest.mark.integration
async def test_streams_are_capped(redis_client: aioredis.Redis) -> None:
    record = ScalingRecord(redis_client, maxlen=10)
    for i in range(500):
        payload = {"t": i, "current": 1, "target": 1, "desired": 1, "readings": []}
        await record.append("a", "d", "samples", payload)
    assert await redis_client.xlen("gateway:scaling:{a/d}:samples") < 500
    samples = await record.samples("a", "d", limit=5)
    assert [s.t for s in samples] == [495, 496, 497, 498, 499]
