"""Text table and self-contained HTML (bench.svg's inline charts) for scale_sim."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from bench.svg import Chart, Series, render_chart


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:,.2f}"
    return str(value)


def text_table(summaries: dict[float, dict[str, Any]]) -> str:
    columns = list(next(iter(summaries.values())))
    rows = [["scale", *columns]]
    rows += [[f"{scale:g}x", *(_fmt(s[c]) for c in columns)] for scale, s in summaries.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows
    )


def _charts(ticks: Sequence[Any], capacity: float, slo_p95_s: float) -> list[Chart]:
    x_max = ticks[-1].t if ticks else 1.0

    def line(name: str, get: Callable[[Any], float], dashed: bool = False) -> Series:
        return Series(name, [(k.t, get(k)) for k in ticks], dashed=dashed)

    return [
        Chart(
            "Offered load vs ready capacity",
            "req/s",
            [
                line("offered", lambda k: k.rps),
                line("capacity", lambda k: k.ready * capacity, dashed=True),
            ],
            x_max,
        ),
        Chart(
            "Replicas, Ray worker pods, nodes",
            "count",
            [
                line("ready replicas", lambda k: k.ready),
                line("target replicas", lambda k: k.target, dashed=True),
                line("pods", lambda k: k.pods),
                line("nodes", lambda k: k.nodes),
            ],
            x_max,
        ),
        Chart("Queue", "requests", [line("queued", lambda k: k.queue)], x_max),
        Chart(
            "Projected p95",
            "seconds",
            [
                line("p95", lambda k: min(k.p95_s, 60.0)),
            ],
            x_max,
            hline=(slo_p95_s, "SLO"),
        ),
    ]


def render_html(
    trace: str,
    params: Any,
    runs: dict[float, tuple[Sequence[Any], dict[str, Any]]],
    slo_p95_s: float = 1.0,
) -> str:
    table = html.escape(text_table({s: summary for s, (_, summary) in runs.items()}))
    knobs = html.escape(", ".join(f"{k}={v}" for k, v in asdict(params).items()))
    sections = "".join(
        f"<h2>{scale:g}x load</h2>"
        + "".join(render_chart(c) for c in _charts(ticks, params.capacity_rps, slo_p95_s))
        for scale, (ticks, _) in runs.items()
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>scale-sim</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:24px}svg text{font:11px sans-serif}"
        "svg .grid{stroke:#e2e8f0}svg .yt{text-anchor:end}svg .xt{text-anchor:middle}</style>"
        f"<h1>scale-sim: {html.escape(trace)}</h1><p>{knobs}</p><pre>{table}</pre>{sections}"
    )
