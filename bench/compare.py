"""Regression detection between a baseline and a new result.

A metric is called a regression only when both hold:

* its point value moved the wrong way by more than the tolerance, and
* a one-sided Mann-Whitney U test on the per-window samples (pooled over every
  run given) says the shift is unlikely to be noise (p < alpha), and
* with two or more baseline runs, the value is also worse than the worst baseline
  run by more than the tolerance (windows of one run share its machine's mood,
  so run-to-run spread is the honest noise floor; save several baseline runs).

A move beyond tolerance that the test does not back is reported as ``noise``;
with too few windows to test, as ``inconclusive``. Neither fails the
comparison. A bootstrap 95 % interval for the ratio of medians is reported too.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "regression", "improvement", "noise", "inconclusive", "missing"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    summary_path: tuple[str, ...]  # where the point value sits in the result JSON's summary
    window_field: str  # the per-window sample
    higher_is_worse: bool
    absolute: bool = False  # tolerance in absolute units (error rates), not relative


METRICS = (
    MetricSpec("latency_p50_ms", ("latency_ms", "p50"), "p50", True),
    MetricSpec("latency_p95_ms", ("latency_ms", "p95"), "p95", True),
    MetricSpec("latency_p99_ms", ("latency_ms", "p99"), "p99", True),
    MetricSpec("ttft_p95_ms", ("ttft_ms", "p95"), "ttft_p95", True),
    MetricSpec("rps", ("rps",), "rps", False),
    MetricSpec("error_rate", ("error_rate",), "error_rate", True, absolute=True),
)


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value that ``x`` tends to be larger than ``y``.

    Normal approximation with tie correction and continuity correction; fine for
    the 5+ samples per side this module insists on.
    """
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need values")
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(pooled)
    tie_term = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        size = j - i + 1
        tie_term += size**3 - size
        i = j + 1
    r1 = sum(rank for rank, (_, side) in zip(ranks, pooled, strict=True) if side == 0)
    u1 = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return 0.5 if u1 == n1 * n2 / 2 else (0.0 if u1 > n1 * n2 / 2 else 1.0)
    z = (u1 - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def bootstrap_ratio_ci(
    base: Sequence[float], new: Sequence[float], rng: random.Random, rounds: int = 2000
) -> tuple[float, float] | None:
    """95 % percentile interval of median(new) / median(base) under resampling."""
    if not base or not new:
        return None
    ratios = []
    for _ in range(rounds):
        b = statistics.median(rng.choices(base, k=len(base)))
        n = statistics.median(rng.choices(new, k=len(new)))
        if b > 0:
            ratios.append(n / b)
    if not ratios:
        return None
    ratios.sort()
    return ratios[int(0.025 * (len(ratios) - 1))], ratios[int(0.975 * (len(ratios) - 1))]


@dataclass(frozen=True, slots=True)
class Tolerance:
    relative: float = 0.10  # latencies and throughput
    absolute_error_rate: float = 0.01
    alpha: float = 0.05
    min_samples: int = 5


@dataclass(frozen=True, slots=True)
class MetricComparison:
    name: str
    status: Status
    baseline: float | None
    result: float | None
    change: float | None  # relative (or absolute for error rates); positive = value went up
    p_value: float | None
    ci: tuple[float, float] | None
    samples: tuple[int, int]


@dataclass(frozen=True, slots=True)
class RunSet:
    """One or more result files pooled: point values are medians across runs."""

    summaries: list[dict[str, Any]]
    windows: list[dict[str, Any]]
    sources: list[str]


def load_runs(path: Path) -> RunSet:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    summaries, windows, sources = [], [], []
    for file in files:
        data = json.loads(file.read_text())
        if "summary" not in data or "windows" not in data:
            continue  # not a bench result (a config or a stray JSON)
        summaries.append(data["summary"])
        windows.extend(w for w in data["windows"] if w.get("requests"))
        sources.append(str(file))
    if not summaries:
        raise ValueError(f"{path}: no bench result JSON found")
    return RunSet(summaries, windows, sources)


def _run_values(runs: RunSet, path: tuple[str, ...]) -> list[float]:
    values = []
    for summary in runs.summaries:
        node: Any = summary
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int | float):
            values.append(float(node))
    return values


