"""The multi-signal policy on synthetic metrics, alone and inside Serve's own wrapper."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from ray.serve import autoscaling_policy as serve_autoscaling
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from serve_app import autoscaling_policy as ap
from serve_app.autoscaling_policy import (
    METRIC_CPU,
    METRIC_MEMORY,
    METRIC_P95_LATENCY,
    METRIC_REQUEST_RATE,
    MultiSignalPolicy,
    PolicySettings,
    decide,
    read_signals,
    stream_key,
)

SETTINGS = PolicySettings()


def readings(
    current: int = 2,
    total: float = 0.0,
    queued: float = 0.0,
    target: float = 2.0,
    custom: dict[str, dict[str, float]] | None = None,
    settings: PolicySettings = SETTINGS,
) -> tuple[ap.SignalReading, ...]:
    return read_signals(
        current=current,
        total_requests=total,
        queued_requests=queued,
        target_ongoing=target,
        custom=custom or {},
        settings=settings,
    )


def per_replica(metric: str, *values: float) -> dict[str, dict[str, float]]:
    return {metric: {f"r{i}": v for i, v in enumerate(values)}}


@pytest.mark.parametrize(
    ("custom", "driver", "desired"),
    [
        (per_replica(METRIC_REQUEST_RATE, 30.0, 30.0), "request_rate", 4),  # 2x 15 req/s
        (per_replica(METRIC_P95_LATENCY, 1.6, 1.4), "p95_latency", 3),  # 1.5x 1.0 s
        (per_replica(METRIC_CPU, 91.0, 91.0), "cpu", 3),  # 1.3x 70 %
        (per_replica(METRIC_MEMORY, 100.0, 100.0), "memory", 3),  # 1.25x 80 %
    ],
)
def test_each_custom_signal_alone_scales_up(
    custom: dict[str, dict[str, float]], driver: str, desired: int
) -> None:
    decision = decide(2, readings(current=2, custom=custom), SETTINGS)
    assert (decision.driver, decision.action, decision.desired) == (driver, "up", desired)


def test_queue_depth_is_per_replica() -> None:
    decision = decide(2, readings(current=2, queued=100.0), SETTINGS)  # 50 per replica vs 25
    assert (decision.driver, decision.desired) == ("queue_depth", 4)


def test_ongoing_requests_match_serves_default_rule() -> None:
    # Serve's default: desired = current * total / (target * current) = total / target.
    decision = decide(2, readings(current=2, total=12.0, target=2.0), SETTINGS)
    assert (decision.driver, decision.desired) == ("ongoing", 6)


def test_strongest_signal_wins_and_all_are_explained() -> None:
    custom = {**per_replica(METRIC_REQUEST_RATE, 20.0), **per_replica(METRIC_CPU, 140.0)}
    decision = decide(1, readings(current=1, custom=custom, total=1.0), SETTINGS)
    assert decision.driver == "cpu"  # 2.0 (capped) beats request rate 1.33
    assert {r.name for r in decision.readings} == {
        "ongoing",
        "queue_depth",
        "request_rate",
        "cpu",
    }
    assert "driven by cpu" in decision.explain()


def test_nonlinear_signals_are_capped_per_step() -> None:
    decision = decide(
        3, readings(current=3, custom=per_replica(METRIC_P95_LATENCY, 10.0)), SETTINGS
    )
    assert decision.desired == 6  # max_step_factor 2, not 30


def test_downscale_only_as_far_as_the_strongest_signal_allows() -> None:
    custom = per_replica(METRIC_REQUEST_RATE, 3.0, 3.0, 3.0, 3.0)  # 0.2 of the threshold
    quiet = decide(4, readings(current=4, custom=custom), SETTINGS)
    assert (quiet.action, quiet.desired) == ("down", 1)
    busy_cpu = {**custom, **per_replica(METRIC_CPU, 35.0, 35.0, 35.0, 35.0)}  # 0.5
    held = decide(4, readings(current=4, custom=busy_cpu), SETTINGS)
    assert (held.driver, held.desired) == ("cpu", 2)


def test_within_tolerance_holds() -> None:
    decision = decide(
        2, readings(current=2, custom=per_replica(METRIC_REQUEST_RATE, 16.0)), SETTINGS
    )
    assert (decision.action, decision.desired) == ("hold", 2)


def test_thresholds_are_configurable_and_validated() -> None:
    low = PolicySettings(request_rate_per_replica=5.0)
    custom = per_replica(METRIC_REQUEST_RATE, 10.0)
    assert decide(1, readings(current=1, custom=custom, settings=low), low).desired == 2
    assert decide(1, readings(current=1, custom=custom), SETTINGS).desired == 1
    with pytest.raises(ValidationError):
        PolicySettings(cpu_percent=150)
    with pytest.raises(TypeError):
        MultiSignalPolicy(request_rate=3)  # type: ignore[call-arg]


def test_no_data_holds() -> None:
    assert decide(0, (), SETTINGS).action == "hold"


# --- inside Serve: the real AutoscalingPolicy import/pickle path and the delay wrapper ---


def serve_policy(emitted: list[tuple[str, dict[str, Any]]], **kwargs: Any) -> Any:
    """The policy as the controller runs it: unpickled by value, wrapped with delays/bounds."""
    spec = AutoscalingPolicy(
        policy_function="serve_app.autoscaling_policy:policy", policy_kwargs=kwargs
    )
    instance = _resolve_policy_callable(spec)
    instance._emit = lambda key, payload: emitted.append((key, payload))
    return _apply_autoscaling_config(instance)


def context(
    state: dict[str, Any],
    *,
    now: float,
    current: int,
    target: int,
    custom: dict[str, dict[str, float]],
    config: AutoscalingConfig,
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Ingress", app_name="gateway"),
        deployment_name="Ingress",
        app_name="gateway",
        current_num_replicas=current,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=custom,
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


def test_serve_pickles_the_class_and_passes_policy_kwargs() -> None:
    spec = AutoscalingPolicy(
        policy_function="serve_app.autoscaling_policy:policy",
        policy_kwargs={"request_rate_per_replica": 7.5},
    )
    instance = _resolve_policy_callable(spec)
    assert instance.settings.request_rate_per_replica == 7.5


def test_upscale_waits_for_serves_delay_then_change_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emitted: list[tuple[str, dict[str, Any]]] = []
    clock = {"now": 0.0}
    # Serve's delay logic reads time.time() itself, not ctx.current_time.
    monkeypatch.setattr(serve_autoscaling.time, "time", lambda: clock["now"])
    config = AutoscalingConfig(min_replicas=1, max_replicas=10, upscale_delay_s=3.0)
    run = serve_policy(emitted, sample_interval_s=100.0)
    hot = per_replica(METRIC_REQUEST_RATE, 45.0)  # 3x threshold on one replica
    state: dict[str, Any] = {}
    decisions = []
    for now in (0.0, 1.0, 2.0, 3.0):
        clock["now"] = now
        desired, state = run(
            context(state, now=now, current=1, target=1, custom=hot, config=config)
        )
        decisions.append(desired)
    assert decisions == [1, 1, 1, 3]  # Serve's upscale_delay_s still applies
    _, state = run(context(state, now=4.0, current=1, target=3, custom=hot, config=config))
    events = [p for k, p in emitted if k == stream_key("gateway", "Ingress", "events")]
    assert len(events) == 1
    assert (events[0]["from"], events[0]["to"], events[0]["driver"]) == (1, 3, "request_rate")
    samples = [p for k, p in emitted if k.endswith(":samples")]
    assert [s["t"] for s in samples] == [0.0]  # one sample per interval


def test_memory_and_latency_scale_up_but_never_hold_replicas() -> None:
    hot = decide(2, readings(current=2, custom=per_replica(METRIC_MEMORY, 96.0, 96.0)), SETTINGS)
    assert (hot.driver, hot.desired) == ("memory", 3)
    baseline = {
        **per_replica(METRIC_MEMORY, 60.0, 60.0, 60.0, 60.0),  # 0.75: a load-independent floor
        **per_replica(METRIC_P95_LATENCY, 0.7, 0.7, 0.7, 0.7),  # the upstream's share
        **per_replica(METRIC_REQUEST_RATE, 3.0, 3.0, 3.0, 3.0),  # 0.2
    }
    quiet = decide(4, readings(current=4, custom=baseline), SETTINGS)
    assert (quiet.action, quiet.driver, quiet.desired) == ("down", "request_rate", 1)
