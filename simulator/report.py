"""The run report: ``report.json`` and a self-contained HTML page of SVG charts.

A run records samples as it goes (:meth:`ReportBuilder.record`), and at the end
the builder turns them into a :class:`RunReport`: series over time (devices
online, converged, message rates, outbox depths ...), the convergence lag of
every fault, a final table and the invariant outcome. :func:`write_report`
writes ``report.json`` and ``report.html``.

Both files are deterministic: the same report gives the same bytes (sorted
keys, rounded floats, no timestamps of the rendering, no randomness), which the
deterministic simulator's "same seed, same report" promise rests on. The HTML
needs no network and no plotting library: inline SVG polylines, with the report
embedded as JSON (``<script type="application/json" id="report-data">``) and
each chart's axis ranges in ``data-*`` attributes, so a test can read the points
back and compare them with ``report.json``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.invariants import ConvergenceLag, InvariantReport

__all__ = [
    "CHART_HEIGHT",
    "CHART_WIDTH",
    "ReportBuilder",
    "RunReport",
    "Series",
    "invariants_dict",
    "render_html",
    "report_json",
    "write_report",
]

CHART_WIDTH = 720
CHART_HEIGHT = 240
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 60, 20, 16, 32
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
_DIGITS = 6


def _r(x: float) -> float:
    """Round for stable output; ``-0.0`` becomes ``0.0``."""
    if not math.isfinite(x):
        raise ValueError(f"report values must be finite, got {x!r}")
    return round(x, _DIGITS) + 0.0


@dataclass(frozen=True)
class Series:
    """One line of one chart.

    Attributes:
        name: key in ``report.json`` (``devices_online``).
        label: legend text.
        chart: the chart it is drawn in (series of one chart share axes).
        points: ``(t seconds, value)``, sorted by time.
    """

    name: str
    label: str
    chart: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class RunReport:
    """Everything a report shows."""

    title: str
    meta: Mapping[str, Any]
    series: tuple[Series, ...]
    lags: tuple[ConvergenceLag, ...] = ()
    final: Mapping[str, Any] = field(default_factory=dict)
    invariants: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (also embedded in the HTML)."""
        return {
            "title": self.title,
            "meta": dict(self.meta),
            "series": {
                s.name: {
                    "label": s.label,
                    "chart": s.chart,
                    "t": [_r(t) for t, _ in s.points],
                    "v": [_r(v) for _, v in s.points],
                }
                for s in self.series
            },
            "convergence": [
                {
                    "fault": lag.fault,
                    "kind": lag.kind,
                    "heal_t": _r(lag.heal_t),
                    "lag_s": None if lag.lag_s is None else _r(lag.lag_s),
                }
                for lag in self.lags
            ],
            "final": dict(self.final),
            "invariants": dict(self.invariants),
        }


def invariants_dict(report: InvariantReport) -> dict[str, Any]:
    """The invariant outcome as report data (violations capped at 50)."""
    return {
        "ok": report.ok,
        "counts": dict(report.counts),
        "checked": dict(report.checked),
        "violations": [str(v) for v in report.violations[:50]],
    }


class ReportBuilder:
    """Collects samples during a run.

    Args:
        title: the report's title.
        meta: run parameters (seed, devices, regions, duration, mode ...).
        series: ``name -> (label, chart)`` of the series to record, in order.
        max_points: per series; past it, every other point is dropped (bounded
            memory for long runs, keeping the shape).
    """

    def __init__(
        self,
        title: str,
        meta: Mapping[str, Any],
        series: Mapping[str, tuple[str, str]],
        *,
        max_points: int = 4_000,
    ) -> None:
        if max_points < 2:
            raise ValueError("max_points must be >= 2")
        self.title = title
        self.meta = dict(meta)
        self._spec = dict(series)
        self._points: dict[str, list[tuple[float, float]]] = {name: [] for name in series}
        self._max = max_points
        self.thinned = 0
        """Points dropped to stay under ``max_points`` (counted, never silent)."""

    def record(self, t: float, **values: float) -> None:
        """Record ``values`` (series name -> value) at time ``t``."""
        for name, value in values.items():
            pts = self._points.get(name)
            if pts is None:
                raise KeyError(f"unknown series {name!r}")
            pts.append((float(t), float(value)))
            if len(pts) > self._max:
                keep = pts[::2]
                self.thinned += len(pts) - len(keep)
                pts[:] = keep

    def build(
        self,
        *,
        lags: Iterable[ConvergenceLag] = (),
        final: Mapping[str, Any] | None = None,
        invariants: InvariantReport | None = None,
    ) -> RunReport:
        """The report of what was recorded."""
        series = tuple(
            Series(name, label, chart, tuple(sorted(self._points[name])))
            for name, (label, chart) in self._spec.items()
        )
        return RunReport(
            self.title,
            {**self.meta, "thinned_points": self.thinned},
            series,
            tuple(lags),
            dict(final or {}),
            invariants_dict(invariants) if invariants is not None else {},
        )


