"""Report writers: result JSON, CSVs, a text summary; the HTML page is ``bench.html``.

All of them read the report document built by ``bench.analyze``, so any saved
result JSON can be re-rendered (``python -m bench report result.json``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bench.html import render_html
from bench.records import RequestRecord, load

WINDOW_COLUMNS = (
    "t",
    "users",
    "requests",
    "rps",
    "error_rate",
    "p50",
    "p95",
    "p99",
    "ttft_p95",
    "cache_hit_ratio",
    "dedup_shared_ratio",
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _plain(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _check_line(check: dict[str, Any]) -> str:
    observed = "-" if check["observed"] is None else _plain(check["observed"])
    mark = {"pass": "ok  ", "fail": "FAIL", "skipped": "skip"}[check["outcome"]]
    note = f"  ({check['note']})" if check.get("note") else ""
    limit = f"{check['comparison']} {check['limit']:g}"
    return f"  [{mark}] {check['name']:<26} {observed:>10} {limit}{note}"


def _knee_text(k: dict[str, Any]) -> str:
    held = "never met" if k["users"] is None else f"held up to {k['users']} users"
    if k["breaking_users"] is None:
        return f"SLOs {held}; never breached"
    reasons = ", ".join(k["reasons"])
    at = f"{k['breaking_users']} users, t={k['breached_at_s']:.0f}s"
    return f"SLOs {held}; breached at {at} ({reasons})"


def render_text(report: dict[str, Any]) -> str:
    s, v = report["summary"], report["verdict"]
    lat, ttft = s["latency_ms"], s["ttft_ms"]
    lines = [
        f"bench {report['scenario']} against {report['host']}: "
        f"{v['outcome'].upper()} (exit {v['exit_code']})",
        f"  {report['description']}",
        f"  {s['requests']} requests in {s['duration_s']:.1f} s = {s['rps']:.1f} req/s; "
        f"{s['errors']} errors ({_pct(s['error_rate'])})"
        + (f"; the first {report['warmup_s']:g} s left out" if report.get("warmup_s") else ""),
        f"  latency p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}  p99 {_ms(lat['p99'])}  "
        f"max {_ms(lat['max'])}",
        f"  streams {s['streams']}: ttft p50 {_ms(ttft['p50'])}  p95 {_ms(ttft['p95'])}; "
        f"inter-token p50 {_ms(s['itl_ms']['p50'])}",
        f"  cache {s['cache']}  hit ratio {_pct(s['cache_hit_ratio'])}  "
        f"hit p99 {_ms(s['cache_hit_latency_ms']['p99'])}",
        f"  dedup shared {_pct(s['dedup_shared_ratio'])}; cost total "
        + ("-" if s["cost_total"] is None else f"{s['cost_total']:.6f}")
        + f" on {_pct(s['cost_coverage'])} of responses",
        f"  status {s['status']}; request kinds {s['kinds']}",
    ]
    if s["error_samples"]:
        lines.append(f"  errors seen: {'; '.join(s['error_samples'])}")
    if report.get("knee"):
        lines.append(f"  knee: {_knee_text(report['knee'])}")
    gate = "" if v["gate_on_slo"] else " (reported only; the criteria decide)"
    lines.append(f"SLO ({report['slo_source']}): {'met' if v['slo_passed'] else 'BREACHED'}{gate}")
    lines += [_check_line(c) for c in v["checks"]]
    if v["criteria"]:
        lines.append("criteria:")
        lines += [f"  [{c['outcome']}] {c['name']}: {c['detail']}" for c in v["criteria"]]
    for url, err in report.get("metrics_errors", {}).items():
        lines.append(f"  metrics scrape {url} failed: {err}")
    return "\n".join(lines) + "\n"


def write_windows_csv(report: dict[str, Any], path: Path) -> None:
    metric_keys = sorted(report.get("metrics", {}))
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*WINDOW_COLUMNS, *metric_keys])
        width = report["window_s"]
        for window in report["windows"]:
            row = ["" if window[c] is None else window[c] for c in WINDOW_COLUMNS]
            row += [_last_value(report["metrics"][k], window["t"] + width) for k in metric_keys]
            writer.writerow(row)


def _last_value(points: list[list[float]], until: float) -> float | str:
    """The last scraped value at or before ``until`` (a gauge holds between scrapes)."""
    last: float | str = ""
    for t, value in points:
        if t > until:
            break
        last = value
    return last


def write_requests_csv(run_dir: Path, path: Path) -> None:
    """The raw per-request records as CSV (times relative to the run start)."""
    raw = load(run_dir)
    names = list(RequestRecord.__dataclass_fields__)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for record in raw.requests:
            writer.writerow(
                ["" if getattr(record, n) is None else getattr(record, n) for n in names]
            )


def write_all(
    report: dict[str, Any], out_dir: Path, run_dir: Path | None = None
) -> dict[str, Path]:
    """Writes every report; returns {kind: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "result.json",
        "windows_csv": out_dir / "windows.csv",
        "text": out_dir / "summary.txt",
        "html": out_dir / "report.html",
    }
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    write_windows_csv(report, paths["windows_csv"])
    paths["text"].write_text(render_text(report))
    paths["html"].write_text(render_html(report))
    if run_dir is not None:
        paths["requests_csv"] = out_dir / "requests.csv"
        write_requests_csv(run_dir, paths["requests_csv"])
    return paths
