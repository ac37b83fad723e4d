"""The self-contained HTML report: verdict first, then the charts, then the tables."""

from __future__ import annotations

from html import escape
from typing import Any

from bench.svg import Chart, Series, render_chart

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1580px;color:#0f172a;background:#f8fafc;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.verdict{padding:14px 18px;border-radius:8px;font-size:18px;font-weight:600;margin:12px 0}
.pass{background:#dcfce7;color:#14532d}.fail,.error{background:#fee2e2;color:#7f1d1d}
.inconclusive{background:#fef3c7;color:#78350f}
.grid2{display:grid;grid-template-columns:repeat(auto-fill,minmax(770px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:8px}
svg{max-width:100%;height:auto} svg text{font:11px system-ui,sans-serif;fill:#334155}
svg .ct{font-size:13px;font-weight:600;fill:#0f172a} svg .yt{text-anchor:end}
svg .xt{text-anchor:middle} svg .yl{text-anchor:middle} svg .lim{text-anchor:end;fill:#dc2626}
svg .mk{fill:#7c3aed} svg .grid{stroke:#e2e8f0}
table{border-collapse:collapse;background:#fff;margin:4px 0}
td,th{border:1px solid #e2e8f0;padding:4px 10px;text-align:left} th{background:#f1f5f9}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.o-pass{color:#15803d;font-weight:600}.o-fail{color:#b91c1c;font-weight:600}
.o-skipped,.o-inconclusive{color:#a16207;font-weight:600} .muted{color:#64748b}
"""


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not (value.is_integer() and abs(value) >= 10):
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}"


def _xy(windows: list[dict[str, Any]], field: str, half: float) -> list[tuple[float, float | None]]:
    # A window without requests has no latency (a gap in the line) but a real 0 req/s.
    return [(w["t"] + half, w[field] if w["requests"] or field == "rps" else None) for w in windows]


def _overlays(report: dict[str, Any]) -> dict[str, Any]:
    marks, bands = [], []
    knee = report.get("knee")
    if knee and knee.get("breached_at_s") is not None:
        marks.append((knee["breached_at_s"], f"SLO breached at {knee['breaking_users']} users"))
    fault = (report.get("observations") or {}).get("fault") or {}
    if "start" in fault:
        bands.append((fault["start"], fault["end"], "injected upstream fault"))
    return {"marks": marks, "bands": bands}


def build_charts(report: dict[str, Any]) -> list[Chart]:
    w, slo, x_max = report["windows"], report["slo"], report["duration_s"]
    half = report["window_s"] / 2
    extra = _overlays(report)
    p95 = slo.get("latency_p95_ms")
    charts = [
        Chart(
            "Latency per window (successful requests)",
            "ms",
            [Series(n, _xy(w, n, half)) for n in ("p50", "p95", "p99")],
            x_max,
            hline=(p95, f"SLO p95 {p95:g} ms") if p95 else None,
            **extra,
        ),
        Chart("Throughput", "req/s", [Series("req/s", _xy(w, "rps", half))], x_max, **extra),
        Chart(
            "Active users",
            "users",
            [Series("users", [(t, float(u)) for t, u in report["users"]], color="#475569")],
            x_max,
            **extra,
        ),
        Chart(
            "Errors",
            "error rate",
            [Series("error rate", _xy(w, "error_rate", half), color="#dc2626")],
            x_max,
            percent=True,
            **extra,
        ),
        Chart(
            "Cache and dedup",
            "share of responses",
            [
                Series("cache hit", _xy(w, "cache_hit_ratio", half)),
                Series("dedup shared", _xy(w, "dedup_shared_ratio", half)),
            ],
            x_max,
            percent=True,
            **extra,
        ),
        Chart(
            "Time to first token p95 (streams)",
            "ms",
            [Series("ttft p95", _xy(w, "ttft_p95", half))],
            x_max,
            hline=(slo["ttft_p95_ms"], "SLO") if slo.get("ttft_p95_ms") else None,
            **extra,
        ),
    ]
    if report.get("knee"):
        charts.insert(1, _knee_chart(report))
    return charts + _metric_charts(report.get("metrics") or {}, x_max, extra)


_METRIC_GROUPS = (
    ("Replicas (Prometheus)", ("replica",)),
    ("Queued and ongoing requests", ("queued", "ongoing")),
    ("Breaker state (0 closed, 1 open, 2 half-open)", ("breaker_state",)),
    ("Calls refused by open breakers", ("breaker_refused",)),
)


def _metric_charts(
    metrics: dict[str, list[list[float]]], x_max: float, extra: dict[str, Any]
) -> list[Chart]:
    charts = []
    for title, needles in _METRIC_GROUPS:
        keys = [k for k in sorted(metrics) if any(n in k for n in needles)]
        if keys:
            series = [Series(k, [(t, v) for t, v in metrics[k]]) for k in keys[:8]]
            charts.append(Chart(title, "value", series, x_max, **extra))
    return charts


def _knee_chart(report: dict[str, Any]) -> Chart:
    """p95 against the number of active users: where a ramp's curve bends."""
    busy = sorted((w["users"], w["p95"]) for w in report["windows"] if w["requests"])
    knee, p95 = report["knee"], report["slo"].get("latency_p95_ms")
    marks = [] if knee["users"] is None else [(knee["users"], f"knee: {knee['users']} users")]
    return Chart(
        "Latency p95 against active users (x: users)",
        "ms",
        [Series("p95", [(float(u), v) for u, v in busy])],
        max((u for u, _ in busy), default=1),
        hline=(p95, f"SLO p95 {p95:g} ms") if p95 else None,
        marks=marks,
        x_unit="",
    )


def _rows(rows: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td class=num>{escape(v)}</td></tr>" for k, v in rows)


def _summary_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    lat, ttft = s["latency_ms"], s["ttft_ms"]
    rows = [
        ("requests", f"{s['requests']:,} ({s['ok']:,} ok, {s['errors']:,} errors)"),
        ("throughput", f"{s['rps']:.1f} req/s over {report['duration_s']:.1f} s"),
        ("error rate", f"{s['error_rate']:.2%}"),
        (
            "latency p50 / p95 / p99 / max",
            " / ".join(f"{_num(lat[q])} ms" for q in ("p50", "p95", "p99", "max")),
        ),
        (
            "streams; ttft p50 / p95",
            f"{s['streams']}; {_num(ttft['p50'])} / {_num(ttft['p95'])} ms",
        ),
        (
            "inter-token latency p50 / p95",
            f"{_num(s['itl_ms']['p50'])} / {_num(s['itl_ms']['p95'])} ms",
        ),
        ("x-cache", ", ".join(f"{k}: {v}" for k, v in sorted(s["cache"].items())) or "-"),
        (
            "cache hit ratio; hit p99",
            f"{_num(s['cache_hit_ratio'], 3)}; {_num(s['cache_hit_latency_ms']['p99'])} ms",
        ),
        ("dedup shared ratio", _num(s["dedup_shared_ratio"], 3)),
        ("cost total (coverage)", f"{_num(s['cost_total'], 6)} ({_num(s['cost_coverage'], 3)})"),
        ("status codes", ", ".join(f"{k}: {v}" for k, v in sorted(s["status"].items()))),
        ("upstreams", ", ".join(f"{k}: {v}" for k, v in sorted(s["upstream"].items())) or "-"),
        ("request kinds", ", ".join(f"{k}: {v}" for k, v in sorted(s["kinds"].items()))),
        ("tenants (keys)", ", ".join(f"{k}: {v}" for k, v in sorted(s["tenants"].items()))),
    ]
    return f"<table>{_rows(rows)}</table>"


def _note(check: dict[str, Any]) -> str:
    return " - " + escape(check["note"]) if check.get("note") else ""


def _checks_table(report: dict[str, Any]) -> str:
    v = report["verdict"]
    head = "<tr><th>objective</th><th>observed</th><th>limit</th><th>outcome</th></tr>"
    body = "".join(
        f"<tr><td>{escape(c['name'])}</td><td class=num>{_num(c['observed'], 2)}</td>"
        f"<td class=num>{escape(c['comparison'])} {c['limit']:g}</td>"
        f"<td class=o-{c['outcome']}>{c['outcome']}{_note(c)}</td></tr>"
        for c in v["checks"]
    )
    crit = "".join(
        f"<tr><td>{escape(c['name'])}</td><td class=o-{c['outcome']}>{c['outcome']}</td>"
        f"<td>{escape(c['detail'])}</td></tr>"
        for c in v["criteria"]
    )
    gate = (
        "" if v["gate_on_slo"] else " <span class=muted>(reported only; the criteria decide)</span>"
    )
    out = f"<h2>SLO checks ({escape(report['slo_source'])}){gate}</h2><table>{head}{body}</table>"
    if crit:
        head = "<tr><th>criterion</th><th>outcome</th><th>detail</th></tr>"
        out += f"<h2>Success criteria</h2><table>{head}{crit}</table>"
    return out


def render_html(report: dict[str, Any]) -> str:
    v = report["verdict"]
    charts = "".join(f'<div class="card">{render_chart(c)}</div>' for c in build_charts(report))
    if not report.get("metrics"):
        charts += '<p class="muted">No Prometheus metrics were scraped (pass --metrics-url).</p>'
    errors = report["summary"]["error_samples"]
    error_list = "".join(f"<li>{escape(e)}</li>" for e in errors)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>bench {escape(report['scenario'])}</title><style>{_CSS}</style></head><body>"
        f"<h1>Load test: {escape(report['scenario'])}</h1>"
        f"<div class=muted>{escape(report['description'])} &middot; "
        f"target {escape(report['host'])} &middot; started {escape(str(report.get('started_at')))}"
        f" &middot; {report['tenants']} API key(s)</div>"
        f'<div class="verdict {escape(v["outcome"])}">Verdict: {escape(v["outcome"].upper())} '
        f"(exit code {v['exit_code']})</div>"
        f"{_checks_table(report)}<h2>Over time</h2><div class=grid2>{charts}</div>"
        f"<h2>Summary</h2>{_summary_table(report)}"
        + (f"<h2>Errors seen</h2><ul>{error_list}</ul>" if errors else "")
        + "</body></html>\n"
    )
