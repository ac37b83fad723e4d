"""Traffic shapes: how many simulated users are active at second ``t`` of a run.

Pure functions of elapsed time (no locust, no gevent), so they are unit-tested
directly; ``bench/locustfile.py`` wraps whichever one a scenario picks in a
locust ``LoadTestShape``. ``tick`` returns ``None`` once the run is over.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class ShapeTick:
    users: int
    spawn_rate: float  # users started (or stopped) per second to reach ``users``


class Shape(Protocol):
    duration: float

    def tick(self, t: float) -> ShapeTick | None: ...


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"30s"``, ``"2m"``, ``"1h"``, ``"1.5"`` (seconds) -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 2m, 1h)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _fast_spawn(users: int) -> float:
    # Reach each new level within about a second; locust spawns gradually otherwise.
    return float(max(users, 1))


@dataclass(frozen=True, slots=True)
class Constant:
    users: int
    duration: float

    def tick(self, t: float) -> ShapeTick | None:
        if t >= self.duration:
            return None
        return ShapeTick(self.users, _fast_spawn(self.users))


@dataclass(frozen=True, slots=True)
class Ramp:
    """Linear from ``start_users`` to ``end_users`` over ``duration``."""

    start_users: int
    end_users: int
    duration: float

    def tick(self, t: float) -> ShapeTick | None:
        if t >= self.duration:
            return None
        frac = t / self.duration if self.duration > 0 else 1.0
        users = round(self.start_users + (self.end_users - self.start_users) * frac)
        rate = abs(self.end_users - self.start_users) / max(self.duration, 1e-9)
        return ShapeTick(max(users, 1), max(rate, 1.0))


@dataclass(frozen=True, slots=True)
class Spike:
    """``base_users``, with bursts of ``factor`` x base for ``burst`` s every ``period`` s.

    The first burst starts after one quiet ``period - burst`` so each burst has a
    calm window before it to compare against.
    """

    base_users: int
    duration: float
    factor: float = 4.0
    period: float = 30.0
    burst: float = 8.0

    def tick(self, t: float) -> ShapeTick | None:
        if t >= self.duration:
            return None
        in_burst = (t % self.period) >= (self.period - self.burst)
        users = math.ceil(self.base_users * self.factor) if in_burst else self.base_users
        # Spikes are sudden by definition: start the whole burst at once.
        return ShapeTick(users, float(max(users, 1) * 4))


@dataclass(frozen=True, slots=True)
class Step:
    """``start_users``, plus ``step_users`` every ``step_seconds``, capped at ``max_users``."""

    start_users: int
    step_users: int
    step_seconds: float
    duration: float
    max_users: int = 10_000

    def tick(self, t: float) -> ShapeTick | None:
        if t >= self.duration:
            return None
        users = min(
            self.start_users + self.step_users * int(t // self.step_seconds), self.max_users
        )
        return ShapeTick(users, _fast_spawn(self.step_users))


TraceUnit = Literal["users", "rps"]


@dataclass(frozen=True, slots=True)
class Replay:
    """Replays a recorded trace: points ``(t, value)`` held until the next point.

    With ``unit="rps"`` the value is a request rate; it is turned into a user
    count assuming each user is paced at ``per_user_rps`` (the locustfile then
    uses locust's ``constant_throughput(per_user_rps)`` wait time).
    """

    points: tuple[tuple[float, float], ...]
    unit: TraceUnit = "users"
    per_user_rps: float = 1.0
    duration: float = 0.0  # 0: the last point's time plus one second

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a replay trace needs at least one point")
        if self.duration <= 0:
            object.__setattr__(self, "duration", self.points[-1][0] + 1.0)

    def value_at(self, t: float) -> float:
        current = self.points[0][1]
        for point_t, value in self.points:
            if point_t > t:
                break
            current = value
        return current

    def tick(self, t: float) -> ShapeTick | None:
        if t >= self.duration:
            return None
        value = self.value_at(t)
        users = math.ceil(value / self.per_user_rps) if self.unit == "rps" else round(value)
        return ShapeTick(max(users, 0), _fast_spawn(users))


def load_trace(path: Path, per_user_rps: float = 1.0, duration: float = 0.0) -> Replay:
    """Reads a CSV trace with a header ``t,users`` or ``t,rps`` (t in seconds from start)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: empty trace")
    columns = set(rows[0])
    unit: TraceUnit
    if "users" in columns:
        unit = "users"
    elif "rps" in columns:
        unit = "rps"
    else:
        raise ValueError(f"{path}: header must be t,users or t,rps; got {sorted(columns)}")
    points = sorted((float(row["t"]), float(row[unit])) for row in rows)
    return Replay(tuple(points), unit=unit, per_user_rps=per_user_rps, duration=duration)


def schedule(shape: Shape, step: float = 1.0) -> list[tuple[float, int]]:
    """The planned ``(t, users)`` sequence, for reports and dry runs."""
    out: list[tuple[float, int]] = []
    t = 0.0
    while (tick := shape.tick(t)) is not None:
        out.append((t, tick.users))
        t += step
    return out


_KINDS: dict[str, type] = {
    "constant": Constant,
    "ramp": Ramp,
    "spike": Spike,
    "step": Step,
    "replay": Replay,
}


def to_spec(shape: Shape) -> dict[str, object]:
    """A JSON-able description, handed to the locust subprocess."""
    kind = next(k for k, cls in _KINDS.items() if isinstance(shape, cls))
    params = {name: getattr(shape, name) for name in shape.__dataclass_fields__}  # type: ignore[attr-defined]
    return {"type": kind, "params": params}


def from_spec(spec: dict[str, object]) -> Shape:
    params = dict(spec["params"])  # type: ignore[call-overload]
    if spec["type"] == "replay":
        params["points"] = tuple(tuple(p) for p in params["points"])
    return _KINDS[str(spec["type"])](**params)  # type: ignore[no-any-return]
