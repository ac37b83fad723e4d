import json
import random
from pathlib import Path

import pytest

from bench.compare import (
    METRICS,
    RunSet,
    Tolerance,
    bootstrap_ratio_ci,
    compare,
    compare_metric,
    load_runs,
    mann_whitney_greater,
    render,
)

P95 = next(m for m in METRICS if m.name == "latency_p95_ms")
RPS = next(m for m in METRICS if m.name == "rps")
ERR = next(m for m in METRICS if m.name == "error_rate")


def test_mann_whitney_complete_separation() -> None:
    # U = 25 of 25; normal approximation with continuity correction: z = 12 / sqrt(275/12).
    assert mann_whitney_greater([6, 7, 8, 9, 10], [1, 2, 3, 4, 5]) == pytest.approx(
        0.00609, abs=1e-4
    )
    assert mann_whitney_greater([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) > 0.99


def test_mann_whitney_identical_samples_are_not_significant() -> None:
    sample = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert mann_whitney_greater(sample, list(reversed(sample))) > 0.4


def test_mann_whitney_all_ties() -> None:
    assert mann_whitney_greater([2.0] * 6, [2.0] * 6) == 0.5


def test_bootstrap_interval_brackets_the_true_ratio() -> None:
    rng = random.Random(3)
    base = [rng.gauss(100, 5) for _ in range(30)]
    new = [v * 1.5 for v in base]
    low, high = bootstrap_ratio_ci(base, new, random.Random(0))
    assert low < 1.5 < high + 0.05 and low > 1.3


def _runs(p95_windows: list[float], point: float, rps: float = 10.0, err: float = 0.0) -> RunSet:
    windows = [{"requests": 10, "p95": v, "rps": rps, "error_rate": err} for v in p95_windows]
    summary = {"latency_ms": {"p95": point}, "rps": rps, "error_rate": err}
    return RunSet([summary], windows, ["test"])


NOISY = [92.0, 108, 95, 120, 85, 101, 99, 113, 90, 104, 97, 111]


def test_point_jump_that_the_windows_do_not_back_is_noise() -> None:
    base, new = _runs(NOISY, 100), _runs(list(reversed(NOISY)), 118)
    result = compare_metric(P95, base, new, Tolerance(), random.Random(0))
    assert result.status == "noise"
    assert result.change == pytest.approx(0.18)


def test_real_shift_is_a_regression() -> None:
    base, new = _runs(NOISY, 100), _runs([v * 1.4 for v in NOISY], 140)
    result = compare_metric(P95, base, new, Tolerance(), random.Random(0))
    assert result.status == "regression"
    assert result.p_value < 0.01


def test_real_drop_is_an_improvement_and_small_moves_are_ok() -> None:
    base = _runs(NOISY, 100)
    faster = compare_metric(
        P95, base, _runs([v * 0.6 for v in NOISY], 60), Tolerance(), random.Random(0)
    )
    assert faster.status == "improvement"
    same = compare_metric(P95, base, _runs(NOISY, 104), Tolerance(), random.Random(0))
    assert same.status == "ok"


def test_too_few_windows_is_inconclusive() -> None:
    base, new = _runs(NOISY[:3], 100), _runs([v * 2 for v in NOISY[:3]], 200)
    assert compare_metric(P95, base, new, Tolerance(), random.Random(0)).status == "inconclusive"


def test_lower_throughput_is_worse() -> None:
    base = RunSet([{"rps": 100.0}], [{"requests": 1, "rps": 100.0 + i} for i in range(8)], [])
    new = RunSet([{"rps": 70.0}], [{"requests": 1, "rps": 70.0 + i} for i in range(8)], [])
    assert compare_metric(RPS, base, new, Tolerance(), random.Random(0)).status == "regression"
    assert compare_metric(RPS, new, base, Tolerance(), random.Random(0)).status == "improvement"


def test_error_rate_tolerance_is_absolute() -> None:
    base, new = _runs(NOISY, 100, err=0.001), _runs(NOISY, 100, err=0.008)
    result = compare_metric(ERR, base, new, Tolerance(absolute_error_rate=0.01), random.Random(0))
    assert result.status == "ok"  # +700 % relative, but under one percentage point


def test_missing_metric_is_reported_not_failed() -> None:
    results = compare(_runs(NOISY, 100), _runs(NOISY, 100), Tolerance())
    assert {r.name: r.status for r in results}["ttft_p95_ms"] == "missing"
    assert "no regression" in render(results)


def _write(path: Path, p95: list[float], point: float) -> None:
    windows = [{"requests": 5, "p95": v} for v in p95]
    path.write_text(json.dumps({"summary": {"latency_ms": {"p95": point}}, "windows": windows}))


def test_load_runs_pools_a_directory(tmp_path: Path) -> None:
    _write(tmp_path / "a.json", [1.0, 2.0], 10)
    _write(tmp_path / "b.json", [3.0], 30)
    (tmp_path / "run_config.json").write_text("{}")
    runs = load_runs(tmp_path)
    assert len(runs.summaries) == 2 and len(runs.windows) == 3
    assert compare_metric(P95, runs, runs, Tolerance(), random.Random(0)).baseline == 20.0
    with pytest.raises(ValueError):
        load_runs(tmp_path / "run_config.json")


def test_render_names_regressions() -> None:
    results = compare(_runs(NOISY, 100), _runs([v * 1.4 for v in NOISY], 140), Tolerance())
    assert render(results).splitlines()[-1] == "REGRESSION: latency_p95_ms"


def test_a_shift_inside_the_baseline_runs_spread_is_noise() -> None:
    slow_run = {"latency_ms": {"p95": 125.0}}
    windows = [{"requests": 10, "p95": v} for v in NOISY]
    base = RunSet([{"latency_ms": {"p95": 100.0}}, slow_run], windows, ["a", "b"])
    new = _runs([v * 1.4 for v in NOISY], 130)
    # 130 is +16 % on the median baseline (112.5) but within 125 * 1.10 of the slower run.
    assert compare_metric(P95, base, new, Tolerance(), random.Random(0)).status == "noise"
    worse = _runs([v * 1.6 for v in NOISY], 160)
    assert compare_metric(P95, base, worse, Tolerance(), random.Random(0)).status == "regression"
