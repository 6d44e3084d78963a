"""The embedded SQLite hub store: the Store conformance suite, then SQLite specifics
(WAL, migrations, corrupt files, pruning, threads), on real files in tmp_path."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cloud_hub._sqlite_store import SQLiteStore, open_sqlite_store
from cloud_hub.auth import SQLiteTokenStore
from cloud_hub.store import (
    DeviceQuery,
    DeviceRecord,
    EnrollTokenRecord,
    EventRecord,
    IngestCommit,
    Store,
    StoreError,
    open_store,
)
from sync._exceptions import ConfigError
from tests.hub.store_conformance import SECRET, T0, Reopen, StoreConformance, maker, token


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hub" / "hub.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    s = open_sqlite_store(db_path)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
def reopen(db_path: Path) -> Iterator[Reopen]:
    opened: list[SQLiteStore] = []

    async def do(old: Store) -> Store:
        await old.aclose()
        new = open_sqlite_store(db_path)
        opened.append(new)
        return new

    yield do
    for s in opened:
        s.close()


class TestSQLiteStoreConformance(StoreConformance):
    """The whole Store contract against the SQLite store."""


def _device(i: int, **labels: str) -> DeviceRecord:
    return DeviceRecord(
        id=f"dev-{i:05d}",
        region=("eu", "us", "ap")[i % 3],
        profile=("small", "large")[i % 2],
        public_key=f"key-{i}",
        arch="arm64",
        labels=labels,
    )


def _events(device: str, stream: str, seqs: range) -> list[EventRecord]:
    return [EventRecord(device, stream, s, T0 + s, {"seq": s}) for s in seqs]


# -- opening ---------------------------------------------------------------------------


async def test_wal_and_migrations_recorded(store: SQLiteStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT migration_set, name FROM _sqlite_migrations").fetchall()
    assert rows == [("novacron_hub_store", "0001_initial")]


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 8000],
    ids=["not-sqlite", "bad-pages"],
)
def test_corrupt_file_is_refused_and_left_alone(db_path: Path, content: bytes) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(content)
    with pytest.raises(StoreError, match=r"corrupt|not an SQLite"):
        open_sqlite_store(db_path)
    assert db_path.read_bytes() == content
    assert sorted(p.name for p in db_path.parent.iterdir()) == ["hub.db"]


def test_newer_schema_is_refused(db_path: Path) -> None:
    open_sqlite_store(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('novacron_hub_store', '0099_future', '2030-01-01')"
        )
    with pytest.raises(StoreError, match="newer"):
        open_sqlite_store(db_path)


def test_shares_a_file_with_the_api_token_store(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with SQLiteTokenStore.open(db_path) as tokens:
        tokens.create("ci", "viewer")
    open_sqlite_store(db_path, check="integrity").close()
    with SQLiteTokenStore.open(db_path) as tokens:
        assert [t.name for t in tokens.list()] == ["ci"]


def test_options_are_checked(db_path: Path) -> None:
    for bad in ({"max_events_per_stream": 0}, {"readers": 0}, {"check": "deep"}):
        with pytest.raises(ValueError):
            open_sqlite_store(db_path, **bad)


async def test_open_store_urls(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/a.db", tmp_path / "b.db", str(tmp_path / "c.db")):
        s = open_store(url)
        assert isinstance(s, SQLiteStore)
        await s.aclose()
    for url in ("postgresql://hub@db/hub", "mysql://x"):
        with pytest.raises(ConfigError):
            open_store(url)


async def test_async_with_and_closed(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as s:
        assert await s.count_devices() == dict.fromkeys(
            ("unknown", "online", "offline", "unreachable"), 0
        )
    assert s.closed
    with pytest.raises(StoreError, match="closed"):
        await s.count_devices()
    with pytest.raises(StoreError, match="closed"):
        async with s:
            pass


# -- events ----------------------------------------------------------------------------


async def test_pruning_keeps_the_newest_and_counts(db_path: Path) -> None:
    async with open_sqlite_store(db_path, max_events_per_stream=5) as s:
        await s.add_devices([_device(1)])
        await s.commit_ingest(
            IngestCommit(
                events=_events("dev-00001", "ev", range(1, 9))
                + _events("dev-00001", "m", range(1, 3))
            )
        )
        assert [e.seq for e in await s.list_events("dev-00001", stream="ev")] == [4, 5, 6, 7, 8]
        assert [e.seq for e in await s.list_events("dev-00001", stream="m")] == [1, 2]
        assert (s.stats.events_stored, s.stats.events_pruned) == (10, 3)
        # duplicates are not counted as stored and do not prune
        await s.commit_ingest(IngestCommit(events=_events("dev-00001", "ev", range(6, 11))))
        assert [e.seq for e in await s.list_events("dev-00001", stream="ev")] == [6, 7, 8, 9, 10]
        assert (s.stats.events_stored, s.stats.events_duplicate, s.stats.events_pruned) == (
            12,
            3,
            5,
        )
    # the per-stream count survives a restart
    async with open_sqlite_store(db_path, max_events_per_stream=5) as s:
        await s.commit_ingest(IngestCommit(events=_events("dev-00001", "ev", range(11, 12))))
        assert [e.seq for e in await s.list_events("dev-00001", stream="ev")] == [7, 8, 9, 10, 11]
        assert s.stats.events_pruned == 1


async def test_bytes_in_bodies_are_base64(store: SQLiteStore) -> None:
    await store.commit_ingest(
        IngestCommit(events=[EventRecord("d", "ev", 1, T0, {"raw": b"\x00\xff", "l": [b"a"]})])
    )
    (event,) = await store.list_events("d")
    assert event.body == {"raw": "AP8=", "l": ["YQ=="]}


async def test_bad_commits_are_refused(store: SQLiteStore) -> None:
    for commit in (
        IngestCommit(events=[EventRecord("d", "ev", 0, T0, {})]),
        IngestCommit(events=[EventRecord("d", "ev", 1, T0, float("nan"))]),
        IngestCommit(cursors={("d", "ev"): 0}),
        IngestCommit(scopes={"s": "not bytes"}),  # type: ignore[dict-item]
    ):
        with pytest.raises(StoreError):
            await store.commit_ingest(commit)
    assert store.stats.write_failures == 4
    assert await store.list_events("d") == []


async def test_delete_device_drops_its_events_and_cursors(store: SQLiteStore) -> None:
    await store.add_devices([_device(1), _device(2)])
    await store.commit_ingest(
        IngestCommit(
            events=_events("dev-00001", "ev", range(1, 3))
            + _events("dev-00002", "ev", range(1, 2)),
            cursors={("dev-00001", "ev"): 3, ("dev-00002", "ev"): 2},
        )
    )
    await store.delete_device("dev-00001")
    assert await store.list_events("dev-00001") == []
    assert await store.load_cursors() == {("dev-00002", "ev"): 2}
    assert len(await store.list_events("dev-00002")) == 1


# -- devices at scale, threads ---------------------------------------------------------


async def test_label_filter_over_10k_devices_is_fast(store: SQLiteStore) -> None:
    devices = [
        _device(i, tier=("gold" if i % 10 == 0 else "std"), rare="yes" if i % 1000 == 7 else "no")
        for i in range(10_000)
    ]
    await store.add_devices(devices)
    assert (await store.count_devices())["unknown"] == 10_000
    timings = []
    for query in (
        DeviceQuery(labels={"tier": "gold"}),
        DeviceQuery(labels={"rare": "yes"}),
        DeviceQuery(labels={"rare": "yes", "tier": "std"}, region="ap"),
        DeviceQuery(region="eu", profile="large"),
    ):
        await store.list_devices(query)  # warm the reader
        start = time.perf_counter()
        page = await store.list_devices(query)
        timings.append(time.perf_counter() - start)
        assert page.items
    assert [
        d.id for d in (await store.list_devices(DeviceQuery(labels={"rare": "yes"}))).items
    ] == [f"dev-{i:05d}" for i in range(10_000) if i % 1000 == 7]
    # a few ms each on a laptop; a generous bound for loaded CI machines
    assert max(timings) < 0.25, timings


async def hold_the_writer(store: SQLiteStore) -> tuple[asyncio.Task[DeviceRecord], threading.Event]:
    """Start a write that keeps the writer thread inside its transaction until the
    returned event is set; return (the write, the event) once the thread is in there."""
    await store.create_enroll_token(token("slow"))
    entered, release = threading.Event(), threading.Event()

    def slow_make(tok: EnrollTokenRecord) -> DeviceRecord:
        entered.set()
        release.wait(10)
        return maker("dev-slow")(tok)

    write = asyncio.create_task(store.redeem_enroll_token("slow", SECRET, T0, slow_make))
    try:
        assert await asyncio.to_thread(entered.wait, 10)
    except BaseException:
        release.set()
        raise
    return write, release


async def test_reads_are_not_stuck_behind_a_write(store: SQLiteStore) -> None:
    await store.add_devices([_device(1)])
    write, release = await hold_the_writer(store)
    try:
        # the writer thread is busy inside a transaction; reads still answer
        async with asyncio.timeout(5):
            assert (await store.get_device("dev-00001")).id == "dev-00001"
            assert len((await store.list_devices(DeviceQuery())).items) == 1
    finally:
        release.set()
        await write
    assert (await store.get_device("dev-slow")).token_id == "slow"


async def test_write_queue_is_bounded(db_path: Path) -> None:
    async with open_sqlite_store(db_path, max_pending_writes=1) as s:
        await s.create_enroll_token(token("slow"))
        release = threading.Event()

        def slow_make(tok: EnrollTokenRecord) -> DeviceRecord:
            release.wait(10)
            return maker("dev-slow")(tok)

        first = asyncio.create_task(s.redeem_enroll_token("slow", SECRET, T0, slow_make))
        await asyncio.sleep(0)
        others = [asyncio.create_task(s.save_scopes({f"s{i}": b"x"})) for i in range(3)]
        await asyncio.sleep(0.05)
        assert s.stats.writes_waited == 3
        release.set()
        await asyncio.gather(first, *others)
        assert len(await s.load_scopes()) == 3


async def test_queued_writes_commit_before_close(db_path: Path) -> None:
    s = open_sqlite_store(db_path)
    writes = [asyncio.create_task(s.save_scopes({f"s{i}": b"x"})) for i in range(20)]
    await asyncio.sleep(0)
    await s.aclose()
    results = await asyncio.gather(*writes, return_exceptions=True)
    stored = sum(r is None for r in results)
    assert all(r is None or isinstance(r, StoreError) for r in results)
    async with open_sqlite_store(db_path) as again:
        assert len(await again.load_scopes()) == stored


async def test_conflicting_import(store: SQLiteStore) -> None:
    await store.add_devices([_device(1)])
    with pytest.raises(StoreError, match=r"exists|enrolled"):
        await store.add_devices([_device(2), _device(1)])
    with pytest.raises(StoreError, match="public key"):
        await store.add_devices([DeviceRecord("other", "eu", "p", "key-1", "x")])
    assert (await store.count_devices())["unknown"] == 1


async def test_a_cancelled_queued_write_is_not_applied(store: SQLiteStore) -> None:
    first, release = await hold_the_writer(store)
    queued = asyncio.create_task(store.save_scopes({"s": b"x"}))
    await asyncio.sleep(0.01)
    queued.cancel()
    # The executor's own future is cancelled by a callback on the loop's next
    # turn: let it run before the writer thread is free to take the op.
    await asyncio.sleep(0)
    release.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert await store.load_scopes() == {}
    await store.save_scopes({"t": b"y"})  # the writer goes on
    assert await store.load_scopes() == {"t": b"y"}
