"""The balancer: how a balanced model's targets are ordered for one call.

The strategies are LiteLLM's router's (simple-shuffle: weighted random;
least-busy: fewest in flight; latency-based: lowest recent latency within a
buffer), decided from this replica's view."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from deployments.balancer import Balancer
from deployments.resilience_settings import BalanceGroup, Target, WeightedTarget
from tests.deployments.test_resilience import Clock

A = Target(upstream="a", model="m")
B = Target(upstream="b", model="m")
C = Target(upstream="c", model="m")


def group(strategy: str = "weighted", weights: tuple[float, ...] = (1, 1, 1), **extra: object):
    targets = [
        WeightedTarget(upstream=t.upstream, model=t.model, weight=w)
        for t, w in zip((A, B, C), weights, strict=False)
    ]
    return BalanceGroup.model_validate({"strategy": strategy, "targets": targets, **extra})


def balancer(
    g: BalanceGroup, busy: dict[str, int] | None = None, clock: Clock | None = None
) -> Balancer:
    """``busy``: calls in flight per upstream, entered before the test orders."""
    made = Balancer({"llm": g}, clock=clock or Clock(), rng=random.Random(7))
    for upstream, count in (busy or {}).items():
        for _ in range(count):
            assert made.enter(Target(upstream=upstream, model="m"))
    return made


def never(_: Target) -> bool:
    return False


def firsts(bal: Balancer, n: int, avoid=never) -> Counter[str]:
    picks: Counter[str] = Counter()
    for _ in range(n):
        order = bal.order("llm", avoid)
        assert order is not None
        picks[order[0].upstream] += 1
    return picks


def test_a_model_without_a_group_is_not_balanced() -> None:
    assert balancer(group()).order("other", never) is None


def test_the_order_holds_every_target_once_as_plain_targets() -> None:
    order = balancer(group(weights=(5, 1, 1))).order("llm", never)
    assert order is not None and sorted(order, key=lambda t: t.upstream) == [A, B, C]
    assert all(type(t) is Target for t in order)  # equal to fallbacks' targets


def test_weighted_picks_in_proportion_to_the_weights() -> None:
    picks = firsts(balancer(group(weights=(3, 1))), 8000)
    assert picks["a"] / 8000 == pytest.approx(0.75, abs=0.02)
    assert picks["b"] / 8000 == pytest.approx(0.25, abs=0.02)


def test_weighted_with_equal_weights_spreads_evenly_and_second_places_too() -> None:
    bal = balancer(group())
    seconds: Counter[str] = Counter()
    for _ in range(9000):
        order = bal.order("llm", never)
        assert order is not None
        seconds[order[1].upstream] += 1
    assert firsts(bal, 9000).keys() == {"a", "b", "c"}
    for count in (*firsts(bal, 9000).values(), *seconds.values()):
        assert count / 9000 == pytest.approx(1 / 3, abs=0.02)


def test_a_target_known_open_goes_last_and_is_not_picked() -> None:
    bal = balancer(group())
    picks = firsts(bal, 500, avoid=lambda t: t == A)
    assert picks["a"] == 0 and picks["b"] > 0 and picks["c"] > 0
    order = bal.order("llm", lambda t: t == A)
    assert order is not None and order[-1] == A


def test_when_every_target_is_known_open_all_are_still_listed() -> None:
    order = balancer(group()).order("llm", lambda t: True)
    assert order is not None and len(order) == 3  # the breakers' refusals tell the client why


def test_least_busy_picks_the_fewest_in_flight() -> None:
    busy = {"a": 5, "b": 1, "c": 3}
    order = balancer(group("least-busy"), busy).order("llm", never)
    assert order == [B, C, A]


def test_least_busy_counts_in_flight_per_unit_of_weight() -> None:
    busy = {"a": 4, "b": 3}  # a has twice b's capacity: 2 per unit against 3
    order = balancer(group("least-busy", weights=(2, 1)), busy).order("llm", never)
    assert order == [A, B]


def test_least_busy_counts_a_call_from_its_pick_to_its_end() -> None:
    bal = balancer(group("least-busy"))
    picked = []
    for _ in range(6):  # picks made at once, before any call started, spread out
        order = bal.order("llm", never)
        assert order is not None
        picked.append(order[0].upstream)
        bal.enter(order[0])
    assert sorted(picked) == ["a", "a", "b", "b", "c", "c"]
    bal.leave(A)
    bal.leave(A)
    assert (bal.inflight(A), bal.inflight(B)) == (0, 2)
    bal.leave(A)  # never below none
    assert bal.inflight(A) == 0 and bal.order("llm", never)[0] == A  # type: ignore[index]
    assert not balancer(group("weighted")).enter(A)  # other strategies count nothing


def test_least_busy_breaks_ties_at_random() -> None:
    picks = firsts(balancer(group("least-busy"), {"a": 1, "b": 1, "c": 1}), 3000)
    assert all(picks[u] / 3000 == pytest.approx(1 / 3, abs=0.04) for u in "abc")


def test_lowest_latency_tries_unmeasured_targets_first() -> None:
    clock = Clock()
    bal = balancer(group("lowest-latency"), clock=clock)
    bal.finished(A, 0.05)
    order = bal.order("llm", never)
    assert order is not None and order[-1] == A  # b and c have not been measured yet


def test_lowest_latency_prefers_the_fastest() -> None:
    bal = balancer(group("lowest-latency"))
    for target, took in ((A, 0.5), (B, 0.1), (C, 0.3)):
        bal.finished(target, took)
    assert bal.order("llm", never) == [B, C, A]


def test_lowest_latency_shares_calls_within_the_buffer_by_weight() -> None:
    bal = balancer(group("lowest-latency", weights=(1, 1, 1), latency_buffer=0.2))
    for target, took in ((A, 0.100), (B, 0.115), (C, 0.5)):
        bal.finished(target, took)
    picks = firsts(bal, 4000)
    assert picks["c"] == 0
    assert picks["a"] / 4000 == pytest.approx(0.5, abs=0.04)


def test_lowest_latency_averages_recent_calls() -> None:
    bal = balancer(group("lowest-latency"))
    bal.finished(A, 0.1)
    bal.finished(A, 1.1)
    assert bal.latency_s(A) == pytest.approx(0.1 + 0.3 * 1.0)


def test_a_failed_call_puts_the_target_last_until_its_measure_expires() -> None:
    clock = Clock()
    bal = balancer(group("lowest-latency", latency_ttl_s=60), clock=clock)
    for target, took in ((A, 0.05), (B, 0.5), (C, 0.6)):
        bal.finished(target, took)
    bal.finished(A, None)
    assert bal.latency_s(A) == math.inf
    assert bal.order("llm", never) == [B, C, A]
    clock.now += 60  # every measure expired: all are tried again, at random
    order = bal.order("llm", never)
    assert order is not None and len(order) == 3
    bal.finished(A, 0.05)  # a success starts a fresh average
    assert bal.latency_s(A) == pytest.approx(0.05)


def test_a_first_call_in_flight_does_not_draw_every_call_to_its_target() -> None:
    clock = Clock()
    bal = balancer(group("lowest-latency"), clock=clock)
    bal.finished(A, 0.2)
    bal.finished(B, 0.3)
    bal.started(C)  # c unmeasured: it went first; while it is out, the measured lead
    assert bal.order("llm", never) == [A, B, C]
    bal.abandoned(C)  # its client left: nothing learnt, c is unmeasured again
    order = bal.order("llm", never)
    assert order is not None and order[0] == C


def test_strategies_other_than_lowest_latency_keep_no_latency() -> None:
    bal = balancer(group("weighted"))
    bal.started(A)
    bal.finished(A, 0.1)
    assert bal.latency_s(A) is None


def test_a_group_names_each_target_once() -> None:
    with pytest.raises(ValidationError, match="twice"):
        BalanceGroup(targets=[WeightedTarget(upstream="a", model="m")] * 2)
    with pytest.raises(ValidationError):
        BalanceGroup(targets=[])
    with pytest.raises(ValidationError):
        WeightedTarget(upstream="a", model="m", weight=0)


def test_the_admin_view_shows_each_target_as_this_replica_sees_it() -> None:
    bal = balancer(group("lowest-latency", weights=(2, 1)))
    bal.finished(A, 0.25)
    bal.finished(B, None)
    (shown,) = bal.view({("llm", "a/m"): 3})
    assert shown["strategy"] == "lowest-latency"
    assert shown["targets"] == [
        {"upstream": "a", "model": "m", "weight": 2, "picks": 3, "in_flight": 0,
         "latency_s": 0.25, "failed": False},
        {"upstream": "b", "model": "m", "weight": 1, "picks": 0, "in_flight": 0,
         "latency_s": None, "failed": True},
    ]  # fmt: skip


def test_lowest_cost_puts_the_cheapest_first_ties_by_weight_and_the_unpriced_last() -> None:
    prices = {"a": 2.0, "b": 0.5, "c": None}
    made = Balancer(
        {"llm": group("lowest-cost")},
        rng=random.Random(7),
        price=lambda t: prices[t.upstream],
    )
    assert made.order("llm", never) == [B, A, C]
    assert not made.enter(B)  # nothing to count in flight for a price
    # One price for two targets: they share the first place by weight.
    prices = {"a": 1.0, "b": 1.0, "c": 3.0}
    shared = Balancer(
        {"llm": group("lowest-cost", weights=(3, 1, 1))},
        rng=random.Random(7),
        price=lambda t: prices[t.upstream],
    )
    firsts = Counter(shared.order("llm", never)[0].upstream for _ in range(4000))  # type: ignore[index]
    assert set(firsts) == {"a", "b"}
    assert 2.5 < firsts["a"] / firsts["b"] < 3.5
    # A cheap target whose breaker is known open goes last all the same.
    assert made.order("llm", lambda t: t == B) == [A, C, B]
    shown = {t["upstream"]: t["price_per_mtok"] for t in made.view({})[0]["targets"]}
    assert shown == {"a": 2.0, "b": 0.5, "c": None}
    assert "price_per_mtok" not in balancer(group()).view({})[0]["targets"][0]
