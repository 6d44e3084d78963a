"""Edge-agent benchmarks: one function per figure, one JSON object out.

Usage::

    python bench/agent_bench.py --json            # full run (50,000 events)
    python bench/agent_bench.py --json --quick    # short run (5,000 events)

Figures (add new ones to :data:`FIGURES`; each takes a :class:`BenchConfig`
and returns a dict merged into the output object):

* ``journal_events_per_s`` — durable appends through :class:`Journal` (group
  commit, ``synchronous=FULL``) from many concurrent asyncio producers, each
  awaiting every append before the next one;
* ``journal_single_event_appends_per_s`` — the same with one event per call;
* ``raw_executemany_events_per_s`` — the baseline: plain ``sqlite3``
  ``executemany`` of the same rows into the same table layout, WAL and
  ``synchronous=FULL``, one transaction;
* ``journal_ratio_vs_raw`` — the first over the baseline.

Hooks left for later figures: ``idle_rss_mb`` and
``idle_upstream_bytes_per_hour`` (see :func:`idle_rss_mb` and
:func:`idle_upstream_bytes_per_hour`; they return ``{}`` until implemented,
so they are simply absent from the output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.journal import EventIn, Journal

Figures = dict[str, float | int | str]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Parameters shared by every figure.

    Attributes:
        workdir: directory for the SQLite files (same filesystem for all figures).
        events: events appended per journal figure.
        producers: concurrent asyncio producers.
        events_per_call: events per ``append_events`` call.
        payload_size: bytes per event payload.
        streams: distinct streams the producers spread over.
    """

    workdir: Path
    events: int
    producers: int
    events_per_call: int
    payload_size: int = 64
    streams: int = 8


def _rows(cfg: BenchConfig) -> list[tuple[str, int, str, bytes, int]]:
    payload = bytes(cfg.payload_size)
    now = time.time_ns() // 1_000_000
    per_stream = cfg.events // cfg.streams
    return [
        (f"dev/s{s}", seq, "metric", payload, now)
        for s in range(cfg.streams)
        for seq in range(1, per_stream + 1)
    ]


async def _journal_run(path: Path, cfg: BenchConfig, events_per_call: int) -> float:
    payload = bytes(cfg.payload_size)
    calls_per_producer = max(cfg.events // (cfg.producers * events_per_call), 1)
    total = calls_per_producer * cfg.producers * events_per_call
    async with Journal.open(path, quota_bytes=1 << 40) as journal:

        async def producer(i: int) -> None:
            stream = f"dev/s{i % cfg.streams}"
            batch = [EventIn("metric", payload) for _ in range(events_per_call)]
            for _ in range(calls_per_producer):
                await journal.append_events(stream, batch)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i in range(cfg.producers):
                tg.create_task(producer(i), name=f"bench-producer-{i}")
        elapsed = time.perf_counter() - start
    return total / elapsed


def journal_events_per_s(cfg: BenchConfig) -> Figures:
    """Durable group-committed appends from concurrent producers."""
    rate = asyncio.run(_journal_run(cfg.workdir / "journal.db", cfg, cfg.events_per_call))
    return {
        "journal_events_per_s": round(rate),
        "journal_events": cfg.events,
        "journal_producers": cfg.producers,
        "journal_events_per_call": cfg.events_per_call,
        "payload_bytes": cfg.payload_size,
    }


def journal_single_event_appends_per_s(cfg: BenchConfig) -> Figures:
    """Durable appends of one event per call (the worst case for per-call overhead)."""
    small = BenchConfig(
        cfg.workdir, cfg.events // 5, cfg.producers, 1, cfg.payload_size, cfg.streams
    )
    rate = asyncio.run(_journal_run(cfg.workdir / "journal-single.db", small, 1))
    return {"journal_single_event_appends_per_s": round(rate)}


def raw_executemany_events_per_s(cfg: BenchConfig) -> Figures:
    """Baseline: raw ``executemany`` of the same rows, WAL, ``synchronous=FULL``."""
    rows = _rows(cfg)
    conn = sqlite3.connect(cfg.workdir / "raw.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
            "seq INTEGER NOT NULL, kind TEXT NOT NULL, payload BLOB NOT NULL, "
            "ts INTEGER NOT NULL, UNIQUE (stream, seq))"
        )
        start = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO events (stream, seq, kind, payload, ts) VALUES (?, ?, ?, ?, ?)", rows
        )
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return {"raw_executemany_events_per_s": round(len(rows) / elapsed)}


def idle_rss_mb(cfg: BenchConfig) -> Figures:
    """Hook: resident memory of an idle agent (not implemented yet)."""
    del cfg
    return {}


def idle_upstream_bytes_per_hour(cfg: BenchConfig) -> Figures:
    """Hook: upstream bytes an idle agent sends per hour (not implemented yet)."""
    del cfg
    return {}


FIGURES: list[Callable[[BenchConfig], Figures]] = [
    raw_executemany_events_per_s,
    journal_events_per_s,
    journal_single_event_appends_per_s,
    idle_rss_mb,
    idle_upstream_bytes_per_hour,
]


def run_all(cfg: BenchConfig) -> Figures:
    """Run every figure and add the derived ratios."""
    out: Figures = {}
    for figure in FIGURES:
        out.update(figure(cfg))
    journal, raw = out.get("journal_events_per_s"), out.get("raw_executemany_events_per_s")
    if isinstance(journal, int) and isinstance(raw, int) and raw:
        out["journal_ratio_vs_raw"] = round(journal / raw, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="short run (5,000 events)")
    parser.add_argument("--events", type=int, help="events per journal figure")
    parser.add_argument("--producers", type=int, default=100, help="concurrent producers")
    parser.add_argument("--events-per-call", type=int, default=10, help="events per append")
    parser.add_argument("--dir", type=Path, help="directory for the SQLite files")
    args = parser.parse_args(argv)
    events = args.events or (5_000 if args.quick else 50_000)
    with tempfile.TemporaryDirectory(prefix="agent-bench-", dir=args.dir) as tmp:
        cfg = BenchConfig(Path(tmp), events, args.producers, args.events_per_call)
        out = run_all(cfg)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for key, value in sorted(out.items()):
            print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
