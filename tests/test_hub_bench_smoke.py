"""``bench/hub_bench.py --json --quick`` runs the hub and reports every figure.

No wall-clock thresholds (the machine is shared): the figures must exist, be
positive, and the API run must have had no failed request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "hub_bench.py"

FIGURES = (
    "placement_10k_ms",
    "ingest_deltas_per_s",
    "ingest_raw_executemany_rows_per_s",
    "ingest_ratio_vs_raw",
    "ingest_deltas_per_s_10_per_envelope",
    "api_p99_ms",
    "api_baseline_p99_ms",
    "api_p99_ratio_vs_bare",
    "api_requests",
)


def test_hub_bench_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--quick", "--devices", "2000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    [line] = proc.stdout.splitlines()
    out = json.loads(line)
    for key in FIGURES:
        assert type(out[key]) in {int, float}, key
        assert out[key] > 0, key
    assert out["api_errors"] == 0
    assert out["ingest_deltas"] == out["ingest_devices"] * 50
