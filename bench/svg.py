"""Hand-drawn inline SVG line charts: the report page must open offline, so no JS
library and nothing fetched at view time."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

Scale = Callable[[float], float]
PALETTE = ("#2563eb", "#ea580c", "#dc2626", "#16a34a", "#9333ea", "#0891b2", "#ca8a04", "#db2777")
WIDTH, HEIGHT = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 30, 32


@dataclass(slots=True)
class Series:
    name: str
    points: Sequence[tuple[float, float | None]]  # a None y breaks the line
    color: str = ""
    dashed: bool = False


@dataclass(slots=True)
class Chart:
    title: str
    y_label: str
    series: list[Series]
    x_max: float
    y_floor: float | None = None  # e.g. an SLO limit that must stay in view
    hline: tuple[float, str] | None = None  # (y, label): a limit drawn dashed
    marks: list[tuple[float, str]] = field(default_factory=list)  # vertical lines
    bands: list[tuple[float, float, str]] = field(default_factory=list)  # shaded x ranges
    percent: bool = False
    x_unit: str = "s"


def nice_ticks(upper: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``upper`` (1-2-5 steps)."""
    if upper <= 0 or not math.isfinite(upper):
        return [0.0, 1.0]
    raw = upper / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = [0.0]
    while ticks[-1] < upper - 1e-12:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(value: float, percent: bool) -> str:
    if percent:
        return f"{value * 100:.0f}%"
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.2g}"


def _label(value: float, percent: bool) -> str:
    return f"{value * 100:.1f}%" if percent else f"{value:.4g}"


def _segments(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    out: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            if out[-1]:
                out.append([])
        else:
            out[-1].append((x, y))
    return [s for s in out if s]


def render_chart(chart: Chart) -> str:
    values = [y for s in chart.series for _, y in s.points if y is not None]
    data_top = max(values, default=0.0)
    hline, title = chart.hline, chart.title
    if hline and values and hline[0] > 3 * data_top:
        # A limit far above the data would flatten the lines: say where it is instead.
        title += f"  ({hline[1]}: above the chart)"
        hline = None
    top = max([data_top, chart.y_floor or 0.0, hline[0] if hline else 0.0, 1e-9])
    ticks = nice_ticks(1.0 if chart.percent and top <= 1 else top * 1.05)
    y_max, x_max = ticks[-1], max(chart.x_max, 1e-9)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + pw * x / x_max

    def sy(y: float) -> float:
        return TOP + ph * (1 - y / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(chart.title)}">',
        f'<text x="{LEFT}" y="18" class="ct">{escape(title)}</text>',
    ]
    for x0, x1, label in chart.bands:
        parts.append(
            f'<rect x="{sx(x0):.1f}" y="{TOP}" width="{max(sx(x1) - sx(x0), 1):.1f}" height="{ph}" '
            f'fill="#fca5a5" opacity="0.25"><title>{escape(label)}</title></rect>'
        )
    parts += _axes(chart, ticks, x_max, sx, sy)
    mid = TOP + ph / 2
    parts += _overlays(chart, hline, sx, sy, ph)
    parts += _lines(chart, sx, sy)
    if not values:
        parts.append(
            f'<text x="{LEFT + pw / 2:.0f}" y="{mid:.0f}" class="xt">no data in this run</text>'
        )
    parts.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#94a3b8"/>'
        "</svg>"
    )
    return "\n".join(parts)


def _axes(chart: Chart, ticks: list[float], x_max: float, sx: Scale, sy: Scale) -> list[str]:
    parts = []
    for tick in ticks:
        y = sy(tick)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="yt">{_fmt(tick, chart.percent)}</text>'
        )
    for tick in nice_ticks(x_max, 8):
        if tick <= x_max:
            parts.append(
                f'<text x="{sx(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" class="xt">'
                f"{tick:g}{chart.x_unit}</text>"
            )
    mid = TOP + (HEIGHT - TOP - BOTTOM) / 2
    parts.append(
        f'<text x="14" y="{mid:.0f}" class="yl" transform="rotate(-90 14 {mid:.0f})">'
        f"{escape(chart.y_label)}</text>"
    )
    return parts


def _overlays(
    chart: Chart, hline: tuple[float, str] | None, sx: Scale, sy: Scale, ph: float
) -> list[str]:
    parts = []
    if hline:
        y, label = hline
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
            f'stroke="#dc2626" stroke-dasharray="6 4"/>'
            f'<text x="{WIDTH - RIGHT - 4}" y="{sy(y) - 4:.1f}" class="lim">{escape(label)}</text>'
        )
    for x, label in chart.marks:
        parts.append(
            f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#7c3aed" '
            f'stroke-dasharray="3 3"/><text x="{sx(x) + 4:.1f}" y="{TOP + 12}" class="mk">'
            f"{escape(label)}</text>"
        )
    return parts


def _lines(chart: Chart, sx: Scale, sy: Scale) -> list[str]:
    widths = [20 + 7 * len(s.name) for s in chart.series]
    parts, legend_x = [], WIDTH - RIGHT - sum(widths)
    for i, series in enumerate(chart.series):
        color = series.color or PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if series.dashed else ""
        for seg in _segments(series.points):
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in seg)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
            )
            if len(seg) <= 120:
                parts += [
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                    f"<title>{escape(series.name)} @ {x:g}{chart.x_unit}: "
                    f"{_label(y, chart.percent)}</title>"
                    "</circle>"
                    for x, y in seg
                ]
        parts.append(
            f'<rect x="{legend_x}" y="9" width="10" height="10" fill="{color}"/>'
            f'<text x="{legend_x + 13}" y="18" class="lg">{escape(series.name)}</text>'
        )
        legend_x += widths[i]
    return parts