def report_json(report: RunReport) -> str:
    """``report.json``'s text: sorted keys, two-space indent, final newline."""
    return json.dumps(report.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"


# -- HTML ---------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def _tick(x: float) -> str:
    return f"{x:.6g}"


def _bounds(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo = min(lo, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _line_chart(chart: str, series: list[dict[str, Any]]) -> str:
    ts = [t for s in series for t in s["t"]]
    vs = [v for s in series for v in s["v"]]
    t0, t1 = (min(ts), max(ts)) if ts else (0.0, 1.0)
    if t1 <= t0:
        t1 = t0 + 1.0
    v0, v1 = _bounds(vs)
    w = CHART_WIDTH - _PAD_L - _PAD_R
    h = CHART_HEIGHT - _PAD_T - _PAD_B

    def x(t: float) -> float:
        return _PAD_L + (t - t0) / (t1 - t0) * w

    def y(v: float) -> float:
        return _PAD_T + h - (v - v0) / (v1 - v0) * h

    out = [
        f'<svg class="chart" data-chart="{html.escape(chart)}" data-t0="{_tick(t0)}" '
        f'data-t1="{_tick(t1)}" data-v0="{_tick(v0)}" data-v1="{_tick(v1)}" '
        f'data-left="{_PAD_L}" data-top="{_PAD_T}" data-width="{w}" data-height="{h}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" width="{CHART_WIDTH}" '
        f'height="{CHART_HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        vy = v0 + frac * (v1 - v0)
        tx = t0 + frac * (t1 - t0)
        out.append(
            f'<text x="{_PAD_L - 6}" y="{_fmt(y(vy) + 4)}" text-anchor="end">{_tick(vy)}</text>'
        )
        out.append(
            f'<text x="{_fmt(x(tx))}" y="{CHART_HEIGHT - 10}" '
            f'text-anchor="middle">{_tick(tx)} s</text>'
        )
    for i, s in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        pts = " ".join(f"{_fmt(x(t))},{_fmt(y(v))}" for t, v in zip(s["t"], s["v"], strict=True))
        out.append(
            f'<polyline data-series="{html.escape(s["name"])}" fill="none" stroke="{color}" '
            f'stroke-width="1.5" points="{pts}"/>'
        )
    out.append("</svg>")
    legend = " ".join(
        f'<span style="color:{_COLORS[i % len(_COLORS)]}">&#9632; {html.escape(s["label"])}</span>'
        for i, s in enumerate(series)
    )
    return "\n".join(out) + f'\n<p class="legend">{legend}</p>'


def _lag_chart(lags: list[dict[str, Any]]) -> str:
    if not lags:
        return "<p>No faults healed in this run.</p>"
    known = [lag["lag_s"] for lag in lags if lag["lag_s"] is not None]
    top = max(known, default=1.0) or 1.0
    bar_h, gap = 18, 6
    height = _PAD_T + len(lags) * (bar_h + gap) + _PAD_B
    w = CHART_WIDTH - _PAD_L - 120
    out = [
        f'<svg class="chart" data-chart="convergence" data-v1="{_tick(top)}" '
        f'viewBox="0 0 {CHART_WIDTH} {height}" width="{CHART_WIDTH}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, lag in enumerate(lags):
        yy = _PAD_T + i * (bar_h + gap)
        label = html.escape(f"#{lag['fault']} {lag['kind']} @{_tick(lag['heal_t'])} s")
        out.append(f'<text x="4" y="{yy + 13}">{label}</text>')
        if lag["lag_s"] is None:
            out.append(
                f'<text data-fault="{lag["fault"]}" data-lag="none" x="{_PAD_L + 120}" '
                f'y="{yy + 13}" fill="#d62728">never converged</text>'
            )
            continue
        bw = lag["lag_s"] / top * w
        out.append(
            f'<rect data-fault="{lag["fault"]}" data-lag="{_tick(lag["lag_s"])}" '
            f'x="{_PAD_L + 120}" y="{yy}" width="{_fmt(bw)}" height="{bar_h}" fill="#2ca02c"/>'
        )
        out.append(
            f'<text x="{_fmt(_PAD_L + 126 + bw)}" y="{yy + 13}">{_tick(lag["lag_s"])} s</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _table(rows: Mapping[str, Any]) -> str:
    cells = (
        (html.escape(str(k)), html.escape(json.dumps(v, sort_keys=True))) for k, v in rows.items()
    )
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in sorted(cells))
    return f"<table>{body}</table>"


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:60em}"
    "svg text{font-size:11px;font-family:sans-serif}"
    "table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:2px 8px;text-align:left}"
    ".bad{color:#d62728}.good{color:#2ca02c}"
)


def render_html(report: RunReport) -> str:
    """The self-contained HTML page (deterministic for a given report)."""
    data = report.to_dict()
    charts: dict[str, list[dict[str, Any]]] = {}
    for name, s in data["series"].items():
        charts.setdefault(s["chart"], []).append({"name": name, **s})
    inv = data["invariants"]
    if inv:
        verdict = (
            '<p class="good">All invariants held.</p>'
            if inv.get("ok")
            else '<p class="bad">Invariants FAILED.</p>'
        )
        verdict += _table(inv.get("counts", {}))
        violations = inv.get("violations", [])
        if violations:
            verdict += "<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in violations) + "</ul>"
    else:
        verdict = "<p>Invariants were not checked.</p>"
    embedded = json.dumps(data, sort_keys=True, allow_nan=False).replace("</", "<\\/")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
        _table(data["meta"]),
        "<h2>Invariants</h2>",
        verdict,
    ]
    for chart in sorted(charts):
        parts += [f"<h2>{html.escape(chart)}</h2>", _line_chart(chart, charts[chart])]
    parts += [
        "<h2>Convergence lag after each heal</h2>",
        _lag_chart(data["convergence"]),
        "<h2>Final state</h2>",
        _table(data["final"]),
        f'<script type="application/json" id="report-data">{embedded}</script>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(report: RunReport, directory: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``directory`` (created).

    Blocking file I/O: from a running event loop, call it through
    ``asyncio.to_thread``.

    Returns:
        The two paths.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    html_path = out / "report.html"
    json_path.write_text(report_json(report), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path
