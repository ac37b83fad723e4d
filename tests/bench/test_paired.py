"""The interleaved ratio: rounds alternate which target goes first, and the
ratio is the median of the rounds' ratios, so one slow stretch cannot set it."""

from __future__ import annotations

import pytest

import bench.paired as paired_module
from bench.loadgen import LoadResult
from bench.paired import paired_rounds


def test_rounds_alternate_order_and_the_median_ignores_one_slow_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    speeds = iter([1000, 500, 480, 1000, 1000, 250, 700, 1000, 1000, 500])  # round 3: B slow

    def fake_wrk(url: str, connections: int, duration_s: float, body: str, headers=None):
        calls.append(url)
        return LoadResult(connections, next(speeds), 1.0, 2.0, 0, 0)

    monkeypatch.setattr(paired_module, "run_wrk", fake_wrk)
    result = paired_rounds("A", "B", 16, 1.0, 5, "{}")
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]
    assert result.ratios == [0.5, 0.48, 0.25, 0.7, 0.5]
    assert result.ratio == 0.5
    assert "median 50% over 5 rounds" in result.describe()
