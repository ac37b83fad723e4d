"""Custom Ray Serve autoscaling policy: ongoing requests plus the gateway's own signals.

Config (Ray 2.60): ``autoscaling_config.policy: {policy_function:
"serve_app.autoscaling_policy:policy", policy_kwargs: {...}}``. Serve instantiates a *class*
once per deployment with ``policy_kwargs`` and calls the instance every control-loop tick with
an ``AutoscalingContext``; a plain function would get no kwargs, so ``policy`` is the class.
Serve wraps the result with upscaling/downscaling factors, the up/down delays and the
min/max bounds (``ray.serve.autoscaling_policy._apply_autoscaling_config``).

Serve pickles this module *by value* into the controller, which may not be able to import the
rest of ``serve_app``: this module imports only the standard library, pydantic and redis.

Every signal becomes a ratio ``observed / threshold``; the largest ratio drives the decision
(``desired = ceil(current * ratio)``), so scale-down only happens when every signal allows it.
Replica-count changes are detected one tick after Serve applied them (the target moved since the
previous tick) and recorded with the decision that caused them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("ray.serve")

# Custom metric names published by ReplicaStats.snapshot() (record_autoscaling_stats).
METRIC_REQUEST_RATE = "gateway_request_rate"  # req/s completed by the replica
METRIC_ONGOING = "gateway_ongoing_requests"  # in flight in the replica
METRIC_P95_LATENCY = "gateway_latency_p95_s"  # seconds
METRIC_CPU = "gateway_cpu_percent"  # of the replica's CPU allotment
METRIC_MEMORY = "gateway_memory_percent"  # of the replica's memory limit

_STATE_PREV_TARGET = "gateway_prev_target"
_STATE_LAST_DECISION = "gateway_last_decision"
_STATE_LAST_SAMPLE_T = "gateway_last_sample_t"


class PolicySettings(BaseModel):
    """Thresholds (per replica) and knobs; every field may be set through ``policy_kwargs``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_rate_per_replica: float = Field(15.0, gt=0)  # req/s
    queue_depth_per_replica: float = Field(25.0, gt=0)  # requests waiting for a replica
    p95_latency_s: float = Field(1.0, gt=0)
    cpu_percent: float = Field(70.0, gt=0, le=100)
    memory_percent: float = Field(80.0, gt=0, le=100)
    # Latency, CPU and memory do not fall linearly with replicas: cap their step per decision.
    max_step_factor: float = Field(2.0, ge=1)
    tolerance: float = Field(0.1, ge=0, lt=1)  # |ratio - 1| within this: hold
    sample_interval_s: float = Field(5.0, gt=0)  # how often a signal sample is recorded
    redis_url_env: str | None = "REDIS_URL"  # env var (controller) with the URL; None: off
    record_maxlen: int = Field(10_000, gt=0)  # approximate cap per stream


