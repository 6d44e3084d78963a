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

Idle-agent figures (a real agent process, a private Mosquitto; both need
``mosquitto`` installed and report ``*_skipped`` without it):

* ``idle_rss_mb`` — ``VmRSS`` of an idle agent running ten process workloads,
  started as the systemd unit starts it (same command, same ``Environment=``,
  its bytecode cache filled as ``novacron agent install`` fills it), with its
  anonymous/file split, PSS and thread count (``idle_rss_anon_mb``,
  ``idle_rss_file_mb``, ``idle_pss_mb``, ``idle_threads``),
  ``rss_baseline_python_mb`` (a bare interpreter) and ``rss_ratio``;
* ``idle_upstream_bytes_per_hour`` — what that agent publishes upstream per
  hour once synced with a hub peer, at the profile's default telemetry
  interval, measured over ``--idle-window`` seconds (60; 30 with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _support  # bench/_support.py, next to this script

from edge_agent.journal import EventIn, Journal
from firmware_profiles import load_profile

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
        idle_window_s: measuring window of the idle-upstream figure (rounded up
            to whole telemetry intervals).
    """

    workdir: Path
    events: int
    producers: int
    events_per_call: int
    payload_size: int = 64
    streams: int = 8
    idle_window_s: float = 60.0


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


IDLE_WORKLOADS = 10
SETTLE_S = 3.0


def idle_rss_mb(cfg: BenchConfig) -> Figures:
    """Resident memory of an idle agent process with ten running workloads.

    A real agent (``python -m novacron agent run``, the systemd unit's command
    and environment, see :class:`_support.AgentProcess`; its bytecode cache
    filled by :func:`_support.prepare_agent` as the install fills it; process
    driver, enrolled, its relay a private Mosquitto with no hub behind it, link
    up) starts with :data:`IDLE_WORKLOADS` ``sleep 3600`` workloads in its journal.
    Once all run and :data:`SETTLE_S` have passed, ``VmRSS`` of the agent
    process alone (not its children) is read from ``/proc`` until three samples
    0.2 s apart agree. The baseline is a bare ``python -c 'input()'`` of the same
    interpreter, measured the same way.

    ``idle_rss_mb`` is ``VmRSS``: shared library pages count in full, as in
    ``ps``/``top`` and the figures the issue compares with. Reported beside it,
    from the same moment: ``idle_rss_anon_mb`` (the agent's own heap and
    stacks), ``idle_rss_file_mb`` (mapped interpreter, extension modules and
    libraries), ``idle_pss_mb`` (shared pages split between the processes that
    map them; the bench's own interpreter maps the same libraries, so this is
    lower than on a gateway where the agent runs alone) and ``idle_threads``.
    """
    if not _support.mosquitto_available():
        return {"idle_rss_skipped": "mosquitto is not installed"}
    workdir = cfg.workdir / "idle-rss"
    with _support.mosquitto(workdir / "mosquitto") as port:
        setup = asyncio.run(
            _support.prepare_agent(workdir, port, _support.sleeper_specs(IDLE_WORKLOADS))
        )
        with _support.AgentProcess(setup, workdir / "agent.log") as agent:
            agent.wait_running(IDLE_WORKLOADS, timeout=60)
            agent.wait_link(timeout=30)
            time.sleep(SETTLE_S)
            agent_kb = _support.stable_rss_kb(agent.pid)
            sample = _support.read_memory(agent.pid)
        with _support.bare_python() as pid:
            base_kb = _support.stable_rss_kb(pid)
    return {
        "idle_rss_mb": round(agent_kb / 1024, 1),
        "idle_rss_anon_mb": round(sample.anon_kb / 1024, 1),
        "idle_rss_file_mb": round(sample.file_kb / 1024, 1),
        "idle_pss_mb": round(sample.pss_kb / 1024, 1),
        "idle_threads": sample.threads,
        "idle_rss_workloads": IDLE_WORKLOADS,
        "rss_baseline_python_mb": round(base_kb / 1024, 1),
        "rss_ratio": round(agent_kb / base_kb, 2),
    }


def idle_upstream_bytes_per_hour(cfg: BenchConfig) -> Figures:
    """Bytes an idle, synced agent publishes upstream, extrapolated to one hour.

    The agent of :func:`idle_rss_mb` (same config, same ten workloads) runs at
    its profile's default telemetry interval (``generic-x86_64``: 15 s) with a
    hub-side :class:`~sync.protocol.SyncSession` in this process answering on
    the device's ``down`` topic. After the initial sync (every workload reported
    ``running`` to the hub, then :data:`SETTLE_S`), everything published on the
    device's ``up`` topic during the window is counted from the hub's view:

    * ``idle_upstream_bytes_per_hour`` — MQTT 3.1.1 QoS 1 PUBLISH packets, i.e.
      per message ``1 + len(varint(remaining)) + 2 + len(topic) + 2 +
      len(payload)`` (see :func:`_support.publish_wire_bytes`); TCP/IP headers,
      PUBACKs (4 bytes per ``down`` message, see ``idle_downstream_messages``)
      and PINGREQs are not included;
    * ``idle_upstream_payload_bytes_per_hour`` — payloads only;
    * ``idle_upstream_agent_bytes_out_per_hour`` — the agent's own ``bytes_out``
      counter (payloads it published), read over the control socket.

    The window is rounded up to a whole number of telemetry intervals so that
    it holds a fixed number of metric samples whatever its phase.
    """
    if not _support.mosquitto_available():
        return {"idle_upstream_skipped": "mosquitto is not installed"}
    return asyncio.run(_idle_upstream(cfg))


async def _idle_upstream(cfg: BenchConfig) -> Figures:
    workdir = cfg.workdir / "idle-upstream"
    interval = load_profile(_support.PROFILE).telemetry_interval_s
    window = interval * max(1, math.ceil(cfg.idle_window_s / interval))
    with _support.mosquitto(workdir / "mosquitto") as port:
        setup = await _support.prepare_agent(workdir, port, _support.sleeper_specs(IDLE_WORKLOADS))
        hub = _support.HubPeer(port, setup)
        async with asyncio.TaskGroup() as tg:
            hub_task = tg.create_task(hub.run(), name="bench-hub")
            try:
                async with asyncio.timeout(10):
                    await hub.connected.wait()
                agent = _support.AgentProcess(setup, workdir / "agent.log")
                try:
                    agent.start()
                    out = await _upstream_window(agent, hub, window)
                finally:
                    await asyncio.to_thread(agent.stop)
            finally:
                hub_task.cancel()
    out["idle_upstream_telemetry_interval_s"] = interval
    return out


async def _upstream_window(
    agent: _support.AgentProcess, hub: _support.HubPeer, window: float
) -> Figures:
    await asyncio.to_thread(agent.wait_running, IDLE_WORKLOADS, 60)
    try:
        async with asyncio.timeout(60):
            await hub.wait_reported("running", IDLE_WORKLOADS)
    except TimeoutError as exc:
        raise _support.BenchError(f"hub saw only {hub.reported_phases()} after 60 s") from exc
    await asyncio.sleep(SETTLE_S)
    before = hub.counters.snapshot()
    link_before = (await asyncio.to_thread(agent.control, "status"))["link"]
    await asyncio.sleep(window)
    after = hub.counters.snapshot()
    link_after = (await asyncio.to_thread(agent.control, "status"))["link"]
    rss_kb = _support.read_rss_kb(agent.pid)
    per_hour = 3600 / window
    agent_bytes = link_after["bytes_out"] - link_before["bytes_out"]
    return {
        "idle_upstream_bytes_per_hour": round((after.wire_bytes - before.wire_bytes) * per_hour),
        "idle_upstream_payload_bytes_per_hour": round(
            (after.payload_bytes - before.payload_bytes) * per_hour
        ),
        "idle_upstream_agent_bytes_out_per_hour": round(agent_bytes * per_hour),
        "idle_upstream_agent_messages": link_after["messages_out"] - link_before["messages_out"],
        "idle_upstream_messages": after.messages - before.messages,
        "idle_downstream_messages": after.down_messages - before.down_messages,
        "idle_upstream_window_s": window,
        "idle_synced_rss_mb": round(rss_kb / 1024, 1),
    }


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
    parser.add_argument(
        "--idle-window",
        type=float,
        help="seconds of idle upstream traffic to measure (default: 60; 30 with --quick)",
    )
    args = parser.parse_args(argv)
    events = args.events or (5_000 if args.quick else 50_000)
    idle_window = args.idle_window or (30.0 if args.quick else 60.0)
    with tempfile.TemporaryDirectory(prefix="agent-bench-", dir=args.dir) as tmp:
        cfg = BenchConfig(
            Path(tmp), events, args.producers, args.events_per_call, idle_window_s=idle_window
        )
        out = run_all(cfg)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for key, value in sorted(out.items()):
            print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
