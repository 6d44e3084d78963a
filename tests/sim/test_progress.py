"""The simulator's live progress display and final table."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.deterministic import SimConfig, run_deterministic
from simulator.progress import Progress, ProgressDisplay, final_table
from simulator.report import report_json

ROOT = Path(__file__).resolve().parents[2]


class FakeWall:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def snap(t: float, *, converged: int = 8) -> Progress:
    return Progress(t, 300.0, 10, 9, converged, 1234.4, "msg", "outbox 3")


def test_render_shows_the_bar_fraction_fleet_and_rate() -> None:
    text = snap(150.0).render()
    assert text.startswith("[##########..........]  50%  t 150/300 s")
    assert "online 9/10  converged 8/10  1,234 msg/s  outbox 3" in text
    assert "settling" in snap(320.0).render()
    assert snap(320.0).render().startswith("[####################] 100% settling")


def test_plain_lines_every_interval_off_a_terminal() -> None:
    out, wall = io.StringIO(), FakeWall()
    display = ProgressDisplay(out, every_s=5.0, live=False, wall=wall)
    display.update(snap(1.0))  # too early: the first line comes after every_s
    assert out.getvalue() == ""
    wall.t += 5.0
    display.update(snap(6.0))
    wall.t += 1.0
    display.update(snap(7.0))  # within the interval: skipped
    display.say("applied release 2")
    display.close()  # plain mode: nothing to end
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[") and "t 6/300 s" in lines[0]
    assert lines[1] == "applied release 2"
    assert "\r" not in out.getvalue()


def test_live_line_is_redrawn_in_place_and_messages_go_above_it() -> None:
    out, wall = io.StringIO(), FakeWall()
    display = ProgressDisplay(out, live=True, wall=wall)
    display.update(snap(1.0))
    wall.t += 1.0
    display.update(snap(2.0, converged=10))
    display.say("fault healed")
    wall.t += 0.01
    display.update(snap(3.0))  # too soon after the last redraw: kept as the last one
    display.close()  # shows the last snapshot, then ends the line
    text = out.getvalue()
    assert text.count("\n") == 2  # the message's and the closing one
    assert "\rfault healed\n" in text  # the live line was blanked first
    assert text.rstrip("\n").rsplit("\r", 1)[-1].startswith("[")
    assert "t 3/300 s" in text.rsplit("\r", 1)[-1]
    with pytest.raises(ValueError, match="every_s"):
        ProgressDisplay(out, every_s=0)


def test_final_table_aligns_scalars_and_skips_nested_values() -> None:
    table = final_table(
        [("devices", 2000), ("max_lag_s", 25.53), ("ok", True), ("bad", False), ("relay", {})]
    )
    lines = table.splitlines()
    assert lines[0] == lines[-1] and set(lines[0]) == {"-"}
    assert lines[1:-1] == ["devices    2,000", "max_lag_s  25.5", "ok         yes", "bad        NO"]


def test_deterministic_progress_sees_every_sample_and_changes_nothing() -> None:
    cfg = SimConfig(devices=12, regions=2, duration_s=60, seed=3, sample_s=5.0)
    seen: list[Progress] = []
    with_progress = run_deterministic(cfg, progress=seen.append)
    without = run_deterministic(cfg)
    assert report_json(with_progress.report) == report_json(without.report)
    assert len(seen) >= 12
    assert [p.t_s for p in seen] == sorted(p.t_s for p in seen)
    assert seen[-1].devices == 12 and seen[-1].converged == 12
    assert seen[-1].online == seen[-1].devices


def test_cli_keeps_progress_off_stdout_and_prints_the_final_table() -> None:
    args = ["--deterministic", "--devices", "10", "--regions", "2", "--duration", "60"]
    result = subprocess.run(
        [sys.executable, "-m", "novacron", "sim", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[" not in result.stdout.split("convergence", 1)[0]
    assert "invariants_ok            yes" in result.stdout
    assert "sim_seconds" in result.stdout
