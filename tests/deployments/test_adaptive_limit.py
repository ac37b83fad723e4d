from __future__ import annotations

import pytest

from deployments.adaptive_limit import AdaptiveLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_healthy_stage_is_never_held_back() -> None:
    limit = AdaptiveLimit(8, target_s=0.1)
    assert all(limit.try_acquire() for _ in range(8))
    assert not limit.try_acquire()  # the ceiling holds
    for _ in range(8):
        limit.release(0.01, ok=True)
    assert limit.limit == 8 and limit.in_flight == 0


def test_a_burst_of_slow_answers_halves_once_then_again_after_target() -> None:
    clock = Clock()
    limit = AdaptiveLimit(32, target_s=0.1, clock=clock)
    for _ in range(20):
        assert limit.try_acquire()
    for _ in range(20):
        limit.release(0.5, ok=True)  # all slow, at the same moment: one signal
    assert limit.limit == 16
    clock.now = 0.1
    assert limit.try_acquire()
    limit.release(0.0, ok=False)  # a timeout, one target later
    assert limit.limit == 8
    assert sum(limit.try_acquire() for _ in range(10)) == 8  # the rest are shed at once


def test_it_never_falls_below_the_minimum_and_climbs_back_additively() -> None:
    clock = Clock()
    limit = AdaptiveLimit(4, target_s=0.1, clock=clock)
    for step in range(10):
        clock.now = step
        limit.try_acquire()
        limit.release(1.0, ok=False)
    assert limit.limit == 1
    # One call at a time is all the limit allows; each fast answer adds 1 / limit.
    grown = []
    for _ in range(6):
        while limit.try_acquire():
            pass
        while limit.in_flight:
            limit.release(0.01, ok=True)
        grown.append(round(limit.limit, 2))
    assert grown[0] == 2.0 and grown == sorted(grown) and grown[-1] <= 4


def test_no_growth_while_the_limit_is_not_in_use() -> None:
    clock = Clock()
    limit = AdaptiveLimit(16, target_s=0.1, clock=clock)
    limit.try_acquire()
    limit.release(1.0, ok=True)
    assert limit.limit == 8
    for _ in range(100):  # one call at a time: far below half the limit
        limit.try_acquire()
        limit.release(0.01, ok=True)
    assert limit.limit == 8


def test_an_abandoned_call_frees_its_slot_and_moves_nothing() -> None:
    limit = AdaptiveLimit(4, target_s=0.1)
    assert limit.try_acquire()
    limit.release(5.0, ok=None)  # the client went away mid-lookup
    assert (limit.limit, limit.in_flight) == (4, 0)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimit(2, target_s=0.1, minimum=3)
