"""``bench/sync_bench.py --json --quick`` runs and reports every figure.

No wall-clock thresholds: this machine is shared, so the figures only have to
exist and be positive; the README targets are checked by hand on the reference
gateway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sync_bench.py"

RATES = (
    "baseline_msgpack_roundtrip_per_s",
    "merge_deltas_per_s",
    "encode_sign_batches_per_s",
    "verify_decode_batches_per_s",
    "e2e_deltas_per_s",
    "merge_ratio_vs_msgpack",
    "e2e_ratio_vs_msgpack",
    "encode_sign_ratio_vs_msgpack",
    "verify_decode_ratio_vs_msgpack",
    "cpu_count",
)


def test_sync_bench_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    for key in RATES:
        value = out[key]
        assert type(value) in {int, float}, key
        assert value > 0, key
    for key in ("python", "machine"):
        assert isinstance(out[key], str), key
        assert out[key], key
