"""Sync-core benchmarks: one function per figure, one JSON object out.

Usage::

    python bench/sync_bench.py --json            # full run
    python bench/sync_bench.py --json --quick    # short run (smoke test, CI)

Every figure works on batches of ``--batch`` (500) wire-form LWW entries, the
unit a ``DELTAS`` message carries, and runs single-threaded in this process.
Rates are the best of ``--repeats`` timed runs (``time.perf_counter``, garbage
collector paused while timing, as ``timeit`` does), so a noisy neighbour on a
shared machine lowers the spread, not the figure.

Figures (add new ones to :data:`FIGURES`; each takes a :class:`BenchConfig` and
returns a dict merged into the output object):

* ``baseline_msgpack_roundtrip_per_s`` — raw ``msgpack.packb`` + ``unpackb`` of
  the same 500-entry list, in deltas/s: the floor every other figure is
  compared with;
* ``merge_deltas_per_s`` — :meth:`LwwMap.merge_batch` of new writes into a map
  already holding ``--keys`` (100,000) keys;
* ``encode_sign_batches_per_s`` — ``packb`` of a ``DELTAS`` body, then
  :func:`encode_envelope` (Ed25519 signature included);
* ``verify_decode_batches_per_s`` — :func:`decode_envelope` (signature check)
  then the strict body decode;
* ``e2e_deltas_per_s`` — encode, sign, verify, decode and merge, per delta;
* ``*_ratio_vs_msgpack`` — each figure, in deltas/s, over the baseline measured
  in the same run (machine speed cancels out; compare these across machines).

README targets on the reference gateway: merge >= 200,000 deltas/s and end to
end >= 100,000 deltas/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from sync.crdt import LwwMap
from sync.envelope import decode_envelope, encode_envelope, packb
from sync.hlc import pack_ts
from sync.keys import KeyRing, Signer

Figures = dict[str, float | int | str]

_SCOPE = "device/bench"
_SESSION = "bench-session"
_T0_MS = 1_700_000_000_000


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Parameters shared by every figure.

    Attributes:
        keys: keys in the LWW map the merge figures write into.
        batch: wire entries per batch (per envelope).
        batches: batches per timed run.
        repeats: timed runs per figure; the best one counts.
        value_size: bytes of each entry's string value.
    """

    keys: int
    batch: int
    batches: int
    repeats: int
    value_size: int = 32


def _batches(cfg: BenchConfig, origin: str, ts_base: int) -> list[list[list[Any]]]:
    """Wire-entry batches overwriting existing keys with fresh dots of ``origin``.

    Keys are spread over the whole map with a stride so consecutive writes do not
    hit neighbouring dict slots; every timestamp is above ``ts_base``, so every
    entry wins and the merge does its full work.
    """
    value = "v" * cfg.value_size
    stride = 7_919  # prime: visits every key before repeating one
    out: list[list[list[Any]]] = []
    n = 0
    for _ in range(cfg.batches):
        batch: list[list[Any]] = []
        for _ in range(cfg.batch):
            n += 1
            key = f"k{(n * stride) % cfg.keys:07d}"
            batch.append([key, ts_base + n, origin, n, False, value])
        out.append(batch)
    return out


def _seeded_map(cfg: BenchConfig) -> LwwMap:
    """A map holding ``cfg.keys`` keys written by one origin."""
    m = LwwMap()
    value = "v" * cfg.value_size
    ts = pack_ts(_T0_MS, 0)
    entries = [[f"k{i:07d}", ts + i, "seed", i + 1, False, value] for i in range(cfg.keys)]
    for i in range(0, len(entries), cfg.batch):
        m.merge_batch(entries[i : i + cfg.batch])
    return m


