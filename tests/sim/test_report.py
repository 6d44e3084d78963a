"""report.json and the HTML page: same data, deterministic bytes."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from simulator.invariants import ConvergenceLag, EventKey, Observations, check_invariants
from simulator.report import ReportBuilder, RunReport, render_html, report_json, write_report

SERIES = {
    "devices_online": ("Devices online", "Devices"),
    "converged": ("Converged", "Devices"),
    "msgs_in_per_s": ("Messages in /s", "Message rates"),
    "outbox_depth": ("Relay outbox depth", "Outbox depths"),
}


def _report(order: int = 1) -> RunReport:
    b = ReportBuilder("sim run", {"seed": 7, "devices": 100, "regions": 2}, SERIES)
    ts = list(range(0, 181, 5))[::order]
    for t in ts:
        down = 60 <= t < 120
        b.record(t, devices_online=50 if down else 100, converged=40 if down else 100)
        b.record(t, msgs_in_per_s=12.5 + (t % 7) / 3, outbox_depth=(t - 60) * 3 if down else 0)
    bad = check_invariants(Observations(acked_events=[EventKey("d", "e", 1)]))
    return b.build(
        lags=[ConvergenceLag(0, 120.0, 4.25, "heal"), ConvergenceLag(1, 150.0, None, "link_up")],
        final={"devices": 100, "online": 100, "relays": 2},
        invariants=bad,
    )


class _Svg(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict[str, str]] = []
        self.lines: list[tuple[dict[str, str], dict[str, str]]] = []
        self.bars: list[dict[str, str]] = []
        self.data = ""
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self.charts.append(a)
        elif tag == "polyline":
            self.lines.append((self.charts[-1], a))
        elif tag in ("rect", "text") and "data-lag" in a:
            self.bars.append(a)
        elif tag == "script" and a.get("id") == "report-data":
            self._in_data = True

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data += data


def test_html_series_match_report_json(tmp_path: Path) -> None:
    json_path, html_path = write_report(_report(), tmp_path / "out")
    doc = json.loads(json_path.read_text())
    parser = _Svg()
    parser.feed(html_path.read_text())
    assert json.loads(parser.data) == doc
    drawn = {attrs["data-series"]: (chart, attrs) for chart, attrs in parser.lines}
    assert set(drawn) == set(doc["series"]) == set(SERIES)
    for name, (chart, attrs) in drawn.items():
        assert chart["data-chart"] == doc["series"][name]["chart"]
        t0, t1 = float(chart["data-t0"]), float(chart["data-t1"])
        v0, v1 = float(chart["data-v0"]), float(chart["data-v1"])
        left, top = float(chart["data-left"]), float(chart["data-top"])
        w, h = float(chart["data-width"]), float(chart["data-height"])
        pts = [tuple(map(float, p.split(","))) for p in attrs["points"].split()]
        ts = [t0 + (x - left) / w * (t1 - t0) for x, _ in pts]
        vs = [v0 + (top + h - y) / h * (v1 - v0) for _, y in pts]
        assert ts == pytest.approx(doc["series"][name]["t"], abs=(t1 - t0) / w * 0.01)
        assert vs == pytest.approx(doc["series"][name]["v"], abs=(v1 - v0) / h * 0.01)
    assert doc["series"]["outbox_depth"]["v"][13] == 15.0  # t=65 during the outage
    assert [(b["data-fault"], b["data-lag"]) for b in parser.bars] == [("0", "4.25"), ("1", "none")]
    assert doc["convergence"][1] == {"fault": 1, "kind": "link_up", "heal_t": 150.0, "lag_s": None}
    assert doc["invariants"]["ok"] is False
    assert "Invariants FAILED" in html_path.read_text()


def test_output_is_deterministic() -> None:
    a, b = _report(), _report(order=-1)  # same samples recorded in reverse order
    assert report_json(a) == report_json(b)
    assert render_html(a) == render_html(b)
    assert report_json(a).endswith("}\n")


def test_embedded_json_cannot_close_the_script() -> None:
    b = ReportBuilder("</script><b>x", {"note": "</script>"}, {})
    page = render_html(b.build())
    assert page.count("</script>") == 1
    assert "&lt;/script&gt;&lt;b&gt;x" in page


def test_builder_bounds_points_and_rejects_unknown_series() -> None:
    b = ReportBuilder("r", {}, {"x": ("X", "c")}, max_points=10)
    for t in range(100):
        b.record(t, x=t)
    report = b.build()
    assert len(report.series[0].points) <= 10
    assert report.meta["thinned_points"] == 100 - len(report.series[0].points)
    with pytest.raises(KeyError):
        b.record(1, y=1)
    with pytest.raises(ValueError, match="finite"):
        b.record(1, x=float("nan"))
        report_json(b.build())


def test_empty_report_renders() -> None:
    page = render_html(ReportBuilder("empty", {}, {"x": ("X", "c")}).build())
    assert "No faults healed" in page
    assert re.search(r'points=""', page)
