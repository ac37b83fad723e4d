"""A throughput ratio that the host's drift cannot fake: the two targets are
measured back to back in rounds, first one then the other, the order flipping
each round, and the ratio is the median of the rounds' ratios.

On a shared 2-core VM the speed of the whole machine moves by 10-30 % within a
minute; measuring all of A and then all of B puts that drift into the ratio.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.loadgen import LoadResult, run_wrk


@dataclass
class Paired:
    base: list[LoadResult] = field(default_factory=list)
    other: list[LoadResult] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [
            o.requests_per_s / b.requests_per_s
            for b, o in zip(self.base, self.other, strict=True)
            if b.requests_per_s > 0
        ]

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios (other / base)."""
        return statistics.median(self.ratios)

    def describe(self) -> str:
        shown = ", ".join(f"{r:.0%}" for r in self.ratios)
        return f"median {self.ratio:.0%} over {len(self.ratios)} rounds ({shown})"


def paired_rounds(
    base_url: str,
    other_url: str,
    connections: int,
    duration_s: float,
    rounds: int,
    body: str,
    headers: dict[str, str] | None = None,
) -> Paired:
    def measure(url: str) -> Callable[[], LoadResult]:
        return lambda: run_wrk(url, connections, duration_s, body, headers=headers)

    return paired_measures(measure(base_url), measure(other_url), rounds)


def paired_measures(
    base: Callable[[], LoadResult], other: Callable[[], LoadResult], rounds: int
) -> Paired:
    """The same rounds for any two measurements (e.g. one target alone, then
    beside some other load)."""
    paired = Paired()
    for n in range(rounds):
        order = [(base, paired.base), (other, paired.other)]
        for measure, results in order if n % 2 == 0 else reversed(order):
            results.append(measure())
    return paired
