"""``bench/relay_bench.py --json --quick`` runs and reports every figure.

No wall-clock thresholds (the machine is shared): the figures only have to exist
and be positive numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_mqtt import MOSQUITTO

BENCH = Path(__file__).resolve().parents[1] / "bench" / "relay_bench.py"

NUMBERS = (
    "forwarded_deltas_per_s",
    "baseline_passthrough_msgs_per_s",
    "baseline_passthrough_deltas_per_s",
    "ratio",
    "devices",
    "deltas_per_envelope",
    "envelopes",
    "batches",
    "cpu_count",
    "relay_cpu_s",
)


@pytest.mark.integration
def test_relay_bench_quick_json() -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (CI installs it)")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    for key in NUMBERS:
        value = out[key]
        assert type(value) in {int, float}, key
        assert value > 0, key
    assert out["deltas"] == out["envelopes"] * out["deltas_per_envelope"]
    assert isinstance(out["python"], str)
    assert out["python"]
    assert out["relay_mode"] == "subprocess"
