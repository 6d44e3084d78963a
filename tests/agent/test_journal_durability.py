"""Journal durability: corrupt files, retention quota, and a SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import textwrap
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgpack
import pytest

from edge_agent.journal import Delta, EventIn, Journal, StateEntry
from tests.sqlite_helpers import imports_sqlite_utils, sigkill_mid_stream

QUOTA = 64 << 20


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


def _make_journal(path: Path, events: int, payload_size: int = 200) -> None:
    async def main() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            for _ in range(0, events, 500):
                await j.append_events(
                    "s", [EventIn("event", bytes(payload_size)) for _ in range(500)]
                )
            await j.put_state([StateEntry("device/d", "k", b"v", 1, "d", 1)])

    run(main)


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 500)


def _truncated(path: Path) -> None:
    _make_journal(path, 3000)
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 2)


def _scribbled(path: Path) -> None:
    _make_journal(path, 3000)
    size = path.stat().st_size
    with path.open("r+b") as fh:
        # Page 1 holds the schema; overwrite interior pages with garbage.
        for offset in range(8192, size - 4096, 16384):
            fh.seek(offset)
            fh.write(b"\xa5" * 4096)


@pytest.mark.parametrize("damage", [_not_sqlite, _truncated, _scribbled])
def test_corrupt_file_is_quarantined_and_journal_works(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.db"
    damage(path)
    (tmp_path / "j.db-wal").write_bytes(b"stale wal")
    (tmp_path / "j.db-shm").write_bytes(b"stale shm")

    async def main() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            assert j.needs_snapshot
            moved = j.quarantined_path
            assert moved is not None and moved.name.startswith("j.db.corrupt-")
            quarantined.append(moved)
            assert j.bd_seq == 1
            assert await j.event_count() == 0
            assert await j.append_events("s", [EventIn("event", b"fresh")]) == [1]
            assert [e.payload for e in await j.read_events("s")] == [b"fresh"]

    quarantined: list[Path] = []
    with caplog.at_level(logging.WARNING, logger="edge_agent._journal_schema"):
        run(main)
    moved = quarantined[0]
    assert moved.exists()
    # The -wal/-shm of the bad file went with it (SQLite itself may rewrite or
    # remove them while the check runs; a non-SQLite file is never opened).
    for suffix in ("-wal", "-shm"):
        fresh = Path(f"{path}{suffix}")
        assert not fresh.exists() or not fresh.read_bytes().startswith(b"stale")
    if damage is _not_sqlite:
        assert Path(f"{moved}-wal").read_bytes() == b"stale wal"
        assert Path(f"{moved}-shm").read_bytes() == b"stale shm"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage()

    async def reopen() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            assert not j.needs_snapshot and j.quarantined_path is None
            assert j.bd_seq == 2

    run(reopen)


def test_quick_check_mode_also_opens_a_sound_file(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    _make_journal(path, 500)

    async def main() -> None:
        async with Journal.open(path, quota_bytes=QUOTA, check="quick") as j:
            assert not j.needs_snapshot
            assert await j.event_count() == 500

    run(main)


def test_quota_drops_oldest_metrics_and_records_the_drop(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    quota = 50_000
    dropped_markers: list[dict[str, Any]] = []

    async def main() -> None:
        async with Journal.open(path, quota_bytes=quota) as j:
            await j.put_state([StateEntry("device/d", "desired/w", b"v" * 5000, 1, "hub", 1)])
            await j.add_deltas([Delta("device/d", "d", n, b"x" * 1000) for n in range(1, 21)])
            important = await j.append_events("d/ev", [EventIn("event", b"exit") for _ in range(5)])
            for _ in range(10):
                await j.append_events("d/m", [EventIn("metric", bytes(100)) for _ in range(50)])
            stats = j.stats()
            assert stats.event_bytes <= quota
            assert stats.dropped_metrics > 0 and stats.dropped_events == 0

            metrics = await j.read_events("d/m", limit=10_000)
            markers = [e for e in metrics if e.kind == "dropped"]
            kept = [e.seq for e in metrics if e.kind == "metric"]
            assert markers
            for m in markers:
                dropped_markers.append(msgpack.unpackb(m.payload))
            assert sum(d["count"] for d in dropped_markers) == stats.dropped_metrics
            assert dropped_markers[0]["from_seq"] == 1
            assert all(d["reason"] == "quota" and d["kind"] == "metric" for d in dropped_markers)
            # Oldest first: what is kept is the newest metrics, gaps only for markers.
            gaps = set(range(kept[0], kept[-1] + 1)) - set(kept)
            assert gaps <= {m.seq for m in markers}
            assert kept[-1] > max(d["to_seq"] for d in dropped_markers)
            present = {e.seq for e in metrics}
            missing = set(range(1, max(present) + 1)) - present
            assert len(missing) == stats.dropped_metrics
            assert max(missing) < kept[0]
            # Non-metric events, state and deltas are untouched.
            assert [e.seq for e in await j.read_events("d/ev")] == important
            state = await j.get_state("device/d", "desired/w")
            assert state is not None and state.value == b"v" * 5000
            assert len(await j.pending_deltas()) == 20
            return_stats.append(stats.dropped_metrics)

    return_stats: list[int] = []
    run(main)

    async def reopen() -> None:
        async with Journal.open(path, quota_bytes=quota) as j:
            assert j.stats().dropped_metrics == return_stats[0]
            assert j.stats().event_bytes <= quota

    run(reopen)


def test_quota_falls_back_to_non_metric_events_when_no_metric_is_left(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=20_000) as j:
            for _ in range(10):
                await j.append_events("d/ev", [EventIn("event", bytes(100)) for _ in range(50)])
            stats = j.stats()
            assert stats.dropped_events > 0 and stats.dropped_metrics == 0
            assert stats.event_bytes <= 20_000
            events = await j.read_events("d/ev", limit=10_000)
            marker = next(e for e in events if e.kind == "dropped")
            assert msgpack.unpackb(marker.payload)["kind"] == "event"

    run(main)


_CHILD = textwrap.dedent(
    """
    import asyncio
    import sys

    from edge_agent.journal import EventIn, Journal


    async def main(path: str) -> None:
        async with Journal.open(path, quota_bytes=1 << 30, check="quick") as j:
            print("ready", flush=True)
            for i in range(10_000):
                (seq,) = await j.append_events("d/ev", [EventIn("event", b"e%d" % i)])
                sys.stdout.write(f"{seq}\\n")
                sys.stdout.flush()


    asyncio.run(main(sys.argv[1]))
    """
)


def test_sigkill_mid_stream_loses_no_acknowledged_event(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    printed = sigkill_mid_stream(_CHILD, path, at_least=1500)

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute(
            "SELECT seq, COUNT(*), MIN(payload) FROM events GROUP BY seq"
        ).fetchall()
    conn.close()
    present = {seq: (count, payload) for seq, count, payload in rows}
    for seq in printed:
        assert present[seq] == (1, b"e%d" % (seq - 1))
    assert sorted(present) == list(range(1, len(present) + 1))

    async def reopen() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            assert not j.needs_snapshot
            assert j.bd_seq == 2
            assert await j.append_events("d/ev", [EventIn("event", b"after")]) == [len(present) + 1]

    run(reopen)


def test_sqlite_utils_is_imported_only_when_a_migration_runs(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    imports = "from edge_agent.journal import EventIn, Journal"
    body = """
async with Journal.open(path, quota_bytes=1 << 20) as j:
    await j.append_events("s", [EventIn("event", b"x")])
    """
    assert imports_sqlite_utils(imports, body, path)  # a new file: the migrations run
    assert not imports_sqlite_utils(imports, body, path)  # up to date: never imported
