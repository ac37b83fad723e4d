"""Turns a finished run (record files + what the runner observed) into the report
document: summary, windows, SLO verdict, knee, criteria and the exit code."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from bench import records
from bench.criteria import RunFacts, evaluate_all
from bench.runner import EXIT_ERROR, EXIT_FAIL, EXIT_INCONCLUSIVE, EXIT_PASS, RawOutcome, RunOptions
from bench.shapes import Ramp, to_spec
from bench.slo import evaluate, find_knee
from bench.stats import auto_window, summarize, windows

SCHEMA = 1


def _duration(raw: records.RawRun, planned: float) -> float:
    """The load's real length: up to the stop marker, else the plan."""
    if raw.users:
        return max(min(raw.users[-1].t, planned), 1e-3)
    return planned


def _rebase(
    series: dict[str, list[tuple[float, float]]], start: float
) -> dict[str, list[list[float]]]:
    return {k: [[round(t - start, 3), v] for t, v in pts] for k, pts in series.items()}


def _rebase_observations(obs: dict[str, Any], start: float) -> dict[str, Any]:
    fault = obs.get("fault")
    if fault and "start_epoch" in fault:
        fault = {**fault, "start": fault["start_epoch"] - start, "end": fault["end_epoch"] - start}
        return {**obs, "fault": fault}
    return obs


def _outcome(slo_gate: bool, slo_passed: bool, criteria: list[dict[str, str]]) -> tuple[str, int]:
    outcomes = {c["outcome"] for c in criteria}
    if (slo_gate and not slo_passed) or "fail" in outcomes:
        return "fail", EXIT_FAIL
    if "inconclusive" in outcomes:
        return "inconclusive", EXIT_INCONCLUSIVE
    return "pass", EXIT_PASS


def _header(opts: RunOptions, outcome: RawOutcome, start: float) -> dict[str, Any]:
    """What was run, against what, judged by what."""
    mix = {k: v for k, v in opts.scenario.mix.model_dump().items() if k != "keys"}
    if opts.models:
        mix["models"] = opts.models
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)) if start else None
    return {
        "schema": SCHEMA,
        "tool": "bench (locust load generator)",
        "scenario": opts.scenario.name,
        "description": opts.scenario.description,
        "host": opts.host,
        "started_at": started,
        "shape": to_spec(outcome.shape),
        "mix": mix,
        "tenants": len(opts.api_keys),
        "slo_source": opts.slo_source,
        "slo": opts.slo.model_dump(),
        "load_generator_exit": outcome.returncode,
    }


def build_report(opts: RunOptions, outcome: RawOutcome) -> dict[str, Any]:
    raw = records.load(opts.out_dir)
    scenario = opts.scenario
    duration = _duration(raw, outcome.shape.duration)
    warmup = min(opts.warmup_s, duration / 2)  # at most half the run goes unjudged
    measured = [r for r in raw.requests if r.t >= warmup]
    summary = summarize(measured, duration - warmup)
    width = opts.window_s or auto_window(duration)
    series = windows(raw.requests, raw.users, duration, width)
    verdict = evaluate(summary, opts.slo)
    ramped = isinstance(outcome.shape, Ramp) or scenario.stop_on_breach is not None
    knee = find_knee(series, opts.slo) if ramped else None
    metrics = _rebase(outcome.metrics, raw.start)
    observations = _rebase_observations(outcome.observations, raw.start)
    as_points = {k: [(t, v) for t, v in pts] for k, pts in metrics.items()}
    facts = RunFacts(summary, series, raw.requests, as_points, opts.slo, knee, opts.users or 15)
    facts.observations = observations
    criteria = [asdict(c) for c in evaluate_all(scenario.criteria, facts)]
    label, code = _outcome(scenario.gate_on_slo, verdict.passed, criteria)
    if not raw.requests:
        label, code = "error", EXIT_ERROR
    return _header(opts, outcome, raw.start) | {
        "duration_s": round(duration, 3),
        "warmup_s": round(warmup, 3),
        "summary": asdict(summary),
        "windows": [asdict(w) for w in series],
        "window_s": width,
        "users": [[round(u.t, 3), u.users] for u in raw.users],
        "metrics": metrics,
        "metrics_errors": outcome.metrics_errors,
        "observations": observations,
        "knee": asdict(knee) if knee else None,
        "verdict": {
            "outcome": label,
            "exit_code": code,
            "gate_on_slo": scenario.gate_on_slo,
            "slo_passed": verdict.passed,
            "checks": [asdict(c) for c in verdict.checks],
            "criteria": criteria,
        },
    }


def exit_code(report: dict[str, Any]) -> int:
    return int(report["verdict"]["exit_code"])