def _within_run_spread(spec: MetricSpec, runs: list[float], value: float, tol: Tolerance) -> bool:
    """Whether ``value`` is no worse than the worst baseline run plus the tolerance.

    Windows of one run share that run's machine conditions, so the window test alone
    over-trusts a single run; with 2+ baseline runs their spread is the noise floor.
    """
    if len(runs) < 2:
        return False
    if spec.absolute:
        return value <= max(runs) + tol.absolute_error_rate
    if spec.higher_is_worse:
        return value <= max(runs) * (1 + tol.relative)
    return value >= min(runs) * (1 - tol.relative)


def _classify(spec: MetricSpec, change: float, p: float | None, tol: Tolerance) -> Status:
    limit = tol.absolute_error_rate if spec.absolute else tol.relative
    worse = change > 0 if spec.higher_is_worse else change < 0
    if abs(change) <= limit:
        return "ok"
    if p is None:
        return "inconclusive"
    significant = p < tol.alpha
    if worse:
        return "regression" if significant else "noise"
    return "improvement" if significant else "noise"


def compare_metric(
    spec: MetricSpec, base: RunSet, new: RunSet, tol: Tolerance, rng: random.Random
) -> MetricComparison:
    b_runs, n_runs = _run_values(base, spec.summary_path), _run_values(new, spec.summary_path)
    b_val = statistics.median(b_runs) if b_runs else None
    n_val = statistics.median(n_runs) if n_runs else None
    b_s = [
        float(w[spec.window_field]) for w in base.windows if w.get(spec.window_field) is not None
    ]
    n_s = [float(w[spec.window_field]) for w in new.windows if w.get(spec.window_field) is not None]
    counts = (len(b_s), len(n_s))
    if b_val is None or n_val is None:
        return MetricComparison(spec.name, "missing", b_val, n_val, None, None, None, counts)
    if spec.absolute:
        change = n_val - b_val
    else:
        change = (n_val - b_val) / b_val if b_val else (0.0 if n_val == 0 else math.inf)
    p = None
    if min(counts) >= tol.min_samples:
        worse_side = (n_s, b_s) if spec.higher_is_worse else (b_s, n_s)
        better_side = worse_side[::-1]
        moved_worse = change > 0 if spec.higher_is_worse else change < 0
        p = mann_whitney_greater(*(worse_side if moved_worse else better_side))
    ci = bootstrap_ratio_ci(b_s, n_s, rng) if not spec.absolute else None
    status = _classify(spec, change, p, tol)
    if status == "regression" and _within_run_spread(spec, b_runs, n_val, tol):
        status = "noise"
    return MetricComparison(spec.name, status, b_val, n_val, change, p, ci, counts)


def compare(base: RunSet, new: RunSet, tol: Tolerance, seed: int = 0) -> list[MetricComparison]:
    rng = random.Random(seed)
    return [compare_metric(spec, base, new, tol, rng) for spec in METRICS]


def render(results: Sequence[MetricComparison]) -> str:
    lines = [f"{'metric':<16} {'baseline':>10} {'result':>10} {'change':>9} {'p':>7}  status"]
    for r in results:
        change = (
            "-"
            if r.change is None
            else (f"{r.change:+.4f}" if r.name == "error_rate" else f"{r.change:+.1%}")
        )
        p = "-" if r.p_value is None else f"{r.p_value:.3f}"
        ci = "" if r.ci is None else f"  (median ratio 95% CI {r.ci[0]:.2f}-{r.ci[1]:.2f})"
        b = "-" if r.baseline is None else f"{r.baseline:.4g}"
        n = "-" if r.result is None else f"{r.result:.4g}"
        lines.append(f"{r.name:<16} {b:>10} {n:>10} {change:>9} {p:>7}  {r.status}{ci}")
    regressions = [r.name for r in results if r.status == "regression"]
    lines.append("REGRESSION: " + ", ".join(regressions) if regressions else "no regression")
    return "\n".join(lines)