@dataclass(frozen=True, slots=True)
class SignalReading:
    name: str
    value: float
    threshold: float
    ratio: float  # value / threshold, capped for the nonlinear signals


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    current: int
    desired: int
    driver: str  # the signal with the largest ratio, or "none"
    action: str  # "up" | "down" | "hold"
    readings: tuple[SignalReading, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def explain(self) -> str:
        parts = ", ".join(f"{r.name}={r.value:.3g}/{r.threshold:.3g}" for r in self.readings)
        return f"{self.action} {self.current}->{self.desired} driven by {self.driver} ({parts})"


def stream_key(app: str | None, deployment: str, kind: str) -> str:
    """Redis stream of ``kind`` ("events" | "samples"); both streams share one hash tag."""
    return f"gateway:scaling:{{{app or ''}/{deployment}}}:{kind}"


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def _reading(name: str, value: float, threshold: float, cap: float | None) -> SignalReading:
    ratio = value / threshold if threshold > 0 else 0.0
    return SignalReading(name, value, threshold, ratio if cap is None else min(ratio, cap))


def read_signals(
    *,
    current: int,
    total_requests: float,
    queued_requests: float,
    target_ongoing: float,
    custom: Mapping[str, Mapping[Any, float]],
    settings: PolicySettings,
) -> tuple[SignalReading, ...]:
    """One reading per signal that has data; per-replica metrics are averaged over replicas."""
    cap = settings.max_step_factor
    readings = [
        _reading("ongoing", total_requests, target_ongoing * current, None),
        _reading("queue_depth", queued_requests / current, settings.queue_depth_per_replica, None),
    ]
    per_replica = (
        ("request_rate", METRIC_REQUEST_RATE, settings.request_rate_per_replica, None),
        ("p95_latency", METRIC_P95_LATENCY, settings.p95_latency_s, cap),
        ("cpu", METRIC_CPU, settings.cpu_percent, cap),
        ("memory", METRIC_MEMORY, settings.memory_percent, cap),
    )
    for name, metric, threshold, limit in per_replica:
        value = _mean(custom.get(metric, {}).values())
        if value is not None:
            readings.append(_reading(name, value, threshold, limit))
    return tuple(readings)


# Not proportional to load (a replica's baseline memory, the upstream's share of latency): they
# may ask for more replicas, but a low reading is no reason to keep replicas.
UP_ONLY = frozenset({"memory", "p95_latency"})
SINK_RETRY_S = 10.0  # how often to look for a store to record scaling events in


def decide(
    current: int, readings: tuple[SignalReading, ...], settings: PolicySettings
) -> ScalingDecision:
    """The replica count the strongest signal asks for (before Serve's delays and bounds)."""
    if current <= 0 or not readings:
        return ScalingDecision(current, current, "none", "hold", readings)
    top = max(readings, key=lambda r: r.ratio)
    if top.ratio > 1.0 + settings.tolerance:
        desired = max(current + 1, math.ceil(current * top.ratio))
        return ScalingDecision(current, desired, top.name, "up", readings)
    if top.ratio >= 1.0 - settings.tolerance:
        return ScalingDecision(current, current, top.name, "hold", readings)
    load = [r for r in readings if r.name not in UP_ONLY] or list(readings)
    top = max(load, key=lambda r: r.ratio)
    desired = max(1, math.ceil(current * top.ratio))
    action = "down" if desired < current else "hold"
    return ScalingDecision(current, desired, top.name, action, readings)


class _RecordSink:
    """Writes records to Redis from a daemon thread with its own event loop.

    The policy runs inside the controller's control loop: it must never block on the network,
    and a failing Redis must never stop scaling, so records are queued and dropped on error.
    """

    def __init__(self, url: str, maxlen: int) -> None:
        self._url = url
        self._maxlen = maxlen
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._run, name="gateway-scaling-record", daemon=True).start()
        self._ready.wait(timeout=5)

    def submit(self, key: str, payload: dict[str, Any]) -> None:
        if self._queue is not None:
            self._loop.call_soon_threadsafe(self._offer, (key, payload))

    def wait_idle(self, timeout: float) -> None:
        """Block until every submitted record was written or dropped (tests, shutdown)."""
        if self._queue is not None:
            asyncio.run_coroutine_threadsafe(self._queue.join(), self._loop).result(timeout)

    def close(self) -> None:
        if self._queue is not None:
            self._loop.call_soon_threadsafe(self._offer, None)

    def _offer(self, item: tuple[str, dict[str, Any]] | None) -> None:
        assert self._queue is not None
        if self._queue.full():
            self._queue.get_nowait()  # keep the newest records
            self._queue.task_done()
        self._queue.put_nowait(item)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._drain())
        self._loop.close()

    async def _drain(self) -> None:
        import redis.asyncio as aioredis

        self._queue = asyncio.Queue(maxsize=1000)
        self._ready.set()
        client = aioredis.from_url(self._url, socket_timeout=2, socket_connect_timeout=2)
        try:
            while (item := await self._queue.get()) is not None:
                try:
                    await append_record(client, item[0], item[1], self._maxlen)
                except Exception as exc:  # recording is best effort; scaling goes on
                    logger.warning("scaling record to Redis failed: %r", exc)
                finally:
                    self._queue.task_done()
            self._queue.task_done()
        finally:
            await client.aclose()


async def append_record(client: Any, key: str, payload: Mapping[str, Any], maxlen: int) -> None:
    """Append one JSON record to a capped stream (``client`` is a ``redis.asyncio.Redis``)."""
    await client.xadd(key, {"json": orjson.dumps(payload)}, maxlen=maxlen, approximate=True)


