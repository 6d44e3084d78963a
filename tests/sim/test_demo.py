"""``novacron demo``: the one-command demo, run as a user runs it (a subprocess).

The default suite runs a 24-second demo (outage at 8 s, heal at 16 s) and a
Ctrl-C; the 60-second acceptance run (``--duration 60``, the README's Quick
start in a fresh venv) is marked slow and runs with ``NOVACRON_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from simulator.demo import DEMO_DEPLOYMENT, demo_schedule

ROOT = Path(__file__).resolve().parents[2]


def _demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "novacron", "demo", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def _check_story(out: str, devices: int = 12) -> None:
    half = devices // 2
    assert "hub API      http://127.0.0.1:" in out
    assert "/api/v1/devices" in out and "admin token  nct_" in out
    assert "/metrics" in out and "/api/v1/events/stream" in out
    assert "anonymous access: demo only" in out
    assert re.search(rf"enrolled {devices} devices with enrollment tokens", out)
    outage = out.index("OUTAGE: region us-east cut from the hub")
    change = out.index("applied sensor-gateway v2")
    heal = out.index("HEAL: region us-east reconnected")
    assert outage < change < heal
    # The hub notices the cut region, then every device converges after the heal.
    assert f"us-east {half}/{half} online (hub: relay-offline)" in out[outage:heal]
    assert "CONVERGED" in out[heal:]
    assert re.search(r"every replica converged [0-9.]+ s after the heal", out)
    assert re.search(rf"eu-west\s+{half}\s+{half}\s+{half}\s+v2 x{half}", out)
    assert re.search(rf"us-east\s+{half}\s+{half}\s+{half}\s+v2 x{half}", out)
    assert "invariant convergence: ok" in out
    assert "invariant signed_desired: ok" in out
    assert "RESULT: OK" in out


def test_demo_shows_outage_heal_and_convergence() -> None:
    result = _demo("--duration", "24", "--devices", "12", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    _check_story(result.stdout)
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("NOVACRON_SLOW_TESTS") != "1", reason="slow: set NOVACRON_SLOW_TESTS=1"
)
def test_demo_duration_60_the_readme_command(tmp_path: Path) -> None:
    """The README's Quick start in a fresh venv with nothing but the project
    installed (its dependencies come from the package index)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-e", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    result = subprocess.run(
        [str(venv / "bin" / "novacron"), "demo", "--duration", "60", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _check_story(result.stdout, devices=24)  # the default fleet


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "novacron", "demo", "--devices", "4",
            "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        for line in proc.stdout:
            lines.append(line)
            if "CONVERGED" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert "stopping (Ctrl-C)" in out, out + err
    assert proc.returncode == 0, out + err  # stopped before the outage: converged
    # --data-dir keeps the data: the hub's store and every device's journal.
    assert (tmp_path / "data" / "hub" / "hub.db").exists()
    assert len(list((tmp_path / "data" / "devices").glob("*/journal.db"))) == 4


def test_bad_listen_is_a_usage_error() -> None:
    result = _demo("--listen", "nowhere", timeout=30)
    assert result.returncode == 2
    assert "--listen" in result.stderr


def test_example_file_is_the_built_in_deployment() -> None:
    text = (ROOT / "examples" / "demo" / "deployment.yaml").read_text()
    assert text == DEMO_DEPLOYMENT
    doc = yaml.safe_load(text)
    assert doc["spec"]["mode"] == "each" and len(doc["spec"]["rollout"]["waves"]) == 3


def test_schedule_scales_with_duration() -> None:
    assert demo_schedule(None) == demo_schedule(60)
    plan = demo_schedule(60)
    assert (plan.cut_at, plan.change_at, plan.heal_at) == (20, 25, 40)
    short = demo_schedule(30)
    assert short.cut_at < short.change_at < short.heal_at < 30
