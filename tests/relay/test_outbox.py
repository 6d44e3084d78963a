"""The relay's outbox: batching reads, ACK deletes, quota policy, durability."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import textwrap
from pathlib import Path

import pytest

from regional_relay.outbox import ItemIn, Outbox, OutboxClosedError, OutboxFullError
from sync._exceptions import CrdtError
from tests.sqlite_helpers import imports_sqlite_utils, sigkill_mid_stream

QUOTA = 64 << 20


def delta(device: str = "gw-1", payload: bytes = b"d") -> ItemIn:
    return ItemIn(device, "delta", payload)


async def test_append_oldest_delete(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "o.db", quota_bytes=QUOTA) as box:
        ids = await box.append([delta(payload=b"a" * 10), ItemIn("gw-2", "event", b"b" * 20)])
        ids += await box.append([ItemIn("gw-1", "metric", b"c" * 30)])
        assert ids == [1, 2, 3]
        assert [i.payload for i in await box.oldest(10, 1 << 20)] == [
            b"a" * 10,
            b"b" * 20,
            b"c" * 30,
        ]
        first = (await box.oldest(10, 1 << 20))[0]
        assert (first.id, first.device, first.kind, first.size) == (1, "gw-1", "delta", 10)
        assert [i.id for i in await box.oldest(2, 1 << 20)] == [1, 2]
        assert [i.id for i in await box.oldest(10, 30)] == [1, 2]  # 10 + 20 bytes
        assert [i.id for i in await box.oldest(10, 5)] == [1]  # first even if larger
        assert [i.id for i in await box.oldest(10, 1 << 20, after_id=2)] == [3]
        stats = box.stats()
        assert (stats.depth, stats.bytes, stats.appended, stats.deleted) == (3, 60, 3, 0)

        assert await box.delete([1, 3, 99]) == 2
        assert await box.delete([1]) == 0
        assert [i.id for i in await box.oldest(10, 1 << 20)] == [2]
        stats = box.stats()
        assert (stats.depth, stats.bytes, stats.appended, stats.deleted) == (1, 20, 3, 2)


async def test_survives_reopen_and_never_reuses_ids(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox.open(path, quota_bytes=QUOTA) as box:
        assert await box.append([delta(payload=b"x%d" % i) for i in range(5)]) == [1, 2, 3, 4, 5]
        await box.delete([4, 5])
    async with Outbox.open(path, quota_bytes=QUOTA) as box:
        assert box.quarantined_path is None
        assert [i.payload for i in await box.oldest(10, 1 << 20)] == [b"x0", b"x1", b"x2"]
        stats = box.stats()
        assert (stats.depth, stats.bytes, stats.appended, stats.deleted) == (3, 6, 5, 2)
        assert await box.append([delta()]) == [6]


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "o.db", quota_bytes=QUOTA) as box:
        results = await asyncio.gather(*(box.append([delta(f"gw-{i}")]) for i in range(200)))
        ids = sorted(i for r in results for i in r)
        assert ids == list(range(1, 201))
        assert box.stats().transactions < 200


async def test_refuse_metrics_policy(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    quota = 2000
    async with Outbox.open(path, quota_bytes=quota) as box:
        with pytest.raises(OutboxFullError):  # fill up with metrics until refused
            for _ in range(100):
                await box.append([ItemIn("gw-1", "metric", bytes(200))])
        held = box.stats().depth
        assert 0 < held < 10
        with pytest.raises(OutboxFullError) as info:
            await box.append([ItemIn("gw-1", "metric", b"m"), ItemIn("gw-1", "agg", b"a")])
        assert info.value.ids == [None, None] and info.value.refused == [0, 1]
        # Deltas and events are still stored, counted as over quota.
        assert len(await box.append([delta(), ItemIn("gw-1", "event", b"e")])) == 2
        with pytest.raises(OutboxFullError) as info:
            await box.append([ItemIn("gw-1", "metric", b"m"), delta()])
        assert info.value.ids[0] is None and isinstance(info.value.ids[1], int)
        assert info.value.refused == [0]
        stats = box.stats()
        assert stats.depth == held + 3
        assert (stats.refused_metrics, stats.over_quota_deltas, stats.over_quota_other) == (4, 2, 1)
        # The hub's ACK frees room: metrics are accepted again.
        await box.delete([i.id for i in await box.oldest(1000, 1 << 30)])
        assert len(await box.append([ItemIn("gw-1", "metric", b"m")])) == 1
    async with Outbox.open(path, quota_bytes=quota) as box:
        stats = box.stats()
        assert (stats.refused_metrics, stats.over_quota_deltas, stats.over_quota_other) == (4, 2, 1)
        assert (stats.depth, stats.appended - stats.deleted) == (1, 1)


async def test_refusal_only_counters_persist_at_close(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox.open(path, quota_bytes=100) as box:
        await box.append([delta(payload=bytes(200))])
        for _ in range(3):
            with pytest.raises(OutboxFullError):
                await box.append([ItemIn("gw-1", "metric", b"m")])
    async with Outbox.open(path, quota_bytes=100) as box:
        assert box.stats().refused_metrics == 3


async def test_deltas_only_policy(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "o.db", quota_bytes=100, policy="deltas-only") as box:
        await box.append([delta(payload=bytes(200))])
        for kind in ("event", "presence", "metric"):
            with pytest.raises(OutboxFullError):
                await box.append([ItemIn("gw-1", kind, b"x")])
        assert len(await box.append([delta()])) == 1
        stats = box.stats()
        assert (stats.refused_other, stats.refused_metrics, stats.over_quota_deltas) == (2, 1, 1)


async def test_replica_state_is_lww_and_durable(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    scope = "device/gw-1"
    async with Outbox.open(path, quota_bytes=QUOTA) as box:
        assert (
            await box.put_state(
                scope,
                [
                    ["desired/a", 10, "hub", 1, False, {"image": "x:1"}],
                    ["desired/b", 10, "hub", 2, False, 7],
                ],
            )
            == 2
        )
        # Older write, a replay, then a newer tombstone.
        assert await box.put_state(scope, [["desired/a", 5, "hub", 3, False, "old"]]) == 0
        assert (
            await box.put_state(scope, [["desired/a", 10, "hub", 1, False, {"image": "x:1"}]]) == 0
        )
        assert await box.put_state(scope, [["desired/b", 11, "hub", 4, True, None]]) == 1
        await box.put_state("device/gw-2", [["labels/x", 1, "hub", 5, False, "y"]])
        with pytest.raises(CrdtError):
            await box.put_state(scope, [["k", -1, "hub", 1, False, 1]])
    async with Outbox.open(path, quota_bytes=QUOTA) as box:
        assert await box.scopes() == ["device/gw-1", "device/gw-2"]
        assert await box.read_state(scope) == [
            ["desired/a", 10, "hub", 1, False, {"image": "x:1"}],
            ["desired/b", 11, "hub", 4, True, None],
        ]
        assert await box.read_state("device/none") == []


async def test_closed_outbox_refuses_use(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "o.db", quota_bytes=QUOTA)
    with pytest.raises(OutboxClosedError):
        await box.append([delta()])
    async with box:
        pass
    with pytest.raises(OutboxClosedError):
        await box.append([delta()])
    await box.aclose()  # idempotent


@pytest.mark.parametrize("damage", ["not-sqlite", "scribbled"])
async def test_corrupt_file_is_quarantined(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "o.db"
    if damage == "not-sqlite":
        path.write_bytes(b"this is not a database\n" * 500)
    else:
        async with Outbox.open(path, quota_bytes=QUOTA) as box:
            for _ in range(20):
                await box.append([delta(payload=os.urandom(200)) for _ in range(100)])
        size = path.stat().st_size
        with path.open("r+b") as fh:  # page 1 holds the schema; trash the rest
            for offset in range(8192, size - 4096, 8192):
                fh.seek(offset)
                fh.write(b"\xa5" * 4096)
    async with Outbox.open(path, quota_bytes=QUOTA) as box:
        moved = box.quarantined_path
        assert moved is not None and moved.name.startswith("o.db.corrupt-") and moved.exists()
        assert box.stats().depth == 0
        assert await box.append([delta()]) == [1]


_CHILD = textwrap.dedent(
    """
    import asyncio
    import sys

    from regional_relay.outbox import ItemIn, Outbox


    async def main(path: str) -> None:
        async with Outbox.open(path, quota_bytes=1 << 30, check="quick") as box:
            print("ready", flush=True)
            for i in range(20_000):
                (item_id,) = await box.append([ItemIn("gw-1", "delta", b"e%d" % i)])
                sys.stdout.write(f"{item_id}\\n")
                sys.stdout.flush()


    asyncio.run(main(sys.argv[1]))
    """
)


def test_sigkill_while_appending_loses_no_returned_id(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    printed = sigkill_mid_stream(_CHILD, path, at_least=500)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = dict(conn.execute("SELECT id, payload FROM items").fetchall())
    finally:
        conn.close()
    for item_id in printed:
        assert rows[item_id] == b"e%d" % (item_id - 1)


def test_sqlite_utils_is_imported_only_when_a_migration_runs(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    imports = "from regional_relay.outbox import ItemIn, Outbox"
    body = """
async with Outbox.open(path, quota_bytes=1 << 20) as box:
    await box.append([ItemIn("gw-1", "delta", b"x")])
    """
    assert imports_sqlite_utils(imports, body, path)  # a new file: the migrations run
    assert not imports_sqlite_utils(imports, body, path)  # up to date: never imported
