"""Finagle's RetryBudget: retries as a share of first calls over a window, plus a floor."""

from __future__ import annotations

from deployments.retry_budget import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def withdrawals(budget: RetryBudget, most: int = 1_000) -> int:
    taken = 0
    while taken < most and budget.try_withdraw():
        taken += 1
    return taken


def test_retries_are_a_share_of_first_calls() -> None:
    budget = RetryBudget(percent=0.2, min_per_s=0, window_s=10, clock=Clock())
    assert not budget.try_withdraw()  # nothing deposited, no floor
    for _ in range(100):
        budget.deposit()
    assert withdrawals(budget) == 20
    for _ in range(5):
        budget.deposit()
    assert withdrawals(budget) == 1  # 0.2 x 105 = 21


def test_the_floor_lets_a_quiet_upstream_retry() -> None:
    clock = Clock()
    budget = RetryBudget(percent=0.2, min_per_s=1, window_s=10, clock=clock)
    assert withdrawals(budget) == 10  # 1 a second over 10 s
    clock.now += 5
    assert withdrawals(budget) == 0  # the first ten still count
    clock.now += 5.5
    assert withdrawals(budget) == 10  # they left the window


def test_deposits_expire_with_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(percent=0.5, min_per_s=0, window_s=10, clock=clock)
    for _ in range(10):
        budget.deposit()
    clock.now += 6
    for _ in range(10):
        budget.deposit()
    clock.now += 5  # the first ten left the window; the second ten have not
    assert withdrawals(budget) == 5
    clock.now += 1_000  # a long quiet spell clears everything
    assert withdrawals(budget) == 0


def test_percent_zero_and_no_floor_allows_no_retry() -> None:
    budget = RetryBudget(percent=0, min_per_s=0, window_s=10, clock=Clock())
    for _ in range(1_000):
        budget.deposit()
    assert not budget.try_withdraw()
