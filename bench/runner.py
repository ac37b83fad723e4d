"""Runs one scenario: locust in a subprocess, metrics scraping and fault injection in
this (asyncio) process, then analysis, verdict and reports.

Locust runs as ``python -m locust -f bench/locustfile.py`` in its own process
because it monkey-patches the interpreter with gevent, which would break every
asyncio client here; the two sides talk only through files in the output dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.prom import MetricsScraper
from bench.records import CONFIG_FILE, REQUESTS_FILE, USERS_FILE
from bench.scenarios import BuildArgs, FaultPlan, Scenario
from bench.shapes import Shape, to_spec
from bench.slo import SLO

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_INCONCLUSIVE = 0, 1, 2, 3


@dataclass(slots=True)
class RunOptions:
    scenario: Scenario
    host: str
    out_dir: Path
    slo: SLO
    slo_source: str
    duration_s: float | None = None
    users: int | None = None
    api_keys: list[str] = field(default_factory=lambda: ["sk-local"])
    admin_key: str | None = None  # for admin-guarded probes; default: the first API key
    models: list[str] | None = None
    api: str | None = None  # "chat" or "responses"; None: the scenario's (chat)
    metrics_urls: list[str] = field(default_factory=list)
    metrics_interval_s: float = 2.0
    mock_url: str | None = None
    trace: Path | None = None
    seed: int = 0
    window_s: float | None = None  # None: stats.auto_window(duration)
    timeout_s: float = 60.0
    # Requests started in the run's first seconds: charted, but left out of the summary
    # and the SLO verdict (pools, replicas and caches warming up after a fresh start).
    warmup_s: float = 0.0


@dataclass(slots=True)
class RawOutcome:
    """What the load phase produced besides the record files."""

    shape: Shape
    returncode: int | None
    metrics: dict[str, list[tuple[float, float]]]
    metrics_errors: dict[str, str]
    observations: dict[str, Any]


def _write_config(opts: RunOptions, shape: Shape) -> None:
    mix = opts.scenario.mix.model_dump()
    if opts.models:
        mix["models"] = opts.models
    if opts.api:
        mix["api"] = opts.api
    mix.pop("keys")
    stop = opts.scenario.stop_on_breach
    config = {
        "scenario": opts.scenario.name,
        "out_dir": str(opts.out_dir),
        "shape": to_spec(shape),
        "mix": mix,
        "seed": opts.seed,
        "timeout_s": opts.timeout_s,
        "stop_on_breach": None
        if stop is None
        else {
            "after_users": stop.after_users,
            "window_s": stop.window_s,
            "sustain": stop.sustain,
            "p95_ms": opts.slo.latency_p95_ms,
            "error_rate": opts.slo.error_rate_max,
        },
    }
    (opts.out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))


async def _start_locust(opts: RunOptions) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "BENCH_CONFIG": str(opts.out_dir / CONFIG_FILE),
        "BENCH_API_KEYS": json.dumps(opts.api_keys),
    }
    log = (opts.out_dir / "locust.log").open("w")
    args = ["-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", opts.host]
    args += ["--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )


async def _load_start(out_dir: Path, proc: asyncio.subprocess.Process) -> float | None:
    """Epoch time of locust's test start (its first users sample), once it exists."""
    path = out_dir / USERS_FILE
    while proc.returncode is None:
        if path.exists() and (first := path.read_text().split("\n", 1)[0]).strip():
            return float(json.loads(first)["t"])
        await asyncio.sleep(0.1)
    return None


async def _mock_calls(client: httpx.AsyncClient, mock_url: str) -> int:
    response = await client.get(f"{mock_url}/_mock/stats")
    response.raise_for_status()
    return int(response.json()["calls"])


async def _inject_fault(
    plan: FaultPlan, mock_url: str, client: httpx.AsyncClient, start: float, duration: float
) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start + plan.start_frac * duration - time.time()))
    try:
        before = await _mock_calls(client, mock_url)
        (await client.post(f"{mock_url}/_mock/faults", json=plan.payload)).raise_for_status()
        began = time.time()
        await asyncio.sleep(max(0.0, start + plan.end_frac * duration - time.time()))
        after = await _mock_calls(client, mock_url)
        ended = time.time()
    except httpx.HTTPError as exc:
        return {"error": f"fault injection at {mock_url} failed: {type(exc).__name__}: {exc}"}
    finally:
        with contextlib.suppress(httpx.HTTPError):
            await client.post(f"{mock_url}/_mock/faults", json=plan.clear)
    hang = max((f.get("hang_s", 0.0) for f in plan.payload.get("faults", {}).values()), default=0.0)
    return {
        "start_epoch": began,
        "end_epoch": ended,
        "hang_s": hang,
        "upstream_calls": after - before,
    }


async def probe_cost_recommendations(client: httpx.AsyncClient, opts: RunOptions) -> dict[str, Any]:
    url = f"{opts.host.rstrip('/')}/v1/cost/recommendations"
    try:
        key = opts.admin_key or opts.api_keys[0]
        response = await client.get(url, headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    try:
        body = response.json()
    except ValueError:
        return {"status": response.status_code, "error": "not JSON"}
    items = body
    if isinstance(body, dict):
        items = body.get("recommendations", body.get("data", []))
    count = len(items) if isinstance(items, list) else 0
    return {"status": response.status_code, "count": count, "sample": items[:3] if count else []}


PROBES = {"cost_recommendations": probe_cost_recommendations}


async def _side_tasks(
    opts: RunOptions, client: httpx.AsyncClient, proc: asyncio.subprocess.Process, shape: Shape
) -> dict[str, Any]:
    plan = opts.scenario.fault
    if plan is None:
        return {}
    if not opts.mock_url:
        return {"fault": {"error": "no --mock-url given: cannot inject the upstream fault"}}
    start = await _load_start(opts.out_dir, proc)
    if start is None:
        return {"fault": {"error": "the load generator exited before starting"}}
    return {
        "fault": await _inject_fault(plan, opts.mock_url.rstrip("/"), client, start, shape.duration)
    }


async def generate_load(opts: RunOptions) -> RawOutcome:
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    for name in (REQUESTS_FILE, USERS_FILE):
        (opts.out_dir / name).unlink(missing_ok=True)
    shape = opts.scenario.shape(BuildArgs(opts.duration_s, opts.users, opts.trace))
    _write_config(opts, shape)
    async with httpx.AsyncClient(timeout=10.0) as client:
        scraper = MetricsScraper(opts.metrics_urls, client, opts.metrics_interval_s)
        stop = asyncio.Event()
        scraping = asyncio.create_task(scraper.run(stop)) if opts.metrics_urls else None
        proc = await _start_locust(opts)
        side = asyncio.create_task(_side_tasks(opts, client, proc, shape))
        try:
            await asyncio.wait_for(proc.wait(), shape.duration + 60)
        except TimeoutError:
            proc.terminate()
            await proc.wait()
        stop.set()
        observations = await side
        if scraping is not None:
            await scraping
        for probe in opts.scenario.probes:
            observations[probe] = await PROBES[probe](client, opts)
    return RawOutcome(
        shape, proc.returncode, dict(scraper.result.series), scraper.result.errors, observations
    )
