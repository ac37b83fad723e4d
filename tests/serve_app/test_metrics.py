"""The replica's metric buffers: histograms added up in memory, exported as the
``_bucket``/``_sum``/``_count`` series of a Prometheus histogram."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.metrics import HistogramBuffer, ServeMetrics


def test_an_observation_goes_in_the_first_bucket_it_does_not_exceed() -> None:
    series = HistogramBuffer([0.1, 1.0, 5])
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        series.add(value)
    assert series.cumulative() == [("0.1", 2), ("1.0", 4), ("5.0", 4), ("+Inf", 5)]
    assert series.total == pytest.approx(8.65)


class _Gauge:
    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
        self.name, self.tag_keys = name, tag_keys
        self.values: dict[tuple[tuple[str, str], ...], float] = {}
        self.sets = 0

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.values[tuple(sorted(tags.items()))] = value
        self.sets += 1


class _Unused(_Gauge):
    def observe(self, value: float, tags: dict[str, str]) -> None:
        raise AssertionError(f"{self.name}: a Ray histogram was recorded")

    def inc(self, value: float, tags: dict[str, str]) -> None:
        pass


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> ServeMetrics:
    from ray.serve import metrics

    monkeypatch.setattr(metrics, "Gauge", _Gauge)
    monkeypatch.setattr(metrics, "Counter", _Unused)
    monkeypatch.setattr(metrics, "Histogram", _Unused)
    return ServeMetrics()


def _series(sink: ServeMetrics, name: str) -> Any:
    return sink._metrics[name]  # the fakes hold what was exported


def test_histograms_reach_ray_as_cumulative_series_at_flush(sink: ServeMetrics) -> None:
    name, tags = "gateway_request_duration_seconds", {"route": "chat/completions", "model": "m"}
    sink.observe(name, 0.003, tags)
    sink.observe(name, 0.2, tags)
    assert _series(sink, name + "_count").values == {}  # nothing before the flush
    sink.flush()
    key = tuple(sorted(tags.items()))
    assert _series(sink, name + "_count").values == {key: 2}
    assert _series(sink, name + "_sum").values[key] == pytest.approx(0.203)
    buckets = _series(sink, name + "_bucket").values
    assert buckets[tuple(sorted({**tags, "le": "0.0025"}.items()))] == 0
    assert buckets[tuple(sorted({**tags, "le": "0.005"}.items()))] == 1
    assert buckets[tuple(sorted({**tags, "le": "0.25"}.items()))] == 2
    assert buckets[tuple(sorted({**tags, "le": "+Inf"}.items()))] == 2

    sets = _series(sink, name + "_bucket").sets
    sink.flush()  # nothing new: sent again all the same (Ray's agent drops quiet gauges)
    assert _series(sink, name + "_bucket").sets == 2 * sets
    assert _series(sink, name + "_count").values == {key: 2}
    sink.observe(name, 100.0, tags)
    sink.flush()  # counts go on from where they were, as a counter's do
    assert _series(sink, name + "_count").values == {key: 3}
    assert buckets[tuple(sorted({**tags, "le": "60.0"}.items()))] == 2
    assert buckets[tuple(sorted({**tags, "le": "+Inf"}.items()))] == 3


def test_each_tag_set_is_a_series_of_its_own(sink: ServeMetrics) -> None:
    name = "gateway_upstream_duration_seconds"
    sink.observe(name, 0.01, {"upstream": "a"})
    sink.observe(name, 0.01, {"upstream": "b"})
    sink.observe(name, 0.01, {"upstream": "b"})
    sink.observe("gateway_ratelimit_decision_seconds", 0.0002)  # a histogram with no tags
    sink.flush()
    assert _series(sink, name + "_count").values == {
        (("upstream", "a"),): 1,
        (("upstream", "b"),): 2,
    }
    assert _series(sink, "gateway_ratelimit_decision_seconds_count").values == {(): 1}


def test_a_gauge_is_sent_again_at_every_flush_until_it_changes(sink: ServeMetrics) -> None:
    name = "gateway_budget_remaining_usd"
    tags = {"scope": "key", "tenant": "t", "subject": "k", "period": "daily"}
    sink.set(name, 5.0, tags)
    sink.flush()
    sink.flush()
    assert _series(sink, name).sets == 2
    sink.set(name, 4.0, tags)
    sink.flush()
    assert _series(sink, name).values == {tuple(sorted(tags.items())): 4.0}