class MultiSignalPolicy:
    """Serve autoscaling policy; one instance per deployment, called every tick."""

    def __init__(
        self,
        *,
        request_rate_per_replica: float = 15.0,
        queue_depth_per_replica: float = 25.0,
        p95_latency_s: float = 1.0,
        cpu_percent: float = 70.0,
        memory_percent: float = 80.0,
        max_step_factor: float = 2.0,
        tolerance: float = 0.1,
        sample_interval_s: float = 5.0,
        redis_url_env: str | None = "REDIS_URL",
        record_maxlen: int = 10_000,
    ) -> None:
        self.settings = PolicySettings(
            request_rate_per_replica=request_rate_per_replica,
            queue_depth_per_replica=queue_depth_per_replica,
            p95_latency_s=p95_latency_s,
            cpu_percent=cpu_percent,
            memory_percent=memory_percent,
            max_step_factor=max_step_factor,
            tolerance=tolerance,
            sample_interval_s=sample_interval_s,
            redis_url_env=redis_url_env,
            record_maxlen=record_maxlen,
        )
        self._sink: _RecordSink | None = None
        self._next_sink_check = 0.0

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state)
        now = float(ctx.current_time)
        self._record_change(ctx, state, now)
        readings = (
            read_signals(
                current=ctx.current_num_replicas,
                total_requests=float(ctx.total_num_requests),
                queued_requests=float(ctx.total_queued_requests or 0.0),
                target_ongoing=float(ctx.config.get_target_ongoing_requests()),
                custom=ctx.aggregated_metrics or {},
                settings=self.settings,
            )
            if ctx.current_num_replicas > 0
            else ()
        )
        decision = decide(ctx.current_num_replicas, readings, self.settings)
        if now - state.get(_STATE_LAST_SAMPLE_T, -math.inf) >= self.settings.sample_interval_s:
            state[_STATE_LAST_SAMPLE_T] = now
            sample = {"t": now, "target": ctx.target_num_replicas, **decision.to_dict()}
            self._emit(stream_key(ctx.app_name, ctx.deployment_name, "samples"), sample)
        state[_STATE_PREV_TARGET] = ctx.target_num_replicas
        state[_STATE_LAST_DECISION] = decision.to_dict()
        return decision.desired, state

    def _record_change(self, ctx: Any, state: dict[str, Any], now: float) -> None:
        previous = state.get(_STATE_PREV_TARGET)
        if previous is None or previous == ctx.target_num_replicas:
            return
        cause = state.get(_STATE_LAST_DECISION) or {}
        event = {
            "t": now,
            "deployment": ctx.deployment_name,
            "app": ctx.app_name,
            "from": previous,
            "to": ctx.target_num_replicas,
            "driver": cause.get("driver", "unknown"),
            "decision": cause,
        }
        logger.info(
            "autoscaling %s/%s: %s -> %s driven by %s",
            ctx.app_name,
            ctx.deployment_name,
            previous,
            ctx.target_num_replicas,
            event["driver"],
        )
        self._emit(stream_key(ctx.app_name, ctx.deployment_name, "events"), event)

    def _emit(self, key: str, payload: dict[str, Any]) -> None:
        if self._sink is None and time.monotonic() >= self._next_sink_check:
            # The embedded store may start after the first tick: look again now and then.
            self._next_sink_check = time.monotonic() + SINK_RETRY_S
            env = self.settings.redis_url_env
            url = (os.environ.get(env) if env else None) or _embedded_store_url()
            if url:
                self._sink = _RecordSink(url, self.settings.record_maxlen)
        if self._sink is not None:
            self._sink.submit(key, payload)


def _embedded_store_url() -> str | None:
    """The gateway's embedded Valkey, when no REDIS_URL is set (a local `make run`)."""
    try:
        import ray

        actor = ray.get_actor("llm-gateway-embedded-store", namespace="llm_gateway")
        return str(ray.get(actor.url.remote(), timeout=0.5))
    except Exception:  # not started (yet), or not on Ray at all
        return None


# Serve instantiates classes with policy_kwargs; keep the import path the docs use.
policy = MultiSignalPolicy
