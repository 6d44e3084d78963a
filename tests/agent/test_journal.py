"""Journal component tests on real SQLite files: writes, reads, acks, batching, closing."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database

from edge_agent._journal_schema import MIGRATIONS
from edge_agent.journal import (
    Delta,
    Dot,
    EventIn,
    Journal,
    JournalClosedError,
    JournalError,
    JournalOverflowError,
    JournalWriteError,
    StateEntry,
)

QUOTA = 64 << 20


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


def ev(payload: bytes, kind: str = "event") -> EventIn:
    return EventIn(kind, payload)


async def wait_pending(journal: Journal, rows: int) -> None:
    """Yield to the loop until ``rows`` rows are queued (tasks submitted)."""
    for _ in range(10_000):
        if journal.stats().pending_rows >= rows:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {journal.stats().pending_rows} rows pending")


def test_append_read_ack_deletes_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            seqs = await j.append_events("dev/ev", [ev(b"a"), ev(b"b"), ev(b"c", "metric")])
            assert seqs == [1, 2, 3]
            assert await j.append_events("dev/ev", [ev(b"d")]) == [4]
            assert await j.append_events("other", [EventIn("log", b"x", ts_ms=42)]) == [1]
            events = await j.read_events("dev/ev")
            assert [(e.seq, e.kind, e.payload) for e in events] == [
                (1, "event", b"a"),
                (2, "event", b"b"),
                (3, "metric", b"c"),
                (4, "event", b"d"),
            ]
            assert (await j.read_events("other"))[0].ts_ms == 42
            assert [e.seq for e in await j.read_events("dev/ev", after_seq=2, limit=1)] == [3]

            assert await j.ack_events("dev/ev", 2) == 2
            assert await j.acked_seq("dev/ev") == 2
            assert [e.seq for e in await j.read_events("dev/ev")] == [3, 4]
            assert await j.ack_events("dev/ev", 1) == 0  # behind the cursor: no-op
            assert await j.acked_seq("dev/ev") == 2
            assert await j.event_count() == 3
            assert await j.event_streams() == {"dev/ev": (3, 4), "other": (1, 1)}
            assert await j.append_events("dev/ev", []) == []

    run(main)


def test_seq_survives_reopen_after_everything_acked(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def first() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            assert await j.append_events("s", [ev(b"1"), ev(b"2"), ev(b"3")]) == [1, 2, 3]
            assert await j.ack_events("s", 3) == 3
            assert await j.event_count("s") == 0

    async def second() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            assert await j.acked_seq("s") == 3
            assert await j.append_events("s", [ev(b"4")]) == [4]

    run(first)
    run(second)


def test_deltas_acked_by_dot_are_deleted(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            scope = "device/d1"
            await j.add_deltas([Delta(scope, "d1", n, b"p%d" % n) for n in range(1, 6)])
            await j.add_deltas([Delta("fleet", "d1", 1, b"f")])
            await j.add_deltas([Delta(scope, "d1", 1, b"replayed")])  # duplicate dot: ignored
            pending = await j.pending_deltas(scope=scope)
            assert [d.dot for d in pending] == [Dot("d1", n) for n in range(1, 6)]
            assert pending[0].payload == b"p1"

            assert await j.ack_deltas(scope, [Dot("d1", 1), Dot("d1", 3), Dot("zz", 9)]) == 2
            assert [d.counter for d in await j.pending_deltas(scope=scope)] == [2, 4, 5]
            assert await j.ack_deltas_through(scope, {"d1": 4}) == 2
            assert [d.counter for d in await j.pending_deltas(scope=scope)] == [5]
            # Other scopes are untouched by acks of this one.
            assert [d.scope for d in await j.pending_deltas()] == ["device/d1", "fleet"]

    run(main)


def test_state_upsert_compacts_to_one_row_per_key(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def main() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            scope = "device/d1"
            for n in range(1, 101):
                await j.put_state(
                    [StateEntry(scope, "desired/web", b"v%d" % n, n, "hub", n)],
                    deltas=[Delta(scope, "hub", n, b"d")],
                )
            await j.put_state([StateEntry(scope, "labels/x", b"", 7, "d1", 1, tombstone=True)])
            entries = await j.read_state(scope)
            assert [(e.key, e.value, e.hlc, e.tombstone) for e in entries] == [
                ("desired/web", b"v100", 100, False),
                ("labels/x", b"", 7, True),
            ]
            assert await j.get_state(scope, "missing") is None
            got = await j.get_state(scope, "desired/web")
            assert got is not None and got.counter == 100 and got.origin == "hub"
            assert len(await j.pending_deltas(scope=scope)) == 100

    run(main)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM state").fetchone() == (2,)


def test_bd_seq_increments_on_every_open(tmp_path: Path) -> None:
    seen: list[int] = []

    async def once() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            seen.append(j.bd_seq)

    for _ in range(3):
        run(once)
    assert seen == [1, 2, 3]


def test_migrations_recorded_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def once() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            assert j.schema_version == len(MIGRATIONS.applied(Database(path)))

    run(once)
    run(once)
    db = Database(path)
    assert [m.name for m in MIGRATIONS.applied(db)] == ["0001_initial"]
    assert MIGRATIONS.pending(db) == []
    MIGRATIONS.apply(db)  # a no-op once applied
    assert len(MIGRATIONS.applied(db)) == 1
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (1,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


def test_group_commit_batches_queued_writes(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA, max_batch_rows=256) as j:
            before = j.transactions
            j._writer.pause()  # type: ignore[union-attr]
            tasks = [
                asyncio.create_task(j.append_events(f"s{i % 3}", [ev(b"x")])) for i in range(1000)
            ]
            await wait_pending(j, 1000)
            j._writer.resume()  # type: ignore[union-attr]
            results = await asyncio.gather(*tasks)
            assert j.transactions - before == math.ceil(1000 / 256)
            assert j.stats().committed_writes == 1000
            per_stream = sorted(r[0] for i, r in enumerate(results) if i % 3 == 0)
            assert per_stream == list(range(1, 335))

    run(main)


def test_group_commit_without_pausing_uses_fewer_transactions(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            before = j.transactions
            await asyncio.gather(*(j.append_events("s", [ev(b"x")]) for _ in range(2000)))
            assert j.transactions - before < 2000
            assert await j.event_count("s") == 2000

    run(main)


def test_close_flushes_queued_and_fails_blocked_writes(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def main() -> None:
        j = Journal.open(path, quota_bytes=QUOTA, max_pending_rows=10)
        await j.start()
        j._writer.pause()  # type: ignore[union-attr]
        tasks = [asyncio.create_task(j.append_events("s", [ev(b"%d" % i)])) for i in range(30)]
        await wait_pending(j, 10)
        await j.aclose()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        ok = [r for r in results if isinstance(r, list)]
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) == 10 and len(failed) == 20
        assert all(isinstance(r, JournalClosedError) for r in failed)
        await j.aclose()  # idempotent
        with pytest.raises(JournalClosedError):
            await j.append_events("s", [ev(b"late")])
        with pytest.raises(JournalClosedError):
            await j.read_events("s")

    run(main)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (10,)


def test_metric_overflow_is_refused_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def main() -> None:
        async with Journal.open(path, quota_bytes=QUOTA, max_pending_rows=5) as j:
            j._writer.pause()  # type: ignore[union-attr]
            queued = [
                asyncio.create_task(j.append_events("m", [ev(b"x", "metric")])) for _ in range(5)
            ]
            await wait_pending(j, 5)
            with pytest.raises(JournalOverflowError) as info:
                await j.append_events("m", [ev(b"a", "metric"), ev(b"b", "metric")])
            assert info.value.refused == 2 and info.value.limit_rows == 5
            # A non-metric write waits instead of failing.
            blocked = asyncio.create_task(j.append_events("m", [ev(b"e")]))
            await asyncio.sleep(0)
            assert not blocked.done()
            j._writer.resume()  # type: ignore[union-attr]
            await asyncio.gather(*queued)
            assert await blocked == [6]
            assert j.stats().refused_metrics == 2

    async def reopen() -> None:
        async with Journal.open(path, quota_bytes=QUOTA) as j:
            assert j.stats().refused_metrics == 2

    run(main)
    run(reopen)


def test_failed_write_is_isolated_from_its_batch(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            await j.append_events("s", [ev(b"1")])
            j._writer.pause()  # type: ignore[union-attr]
            good = asyncio.create_task(j.append_events("s", [ev(b"2")]))
            bad = asyncio.create_task(j.ack_events("s", 99))
            good2 = asyncio.create_task(j.append_events("t", [ev(b"3")]))
            await wait_pending(j, 3)
            j._writer.resume()  # type: ignore[union-attr]
            with pytest.raises(JournalError, match="beyond the last assigned"):
                await bad
            assert await good == [2]
            assert await good2 == [1]
            assert await j.append_events("s", [ev(b"4")]) == [3]

    run(main)


def test_cancelled_caller_does_not_break_the_journal(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            j._writer.pause()  # type: ignore[union-attr]
            task = asyncio.create_task(j.append_events("s", [ev(b"1")]))
            await wait_pending(j, 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            j._writer.resume()  # type: ignore[union-attr]
            # The queued write still lands (cancelling the await does not undo it).
            assert await j.append_events("s", [ev(b"2")]) == [2]
            assert j.stats().pending_rows == 0

    run(main)


@pytest.mark.parametrize(
    ("stream", "event", "message"),
    [
        ("", ev(b"x"), "stream"),
        ("s", ev(b"x", "dropped"), "reserved"),
        ("s", ev(b"x", ""), "reserved"),
        ("s", EventIn("event", "text"), "bytes"),  # type: ignore[arg-type]
    ],
)
def test_misuse_raises_journal_error(
    tmp_path: Path, stream: str, event: EventIn, message: str
) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            with pytest.raises(JournalError, match=message):
                await j.append_events(stream, [event])

    run(main)


def test_use_before_start_and_bad_arguments(tmp_path: Path) -> None:
    async def main() -> None:
        j = Journal.open(tmp_path / "j.db", quota_bytes=QUOTA)
        with pytest.raises(JournalClosedError):
            await j.append_events("s", [ev(b"x")])
        with pytest.raises(JournalClosedError):
            j.stats()
        async with j:
            with pytest.raises(JournalError, match="already started"):
                await j.start()

    run(main)
    with pytest.raises(JournalError):
        Journal(tmp_path / "x.db", quota_bytes=0)


def test_unopenable_path_raises_without_quarantine(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(JournalError, match="cannot open"):
            async with Journal.open(tmp_path / "missing" / "j.db", quota_bytes=QUOTA):
                pass

    run(main)
    assert list(tmp_path.iterdir()) == []


def test_journal_errors_derive_from_agent_error() -> None:
    from edge_agent._exceptions import AgentError

    for exc in (JournalError, JournalClosedError, JournalOverflowError):
        assert issubclass(exc, AgentError)


def test_disk_full_fails_the_write_and_the_journal_recovers(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            writer = j._writer
            assert writer is not None
            writer.pause()  # the writer thread is idle: safe to touch its connection
            (pages,) = writer.conn.execute("PRAGMA page_count").fetchone()
            writer.conn.execute(f"PRAGMA max_page_count = {pages + 2}")
            writer.resume()
            with pytest.raises(JournalWriteError, match="full") as info:
                await j.append_events("s", [ev(bytes(100_000))])
            assert isinstance(info.value.__cause__, sqlite3.Error)
            writer.pause()
            writer.conn.execute("PRAGMA max_page_count = 1073741823")
            writer.resume()
            assert await j.append_events("s", [ev(b"ok")]) == [1]
            assert j.stats().event_bytes < 1000

    run(main)


def test_freeze_size_fails_writes_as_a_full_disk_until_thawed(tmp_path: Path) -> None:
    async def main() -> None:
        async with Journal.open(tmp_path / "j.db", quota_bytes=QUOTA) as j:
            await j.append_events("s", [ev(b"before")])
            await j.freeze_size(True)
            with pytest.raises(JournalWriteError, match="full"):
                await j.append_events("s", [ev(bytes(200_000))])
            await j.freeze_size(False)
            assert await j.append_events("s", [ev(b"after")]) == [2]
            events = await j.read_events("s")
            assert [e.payload for e in events] == [b"before", b"after"]

    run(main)
