from itertools import pairwise
from pathlib import Path

import pytest

from bench.scenarios import SCENARIOS, BuildArgs
from bench.shapes import (
    Constant,
    Ramp,
    Replay,
    ShapeTick,
    Spike,
    Step,
    from_spec,
    load_trace,
    parse_duration,
    schedule,
    to_spec,
)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("2m", 120), ("1h", 3600), ("1.5", 1.5), ("250ms", 0.25)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_constant_holds_then_stops() -> None:
    shape = Constant(8, 10)
    assert shape.tick(0).users == 8
    assert shape.tick(9.9).users == 8
    assert shape.tick(10) is None


def test_ramp_is_linear() -> None:
    shape = Ramp(1, 45, 100)
    assert shape.tick(0).users == 1
    assert shape.tick(50).users == 23
    assert shape.tick(99.9).users == 45
    assert shape.tick(100) is None


def test_spike_bursts_to_four_times_base() -> None:
    shape = Spike(5, 60, factor=4, period=30, burst=8)
    assert shape.tick(0).users == 5
    assert shape.tick(21.9).users == 5
    assert shape.tick(22).users == 20  # last 8 s of each 30 s period
    assert shape.tick(29.9).users == 20
    assert shape.tick(30).users == 5
    assert shape.tick(52).users == 20


def test_step_adds_users_each_step_up_to_cap() -> None:
    shape = Step(2, 3, 10, 100, max_users=9)
    assert [shape.tick(t).users for t in (0, 9.9, 10, 20, 30, 90)] == [2, 2, 5, 8, 9, 9]


def test_replay_holds_each_point_until_the_next() -> None:
    shape = Replay(((0.0, 2.0), (5.0, 10.0), (8.0, 4.0)))
    assert shape.duration == 9.0
    assert [shape.tick(t).users for t in (0, 4.9, 5, 7.9, 8)] == [2, 2, 10, 10, 4]
    assert shape.tick(9) is None


def test_replay_in_rps_converts_with_per_user_rate() -> None:
    shape = Replay(((0.0, 5.0), (2.0, 11.0)), unit="rps", per_user_rps=2.0, duration=4)
    assert shape.tick(0) == ShapeTick(3, 3.0)
    assert shape.tick(3).users == 6


def test_load_trace_reads_users_and_rps(tmp_path: Path) -> None:
    users = tmp_path / "users.csv"
    users.write_text("t,users\n10,4\n0,1\n")
    shape = load_trace(users)
    assert shape.points == ((0.0, 1.0), (10.0, 4.0))
    rps = tmp_path / "rps.csv"
    rps.write_text("t,rps\n0,3\n")
    assert load_trace(rps).unit == "rps"
    bad = tmp_path / "bad.csv"
    bad.write_text("time,load\n0,1\n")
    with pytest.raises(ValueError, match="header"):
        load_trace(bad)


def test_spec_round_trip() -> None:
    for shape in (
        Constant(3, 5),
        Ramp(1, 4, 6),
        Spike(2, 9),
        Step(1, 1, 2, 8),
        Replay(((0.0, 1.0),)),
    ):
        assert from_spec(to_spec(shape)) == shape


def test_schedule_lists_the_plan() -> None:
    assert schedule(Ramp(1, 5, 4)) == [(0.0, 1), (1.0, 2), (2.0, 3), (3.0, 4)]


def test_spike_scenario_fits_two_bursts_into_a_short_run() -> None:
    plan = [u for _, u in schedule(SCENARIOS["spike"].shape(BuildArgs(12.0, None)), step=0.5)]
    bursts = sum(1 for prev, cur in pairwise(plan) if cur > prev)
    assert bursts == 2 and max(plan) == 20 and min(plan) == 5
