"""The named scenarios: a traffic shape, a request mix, and what decides the verdict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.mix import MixConfig
from bench.shapes import Constant, Ramp, Shape, Spike, Step, load_trace


@dataclass(frozen=True, slots=True)
class BuildArgs:
    duration_s: float | None  # None: the scenario's own default
    users: int | None
    trace: Path | None = None


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Make the mock upstream misbehave between two fractions of the run."""

    start_frac: float
    end_frac: float
    payload: dict[str, Any]
    clear: dict[str, Any] = field(default_factory=lambda: {"faults": {}})


@dataclass(frozen=True, slots=True)
class StopOnBreach:
    """Stop a ramp once windows breach the SLO for ``sustain`` checks past ``after_users``."""

    after_users: int
    window_s: float = 5.0
    sustain: int = 2


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    default_duration_s: float
    build_shape: Callable[[BuildArgs, float], Shape]
    mix: MixConfig = field(default_factory=MixConfig)
    criteria: tuple[str, ...] = ()  # names in bench.criteria.CRITERIA
    gate_on_slo: bool = True  # False: the SLO verdict is reported but the criteria decide
    fault: FaultPlan | None = None
    stop_on_breach: StopOnBreach | None = None
    probes: tuple[str, ...] = ()  # post-run HTTP probes (bench.runner.PROBES)

    def shape(self, args: BuildArgs) -> Shape:
        return self.build_shape(args, args.duration_s or self.default_duration_s)


def _users(args: BuildArgs, default: int) -> int:
    return args.users or default


def _constant(default_users: int) -> Callable[[BuildArgs, float], Shape]:
    return lambda a, d: Constant(_users(a, default_users), d)


def _replay(args: BuildArgs, duration: float) -> Shape:
    if args.trace is None:
        raise ValueError("the replay scenario needs --trace FILE (CSV with t,users or t,rps)")
    return load_trace(args.trace, per_user_rps=1.0, duration=args.duration_s or 0.0)


def _spike(args: BuildArgs, duration: float) -> Shape:
    # Two bursts at least, however short the run: a 30 s period shrinks to fit.
    period = min(30.0, duration / 2)
    return Spike(_users(args, 5), duration, factor=4.0, period=period, burst=period * 8 / 30)


_OVERLOAD = {"faults": {"*": {"hang_s": 2.0, "error_rate": 0.5, "error_status": 503}}}

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "baseline",
            "8 users, constant, default mix; the reference run for regressions",
            120,
            _constant(8),
        ),
        Scenario(
            "stress",
            "linear ramp from 1 user to 3x the target (15) until the SLOs break; reports the knee",
            180,
            lambda a, d: Ramp(1, _users(a, 15) * 3, d),
            criteria=("knee_at_least_target",),
            gate_on_slo=False,
            stop_on_breach=StopOnBreach(after_users=15),
        ),
        Scenario(
            "spike",
            "5 users with bursts of 4x (20) for 8 s every 30 s",
            120,
            _spike,
        ),
        Scenario(
            "step",
            "2 users, +2 every 15 s",
            120,
            lambda a, d: Step(_users(a, 2), 2, 15.0, d),
        ),
        Scenario(
            "peak",
            "25 users, 50 end users, 2 models, every --api-key; latency SLOs under load",
            120,
            _constant(25),
            mix=MixConfig(end_users=50, stream_rate=0.3, models=["mock-gpt", "mock-gpt-mini"]),
        ),
        Scenario(
            "scale",
            "100 concurrent users; the replicas must scale up",
            180,
            _constant(100),
            criteria=("replicas_scale_up",),
            gate_on_slo=False,
        ),
        Scenario(
            "soak",
            "8 users for 30 minutes; latency must not drift",
            1800,
            _constant(8),
            criteria=("no_drift",),
        ),
        Scenario(
            "replay",
            "replays a recorded trace (--trace FILE, CSV t,users or t,rps)",
            0,
            _replay,
            mix=MixConfig(per_user_rps=1.0),
        ),
        Scenario(
            "cache",
            "mostly repeated prompts; hits must be served in under 100 ms",
            60,
            _constant(8),
            mix=MixConfig(repeat_rate=0.8, paraphrase_rate=0.1, hot_prompts=5, stream_rate=0.0),
            criteria=("cache_hits_fast",),
        ),
        Scenario(
            "breaker",
            "the mock upstream turns slow and failing from 20 % to 40 % of the run; "
            "the breaker must fail fast, shed upstream calls and recover",
            90,
            _constant(8),
            mix=MixConfig(repeat_rate=0.0, paraphrase_rate=0.0),
            criteria=("breaker_prevents_cascade",),
            gate_on_slo=False,
            fault=FaultPlan(0.2, 0.4, _OVERLOAD),
        ),
        Scenario(
            "cost",
            "every response carries its cost; recommendations appear afterwards",
            30,
            _constant(4),
            mix=MixConfig(stream_rate=0.3),
            criteria=("cost_tracked",),
            probes=("cost_recommendations",),
        ),
        Scenario(
            "smoke",
            "4 users for 8 s; a quick check that the gateway answers",
            8,
            _constant(4),
            mix=MixConfig(repeat_rate=0.5, stream_rate=0.3),
        ),
    )
}
