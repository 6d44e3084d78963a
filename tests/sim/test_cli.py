"""The simulator's subcommands, parsed and run through a parser of their own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from simulator import _cli
from sync._exceptions import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="novacron")
    _cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


def test_every_subcommand_has_help() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"sim", "demo"}
    for action in sub._choices_actions:
        assert action.help
    sim_sub = next(
        a for a in sub.choices["sim"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert set(sim_sub.choices) == {"run", "swarm"}
    assert all(a.help for a in sim_sub._choices_actions)


def test_sim_run_deterministic_writes_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(
        [
            "sim", "run", "--deterministic", "--devices", "30", "--regions", "2",
            "--duration", "150", "--seed", "3",
            "--faults", str(ROOT / "examples/faults/region-outage.yaml"),
            "--fleet", str(ROOT / "examples/fleets/default.yaml"),
            "--report", str(tmp_path / "rep"),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "convergence: ok" in out and "#0 partition_region" in out
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["meta"]["devices"] == 30 and doc["final"]["invariants_ok"] is True
    assert (tmp_path / "rep" / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_bad_schedule_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "faults:\n  - kind: partition_region\n    at: -1\n    duration: 5\n    region: r\n"
    )
    with pytest.raises(ConfigError) as info:
        _run(["sim", "run", "--deterministic", "--faults", str(bad)])
    assert info.value.field == "faults[0].partition_region.at"


def test_swarm_runs_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(
        [
            "sim",
            "swarm",
            "--seeds",
            "3",
            "--start-seed",
            "100",
            "--devices",
            "8",
            "--duration",
            "60",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["seeds"] == 3
    assert code == (1 if summary["failed"] else 0)
