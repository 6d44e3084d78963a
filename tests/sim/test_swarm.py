"""Swarm cases are drawn from their seed, vary, and replay exactly."""

from __future__ import annotations

import json
import subprocess
import sys

from simulator.deterministic import run_deterministic
from simulator.report import report_json
from simulator.swarm import run_swarm, swarm_case


def test_cases_are_fixed_by_seed_and_vary() -> None:
    assert swarm_case(5) == swarm_case(5)
    kinds = {f.kind for s in range(40) for f in swarm_case(s)[1].faults}
    assert len(kinds) == 8
    losses = {swarm_case(s)[0].extra_loss for s in range(40)}
    assert len(losses) > 2
    # Clock jumps are drawn both ways, ahead far past the HLC's max_skew too.
    hours = [f.hours for s in range(200) for f in swarm_case(s)[1].faults if f.kind == "clock_skew"]
    assert min(hours) < -1 and max(hours) * 3600 > 10 * 300


def test_a_small_swarm_passes_and_replays() -> None:
    outcomes = run_swarm(range(3), devices=10, duration_s=120)
    assert [o.seed for o in outcomes] == [0, 1, 2]
    assert all(o.ok for o in outcomes), outcomes
    config, schedule = swarm_case(1, devices=10, duration_s=120)
    a = run_deterministic(config, schedule)
    b = run_deterministic(config, schedule)
    assert report_json(a.report) == report_json(b.report)


def test_swarm_seed_17_holds() -> None:
    config, schedule = swarm_case(17)
    result = run_deterministic(config, schedule)
    assert result.invariants.ok, result.invariants.summary()


def test_the_default_swarm_of_200_seeds_passes() -> None:
    """The acceptance run, ``novacron sim swarm --seeds 200`` in its default short
    form, as a child process (about a minute over two workers here)."""
    done = subprocess.run(
        [sys.executable, "-m", "novacron", "sim", "swarm", "--seeds", "200", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["seeds"] == 200
    assert summary["failed"] == []
