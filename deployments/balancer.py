"""Which of a model's interchangeable targets a call tries first.

A balanced model (``resilience.balance``) is served by several targets, e.g. two
vLLM servers, or one model at OpenAI and at Azure. For each call the balancer
orders the whole group: the first is the pick, the others follow it as
fallbacks, so a failing pick costs a retry elsewhere rather than an error.
Targets whose breaker this replica knows to be open go last, so they are not
picked while open; they are asked again once that knowledge expires (the
resilience stage keeps a refusal for about a second), which is how a
half-open breaker still gets its probe calls.

What the strategies know is this replica's own view (calls in flight, recent
latencies): replicas do not share it, because a shared count would cost a Redis
round trip per call on the hot path. With many replicas each balancing its own
share, the sum still balances.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping

from deployments.resilience_settings import BalanceGroup, Target, WeightedTarget

EWMA_ALPHA = 0.3  # weight of the newest call in a target's latency average

_Key = tuple[str, str]  # (upstream, model)


def _key(target: Target) -> _Key:
    return (target.upstream, target.model)


def plain(target: Target) -> Target:
    """The target without its weight: what the rest of the chain compares and logs."""
    return Target(upstream=target.upstream, model=target.model)


class Balancer:
    def __init__(
        self,
        groups: Mapping[str, BalanceGroup],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        price: Callable[[Target], float | None] = lambda target: None,
    ) -> None:
        """``price``: a target's cost per token, for lowest-cost groups (None: unpriced)."""
        self.groups = dict(groups)
        # Calls in flight per target of a least-busy group, counted from the moment the
        # target is picked (``enter``), not from when its call starts: requests picking
        # at once then see each other, rather than all the same least busy target.
        self._inflight: dict[_Key, int] = {
            _key(t): 0
            for group in groups.values()
            if group.strategy == "least-busy"
            for t in group.targets
        }
        self._clock = clock
        self._rng = rng or random.Random()
        self._plain = {
            model: {_key(t): plain(t) for t in group.targets} for model, group in groups.items()
        }
        # Latency estimates, kept only for targets of lowest-latency groups.
        self._ttl: dict[_Key, float] = {}
        for group in groups.values():
            if group.strategy == "lowest-latency":
                for t in group.targets:
                    ttl = self._ttl.get(_key(t), math.inf)
                    self._ttl[_key(t)] = min(ttl, group.latency_ttl_s)
        self._latency: dict[_Key, tuple[float, float]] = {}  # key -> (seconds or inf, at)
        # Prices, read once (the price book is configuration): unpriced targets go last.
        self._price: dict[_Key, float] = {
            _key(t): math.inf if (p := price(t)) is None else p
            for group in groups.values()
            if group.strategy == "lowest-cost"
            for t in group.targets
        }
        self._probing: dict[_Key, float] = {}  # key -> when its first call started

    def order(self, model: str, avoid: Callable[[Target], bool]) -> list[Target] | None:
        """The model's group, best first for this call; None when it has no group."""
        group = self.groups.get(model)
        if group is None:
            return None
        if group.strategy == "least-busy":
            ranked = self._least_busy(group.targets)
        elif group.strategy == "lowest-latency":
            ranked = self._lowest_latency(group)
        elif group.strategy == "lowest-cost":
            price = self._price
            ranked = sorted(self._shuffled(group.targets), key=lambda t: price[_key(t)])
        else:
            ranked = self._shuffled(group.targets)
        plains = self._plain[model]
        ordered = [plains[_key(t)] for t in ranked]
        usable = [t for t in ordered if not avoid(t)]
        if len(usable) == len(ordered):
            return ordered
        return usable + [t for t in ordered if avoid(t)]

    def _shuffled(self, targets: list[WeightedTarget]) -> list[WeightedTarget]:
        """A random order in which each target comes first in proportion to its weight
        (Efraimidis and Spirakis' weighted sampling without replacement)."""
        rand = self._rng.random
        return sorted(targets, key=lambda t: rand() ** (1.0 / t.weight), reverse=True)

    def _least_busy(self, targets: list[WeightedTarget]) -> list[WeightedTarget]:
        shuffled = self._shuffled(targets)  # breaks ties by weight
        inflight = self._inflight
        return sorted(shuffled, key=lambda t: inflight[_key(t)] / t.weight)

    def enter(self, target: Target) -> bool:
        """A call that picked ``target`` begins, before it asks anything of anyone, so
        that calls picking at once see each other. True when that is noted (a target
        of a least-busy or lowest-latency group): ``leave`` once the call, stream and
        all, ends."""
        key = _key(target)
        if key in self._inflight:
            self._inflight[key] += 1
            return True
        if key in self._ttl:
            self.started(target)  # its first call is out: the others go elsewhere meanwhile
            return True
        return False

    def leave(self, target: Target) -> None:
        key = _key(target)
        if key in self._inflight:
            self._inflight[key] = max(0, self._inflight[key] - 1)
        else:
            self.abandoned(target)  # ended with no measure (refused before calling it)

    def inflight(self, target: Target) -> int:
        return self._inflight.get(_key(target), 0)

    def _lowest_latency(self, group: BalanceGroup) -> list[WeightedTarget]:
        now = self._clock()
        ttl = group.latency_ttl_s
        unmeasured: list[WeightedTarget] = []
        last: list[WeightedTarget] = []  # failed, or its first call is still out
        measured: list[tuple[float, WeightedTarget]] = []
        for t in group.targets:
            key = _key(t)
            found = self._measure(key, now, ttl)
            if found is None:
                probing = self._probing.get(key)
                if probing is not None and now - probing < ttl:
                    last.append(t)
                else:
                    unmeasured.append(t)
            elif math.isinf(found[0]):
                last.append(t)
            else:
                measured.append((found[0], t))
        close: list[WeightedTarget] = []
        rest: list[tuple[float, WeightedTarget]] = []
        if measured:
            cutoff = min(s for s, _ in measured) * (1.0 + group.latency_buffer)
            for seconds, t in measured:
                if seconds <= cutoff:
                    close.append(t)
                else:
                    rest.append((seconds, t))
        rest.sort(key=lambda pair: pair[0])
        return [
            *self._shuffled(unmeasured),
            *self._shuffled(close),
            *(t for _, t in rest),
            *self._shuffled(last),
        ]

    # -- what calls report (lowest-latency groups only) ---------------------------

    def started(self, target: Target) -> None:
        """A call to ``target`` begins. An unmeasured target's first call is noted, so
        that concurrent calls do not all go to it (it may be the slow one) while its
        answer is awaited."""
        if not self._ttl:  # no lowest-latency group: nothing to learn (the common case)
            return
        key = _key(target)
        ttl = self._ttl.get(key)
        if ttl is None:
            return
        now = self._clock()
        if self._measure(key, now, ttl) is None:
            self._probing.setdefault(key, now)

    def finished(self, target: Target, took_s: float | None) -> None:
        """A call ended: in ``took_s`` seconds, or failed (None)."""
        if not self._ttl:
            return
        key = _key(target)
        ttl = self._ttl.get(key)
        if ttl is None:
            return
        self._probing.pop(key, None)
        now = self._clock()
        found = self._measure(key, now, ttl)
        if took_s is None:
            self._latency[key] = (math.inf, now)
        elif found is None or math.isinf(found[0]):
            self._latency[key] = (took_s, now)
        else:
            self._latency[key] = (found[0] + EWMA_ALPHA * (took_s - found[0]), now)

    def _measure(self, key: _Key, now: float, ttl: float) -> tuple[float, float] | None:
        """The target's latency estimate and when it was made, unless it is older than
        ``ttl`` (then it is treated as never made)."""
        found = self._latency.get(key)
        return None if found is None or now - found[1] >= ttl else found

    def abandoned(self, target: Target) -> None:
        """A call ended with no answer to judge (its client left, or its own fault)."""
        if self._probing:
            self._probing.pop(_key(target), None)

    def view(self, picks: Mapping[tuple[str, str], int]) -> list[dict[str, object]]:
        """Each balanced model as this replica sees it (``GET /admin/balance``);
        ``picks``: first picks so far, by (model, "upstream/model")."""
        shown = []
        for model, group in self.groups.items():
            targets = []
            for t in group.targets:
                latency = self.latency_s(t)
                price = self._price.get(_key(t))
                targets.append(
                    {
                        "upstream": t.upstream,
                        "model": t.model,
                        "weight": t.weight,
                        "picks": picks.get((model, f"{t.upstream}/{t.model}"), 0),
                        "in_flight": self.inflight(t),
                        "latency_s": None if latency is None or math.isinf(latency) else latency,
                        "failed": latency is not None and math.isinf(latency),
                        # lowest-cost groups: what ranks them (USD per million tokens,
                        # input plus output; None: unpriced, ranked last)
                        **(
                            {"price_per_mtok": None if math.isinf(price) else price}
                            if price is not None
                            else {}
                        ),
                    }
                )
            shown.append({"model": model, "strategy": group.strategy, "targets": targets})
        return shown

    def latency_s(self, target: Target) -> float | None:
        """The current estimate (inf: the last call failed), for admin and tests."""
        found = self._latency.get(_key(target))
        return None if found is None else found[0]
