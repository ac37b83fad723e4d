"""``python -m bench``: list | run SCENARIO | compare BASELINE RESULT | report RESULT | scale-sim.

Exit codes of ``run``: 0 pass, 1 an SLO or criterion failed, 2 error (bad
arguments, no request recorded), 3 inconclusive (a criterion lacked its signal).
``compare`` exits 1 on a statistically backed regression.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.scenarios import SCENARIOS
from bench.shapes import parse_duration


def _list() -> int:
    width = max(len(n) for n in SCENARIOS)
    for name, scenario in SCENARIOS.items():
        duration = f"{scenario.default_duration_s:g}s" if scenario.default_duration_s else "trace"
        print(f"{name:<{width}}  {duration:>6}  {scenario.description}")
    return 0


def _run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = sub.add_parser("run", help="run a scenario against a gateway")
    run.add_argument("scenario", choices=sorted(SCENARIOS))
    run.add_argument("--host", default="http://127.0.0.1:8000", help="gateway base URL")
    run.add_argument(
        "--duration", type=parse_duration, help="e.g. 30s, 2m (default: the scenario's)"
    )
    run.add_argument("--users", type=int, help="override the scenario's user count")
    run.add_argument("--slo", type=Path, help="SLO YAML (default: bench/slo.yaml)")
    run.add_argument(
        "--out", type=Path, help="output dir (default: bench-results/<scenario>-<time>)"
    )
    run.add_argument(
        "--api-key", action="append", dest="api_keys", help="repeatable: one per tenant"
    )
    run.add_argument("--admin-key", help="for GET /v1/cost/recommendations (default: 1st key)")
    run.add_argument(
        "--model", action="append", dest="models", help="repeatable (default: mock-gpt)"
    )
    run.add_argument(
        "--api",
        choices=["chat", "responses"],
        help="the API the requests use (default: chat; responses: /v1/responses, store false)",
    )
    run.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        dest="metrics_urls",
        help="Prometheus endpoint to scrape during the run; repeatable",
    )
    run.add_argument("--metrics-interval", type=parse_duration, default=2.0)
    run.add_argument("--mock-url", help="the mock provider's base URL (fault injection)")
    run.add_argument("--trace", type=Path, help="CSV trace for the replay scenario")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--window", type=parse_duration, help="analysis window (default: ~1/24 of the run)"
    )
    run.add_argument("--timeout", type=parse_duration, default=60.0, help="per-request timeout")
    run.add_argument(
        "--warmup",
        type=parse_duration,
        default=0.0,
        help="leave requests started in the first seconds out of the summary and SLO verdict",
    )


def _run(args: argparse.Namespace) -> int:
    from bench.analyze import build_report, exit_code
    from bench.report import render_text, write_all
    from bench.runner import EXIT_ERROR, RunOptions, generate_load
    from bench.slo import DEFAULT_SLO_FILE, load_slo

    scenario = SCENARIOS[args.scenario]
    if scenario.name == "replay" and args.trace is None:
        print("bench: the replay scenario needs --trace FILE", file=sys.stderr)
        return EXIT_ERROR
    slo_path = args.slo or DEFAULT_SLO_FILE
    out = args.out or Path("bench-results") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = RunOptions(
        scenario=scenario,
        host=args.host.rstrip("/"),
        out_dir=out.resolve(),
        slo=load_slo(slo_path),
        slo_source=str(slo_path),
        duration_s=args.duration,
        users=args.users,
        api_keys=args.api_keys or ["sk-local"],
        admin_key=args.admin_key,
        models=args.models,
        api=args.api,
        metrics_urls=args.metrics_urls,
        metrics_interval_s=args.metrics_interval,
        mock_url=args.mock_url,
        trace=args.trace,
        seed=args.seed,
        window_s=args.window,
        timeout_s=args.timeout,
        warmup_s=args.warmup,
    )
    outcome = asyncio.run(generate_load(opts))
    report = build_report(opts, outcome)
    paths = write_all(report, opts.out_dir, run_dir=opts.out_dir)
    print(render_text(report), end="")
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    return exit_code(report)


def _compare(args: argparse.Namespace) -> int:
    from bench.compare import Tolerance, compare, load_runs, render

    tol = Tolerance(args.tolerance, args.error_tolerance, args.alpha, args.min_samples)
    results = compare(load_runs(args.baseline), load_runs(args.result), tol)
    print(render(results))
    return 1 if any(r.status == "regression" for r in results) else 0


def _report(args: argparse.Namespace) -> int:
    from bench.report import render_text, write_all

    report = json.loads(args.result.read_text())
    paths = write_all(report, args.out or args.result.parent)
    print(render_text(report), end="")
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _scale_sim(argv: Sequence[str]) -> int:
    try:
        module = importlib.import_module("bench.scale_sim")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.scale_sim":
            raise
        print("bench: scale-sim is not available (bench/scale_sim.py is missing)", file=sys.stderr)
        return 2
    return int(module.main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the scenarios")
    _run_parser(sub)
    cmp = sub.add_parser("compare", help="compare a result with a baseline")
    cmp.add_argument("baseline", type=Path, help="result JSON, or a dir of them (repeated runs)")
    cmp.add_argument("result", type=Path, help="result JSON, or a dir of them")
    cmp.add_argument("--tolerance", type=float, default=0.10, help="relative, latency and req/s")
    cmp.add_argument("--error-tolerance", type=float, default=0.01, help="absolute, error rate")
    cmp.add_argument("--alpha", type=float, default=0.05, help="significance level")
    cmp.add_argument("--min-samples", type=int, default=5, help="windows needed per side")
    rep = sub.add_parser("report", help="re-render the reports from a result JSON")
    rep.add_argument("result", type=Path)
    rep.add_argument("--out", type=Path)
    sub.add_parser(
        "scale-sim", help="the autoscaling simulator (bench/scale_sim.py)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scale-sim"]:
        return _scale_sim(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {"list": lambda a: _list(), "run": _run, "compare": _compare, "report": _report}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