def _best_rate(cfg: BenchConfig, run: Callable[[int], int]) -> float:
    """Best items/s over ``cfg.repeats`` runs; ``run(repeat)`` returns items done."""
    best = 0.0
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(cfg.repeats):
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            done = run(r)
            elapsed = time.perf_counter() - start
            gc.enable()
            best = max(best, done / elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def _repeat_ts(cfg: BenchConfig, r: int) -> int:
    """Timestamp base of repeat ``r``: above every earlier write, so writes win."""
    return pack_ts(_T0_MS + 1_000 * (r + 1), 0) + cfg.keys


def baseline_msgpack_roundtrip_per_s(cfg: BenchConfig) -> Figures:
    """Raw msgpack ``packb`` + ``unpackb`` of the same entry lists, in deltas/s."""
    batches = _batches(cfg, "bench", _repeat_ts(cfg, 0))

    def run(_r: int) -> int:
        for batch in batches:
            msgpack.unpackb(msgpack.packb(batch, use_bin_type=True), raw=False)
        return cfg.batch * cfg.batches

    return {"baseline_msgpack_roundtrip_per_s": round(_best_rate(cfg, run))}


def merge_deltas_per_s(cfg: BenchConfig) -> Figures:
    """``merge_batch`` of fresh wire entries into a ``cfg.keys``-key map."""
    m = _seeded_map(cfg)
    # A new origin per repeat: a dot seen before would be skipped, not merged.
    runs = [_batches(cfg, f"bench{r}", _repeat_ts(cfg, r)) for r in range(cfg.repeats)]

    def run(r: int) -> int:
        for batch in runs[r]:
            m.merge_batch(batch)
        return cfg.batch * cfg.batches

    rate = _best_rate(cfg, run)
    return {"merge_deltas_per_s": round(rate), "merge_map_keys": len(m)}


def _body(batch: list[list[Any]]) -> bytes:
    return packb({"s": _SESSION, "sc": _SCOPE, "d": batch, "c": None})


def _keys() -> tuple[Signer, KeyRing]:
    signer = Signer.generate("bench")
    ring = KeyRing()
    ring.add(signer.public_key_bytes, "bench")
    return signer, ring


def encode_sign_batches_per_s(cfg: BenchConfig) -> Figures:
    """``packb`` of a ``DELTAS`` body, then sign and encode the envelope."""
    signer, _ = _keys()
    batches = _batches(cfg, "bench", _repeat_ts(cfg, 0))
    ts = _repeat_ts(cfg, 0)

    def run(_r: int) -> int:
        for seq, batch in enumerate(batches):
            encode_envelope("DELTAS", "bench", seq, ts, _body(batch), signer)
        return cfg.batches

    return {"encode_sign_batches_per_s": round(_best_rate(cfg, run), 1)}


def verify_decode_batches_per_s(cfg: BenchConfig) -> Figures:
    """Decode and verify the envelope, then strictly decode its body."""
    signer, ring = _keys()
    ts = _repeat_ts(cfg, 0)
    wire = [
        encode_envelope("DELTAS", "bench", seq, ts, _body(batch), signer)
        for seq, batch in enumerate(_batches(cfg, "bench", ts))
    ]

    def run(_r: int) -> int:
        for data in wire:
            decode_envelope(data, ring).decode_body()
        return cfg.batches

    return {
        "verify_decode_batches_per_s": round(_best_rate(cfg, run), 1),
        "envelope_bytes": len(wire[0]),
    }


def e2e_deltas_per_s(cfg: BenchConfig) -> Figures:
    """Encode, sign, verify, decode and merge into the ``cfg.keys``-key map."""
    signer, ring = _keys()
    m = _seeded_map(cfg)
    runs = [_batches(cfg, f"e2e{r}", _repeat_ts(cfg, r)) for r in range(cfg.repeats)]

    def run(r: int) -> int:
        ts = _repeat_ts(cfg, r)
        for seq, batch in enumerate(runs[r]):
            data = encode_envelope("DELTAS", "bench", seq, ts, _body(batch), signer)
            body = decode_envelope(data, ring).decode_body()
            assert isinstance(body, dict)
            m.merge_batch(body["d"], body["c"])
        return cfg.batch * cfg.batches

    return {"e2e_deltas_per_s": round(_best_rate(cfg, run))}


FIGURES: list[Callable[[BenchConfig], Figures]] = [
    baseline_msgpack_roundtrip_per_s,
    merge_deltas_per_s,
    encode_sign_batches_per_s,
    verify_decode_batches_per_s,
    e2e_deltas_per_s,
]

_RATIOS = {
    "merge_ratio_vs_msgpack": ("merge_deltas_per_s", 1),
    "e2e_ratio_vs_msgpack": ("e2e_deltas_per_s", 1),
    "encode_sign_ratio_vs_msgpack": ("encode_sign_batches_per_s", 0),
    "verify_decode_ratio_vs_msgpack": ("verify_decode_batches_per_s", 0),
}


def run_all(cfg: BenchConfig) -> Figures:
    """Run every figure, then add the ratios and the machine metadata."""
    out: Figures = {}
    for figure in FIGURES:
        out.update(figure(cfg))
    base = out["baseline_msgpack_roundtrip_per_s"]
    for name, (key, per_delta) in _RATIOS.items():
        value = out.get(key)
        if isinstance(value, int | float) and isinstance(base, int | float) and base:
            deltas_per_s = value if per_delta else value * cfg.batch
            out[name] = round(deltas_per_s / base, 3)
    out.update(
        {
            "batch_entries": cfg.batch,
            "batches_per_run": cfg.batches,
            "repeats": cfg.repeats,
            "value_bytes": cfg.value_size,
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "msgpack": ".".join(map(str, msgpack.version)),
            "cpu_count": os.cpu_count() or 0,
            "machine": platform.machine(),
            "platform": platform.platform(terse=True),
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--keys", type=int, help="keys in the merged-into map (100,000)")
    parser.add_argument("--batch", type=int, default=500, help="entries per batch")
    parser.add_argument("--batches", type=int, help="batches per timed run")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (best counts)")
    parser.add_argument("--value-size", type=int, default=32, help="bytes per value")
    args = parser.parse_args(argv)
    cfg = BenchConfig(
        keys=args.keys or (10_000 if args.quick else 100_000),
        batch=args.batch,
        batches=args.batches or (4 if args.quick else 200),
        repeats=args.repeats or (2 if args.quick else 5),
        value_size=args.value_size,
    )
    out = run_all(cfg)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for key, value in sorted(out.items()):
            print(f"{key:36} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
