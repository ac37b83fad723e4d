"""The scaling record: every replica-count change per deployment, and how well scaling worked.

Writers: ``serve_app.autoscaling_policy`` (in the Serve controller) appends to two capped Redis
streams per deployment, ``events`` (a change: time, from, to, the signals that drove it) and
``samples`` (every few seconds: replicas, the replicas the signals asked for, the readings).
This module reads them and judges effectiveness from the samples: a *load step* starts when the
signals ask for more replicas than run, and ends when enough run; its duration and the p95
latency seen meanwhile say whether autoscaling kept up. ``ScalingRecord.report()`` is the JSON
behind ``GET /admin/scaling``.

Times are the controller's ``time.time()``; one controller writes, so they are consistent.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from serve_app.autoscaling_policy import append_record, stream_key

_PREFIX = "gateway:scaling:"


@dataclass(frozen=True, slots=True)
class ScalingEvent:
    t: float
    app: str | None
    deployment: str
    from_replicas: int
    to_replicas: int
    driver: str  # the signal with the largest ratio when Serve decided
    readings: dict[str, float]  # signal -> observed value at that decision


@dataclass(frozen=True, slots=True)
class ScalingSample:
    t: float
    current: int  # running replicas
    target: int  # Serve's target
    desired: int  # what the signals asked for (before delays and bounds)
    driver: str
    readings: dict[str, float]

    @property
    def p95_latency_s(self) -> float | None:
        return self.readings.get("p95_latency")


@dataclass(frozen=True, slots=True)
class LoadStep:
    t_start: float
    replicas_before: int
    replicas_needed: int  # the most the signals asked for during the step
    t_enough: float | None  # None: not yet enough replicas at the last sample
    seconds_to_enough: float | None
    p95_max_s: float | None  # worst replica-average p95 while scaling
    driver: str


@dataclass(frozen=True, slots=True)
class Effectiveness:
    steps: tuple[LoadStep, ...]
    median_seconds_to_enough: float | None
    worst_seconds_to_enough: float | None
    worst_p95_while_scaling_s: float | None
    open_step: bool  # the last step has not reached enough replicas yet


def _readings(decision: Mapping[str, Any]) -> dict[str, float]:
    return {r["name"]: float(r["value"]) for r in decision.get("readings", ())}


def event_from_record(data: Mapping[str, Any]) -> ScalingEvent:
    return ScalingEvent(
        t=float(data["t"]),
        app=data.get("app"),
        deployment=str(data["deployment"]),
        from_replicas=int(data["from"]),
        to_replicas=int(data["to"]),
        driver=str(data.get("driver", "unknown")),
        readings=_readings(data.get("decision") or {}),
    )


def sample_from_record(data: Mapping[str, Any]) -> ScalingSample:
    return ScalingSample(
        t=float(data["t"]),
        current=int(data["current"]),
        target=int(data["target"]),
        desired=int(data["desired"]),
        driver=str(data.get("driver", "none")),
        readings=_readings(data),
    )


def _close_step(start: ScalingSample, window: Sequence[ScalingSample], done: bool) -> LoadStep:
    latencies = [s.p95_latency_s for s in window if s.p95_latency_s is not None]
    end = window[-1]
    return LoadStep(
        t_start=start.t,
        replicas_before=start.current,
        replicas_needed=max(s.desired for s in window),
        t_enough=end.t if done else None,
        seconds_to_enough=end.t - start.t if done else None,
        p95_max_s=max(latencies) if latencies else None,
        driver=start.driver,
    )


def find_load_steps(samples: Sequence[ScalingSample]) -> list[LoadStep]:
    """Steps in time order: from the first sample short of replicas to the first with enough."""
    steps: list[LoadStep] = []
    window: list[ScalingSample] = []
    for sample in sorted(samples, key=lambda s: s.t):
        short = sample.desired > sample.current
        if window:
            window.append(sample)
            if not short:
                steps.append(_close_step(window[0], window, done=True))
                window = []
        elif short:
            window = [sample]
    if window:
        steps.append(_close_step(window[0], window, done=False))
    return steps


def judge(samples: Sequence[ScalingSample]) -> Effectiveness:
    steps = find_load_steps(samples)
    durations = [s.seconds_to_enough for s in steps if s.seconds_to_enough is not None]
    latencies = [s.p95_max_s for s in steps if s.p95_max_s is not None]
    return Effectiveness(
        steps=tuple(steps),
        median_seconds_to_enough=statistics.median(durations) if durations else None,
        worst_seconds_to_enough=max(durations) if durations else None,
        worst_p95_while_scaling_s=max(latencies) if latencies else None,
        open_step=bool(steps) and steps[-1].t_enough is None,
    )


def _split_key(key: str) -> tuple[str | None, str] | None:
    # gateway:scaling:{app/deployment}:kind
    if not key.startswith(_PREFIX + "{") or "}" not in key:
        return None
    tag = key[len(_PREFIX) + 1 : key.rindex("}")]
    app, _, deployment = tag.partition("/")
    return (app or None), deployment


class ScalingRecord:
    """Reads (and, for other writers and tests, appends to) the per-deployment streams."""

    def __init__(self, client: aioredis.Redis, *, maxlen: int = 10_000) -> None:
        self._client = client
        self._maxlen = maxlen

    async def append(
        self, app: str | None, deployment: str, kind: str, payload: Mapping[str, Any]
    ) -> None:
        await append_record(self._client, stream_key(app, deployment, kind), payload, self._maxlen)

    async def _read(self, key: str, limit: int) -> list[dict[str, Any]]:
        # Newest first from Redis, returned oldest first.
        entries = await self._client.xrevrange(key, count=limit)
        return [orjson.loads(fields[b"json"]) for _, fields in reversed(entries)]

    async def events(
        self, app: str | None, deployment: str, *, limit: int = 100
    ) -> list[ScalingEvent]:
        raw = await self._read(stream_key(app, deployment, "events"), limit)
        return [event_from_record(r) for r in raw]

    async def samples(
        self, app: str | None, deployment: str, *, limit: int = 2_000
    ) -> list[ScalingSample]:
        raw = await self._read(stream_key(app, deployment, "samples"), limit)
        return [sample_from_record(r) for r in raw]

    async def deployments(self) -> list[tuple[str | None, str]]:
        found: set[tuple[str | None, str]] = set()
        async for key in self._client.scan_iter(match=_PREFIX + "*", count=500):
            parsed = _split_key(key.decode() if isinstance(key, bytes) else key)
            if parsed is not None:
                found.add(parsed)
        return sorted(found, key=lambda pair: (pair[0] or "", pair[1]))

    async def report(self, *, events_limit: int = 50) -> dict[str, Any]:
        """JSON-ready: per deployment, the latest changes and the effectiveness verdict."""
        out = []
        for app, deployment in await self.deployments():
            events = await self.events(app, deployment, limit=events_limit)
            samples = await self.samples(app, deployment)
            latest = samples[-1] if samples else None
            out.append(
                {
                    "app": app,
                    "deployment": deployment,
                    "replicas": latest.current if latest else None,
                    "target": latest.target if latest else None,
                    "events": [asdict(e) for e in events],
                    "effectiveness": asdict(judge(samples)),
                }
            )
        return {"deployments": out}
