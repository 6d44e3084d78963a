"""The hub's hash-chained audit log: chain, append-only triggers, anchors, tampering, CLI.

Tampering goes around the append-only triggers the way an attacker with write access
to the file would: a raw sqlite3 connection that drops them first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub._audit_verify import TRIGGERS
from cloud_hub._exceptions import AuditError, AuditNotFoundError
from cloud_hub.audit import (
    DB_FILENAME,
    GENESIS_HASH,
    MAX_DETAIL_BYTES,
    MAX_TEXT_CHARS,
    Anchor,
    AuditLog,
    default_anchor_path,
    entry_hash,
    read_anchor,
    verify,
    write_anchor,
)
from novacron import cli

ACTIONS = ["POST /api/v1/deployments", "PATCH /api/v1/devices/gw-1", "DELETE /api/v1/tokens/x"]


def _fill(log: AuditLog, n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append(
            actor=f"tok{i % 7:012x}",
            role=("admin", "operator")[i % 2],
            action=ACTIONS[i % len(ACTIONS)],
            target=f"deployment/web-{i}",
            outcome=(200, 201, 403, 422)[i % 4],
            detail={"i": i, "name": f"wé-{i}", "tags": ["a", i]},
        )


def _make(tmp_path: Path, n: int) -> Path:
    path = tmp_path / DB_FILENAME
    with AuditLog.open(path) as log:
        _fill(log, n)
    return path


@contextmanager
def _tamper(path: Path) -> Iterator[sqlite3.Connection]:
    """A raw connection with the append-only triggers dropped, as an attacker would."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for name in TRIGGERS:
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        yield conn


def _row(conn: sqlite3.Connection, seq: int) -> dict[str, Any]:
    conn.row_factory = sqlite3.Row
    row = conn.execute("SELECT * FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    conn.row_factory = None
    return dict(row)


def _rehash(conn: sqlite3.Connection, seq: int, *, prev_hash: str | None = None) -> str:
    """Recompute (and store) the hash of entry ``seq``, optionally relinking it."""
    row = _row(conn, seq)
    if prev_hash is not None:
        row["prev_hash"] = prev_hash
    row.pop("hash")
    new = entry_hash(**row)
    conn.execute(
        "UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?",
        (row["prev_hash"], new, seq),
    )
    return new


def _swap(conn: sqlite3.Connection, a: int, b: int) -> None:
    conn.execute("UPDATE audit_log SET seq = 1000000 WHERE seq = ?", (a,))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (a, b))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = 1000000", (b,))


# -- the chain ---------------------------------------------------------------------------


def test_chain_of_100_verifies(tmp_path: Path) -> None:
    path = _make(tmp_path, 100)
    report = verify(path)
    assert report.ok, report
    assert report.entries_checked == 100
    assert report.head_seq == 100
    assert report.anchors_checked == 1
    assert report.warnings == ()
    assert report.first_bad_seq is None and report.reason is None
    with AuditLog.open(path) as log:
        entries = log.entries(limit=1000)
        assert [e.seq for e in entries] == list(range(1, 101))
        assert entries[0].prev_hash == GENESIS_HASH
        for before, after in itertools.pairwise(entries):
            assert after.prev_hash == before.hash
        assert all(e.computed_hash() == e.hash for e in entries)
        assert log.head() == Anchor(100, entries[-1].hash, entries[-1].ts_ms)
        assert log.verify().ok
        assert read_anchor(default_anchor_path(path)) == log.head()


def test_hash_is_sha256_of_the_documented_encoding(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / DB_FILENAME, clock=lambda: 1700000000.123) as log:
        entry = log.append(
            actor="abc123",
            role="operator",
            action="POST /api/v1/deployments",
            target="deployment/wé",
            outcome=201,
            detail={"b": 1, "a": [1.5, None]},
        )
    assert entry.detail == '{"a":[1.5,null],"b":1}'
    assert entry.ts_ms == 1700000000123
    fields = {
        "seq": 1,
        "ts_ms": 1700000000123,
        "actor": "abc123",
        "role": "operator",
        "action": "POST /api/v1/deployments",
        "target": "deployment/wé",
        "outcome": 201,
        "detail": '{"a":[1.5,null],"b":1}',
        "prev_hash": "0" * 64,
    }
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert '"target":"deployment/w\\u00e9"' in encoded
    assert entry.hash == hashlib.sha256(encoded.encode("ascii")).hexdigest()
    assert entry.to_dict()["detail"] == {"a": [1.5, None], "b": 1}


def test_entries_pages(tmp_path: Path) -> None:
    path = _make(tmp_path, 25)
    with AuditLog.open(path) as log:
        assert [e.seq for e in log.entries(after_seq=10, limit=5)] == [11, 12, 13, 14, 15]
        assert [e.seq for e in log.entries(after_seq=24)] == [25]
        assert log.entries(after_seq=25) == []
        assert log.entries(limit=0) == []


def test_empty_log(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with AuditLog.open(path) as log:
        assert log.head() == Anchor(0, GENESIS_HASH, 0)
        assert log.entries() == []
        assert log.verify().ok
    report = verify(path)
    assert report.ok and report.entries_checked == 0
    assert any("no anchor" in w for w in report.warnings)


def test_long_text_and_detail_are_bounded(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / DB_FILENAME) as log:
        big = {"blob": "x" * (MAX_DETAIL_BYTES * 2)}
        entry = log.append(
            actor="a", role="admin", action="PUT " + "/p" * MAX_TEXT_CHARS, outcome=200, detail=big
        )
        summary = entry.detail_obj()
        assert summary["truncated"] is True
        canonical = json.dumps(big, sort_keys=True, separators=(",", ":"))
        assert summary["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
        assert summary["bytes"] == len(canonical)
        extra = len("PUT ") + 2 * MAX_TEXT_CHARS - MAX_TEXT_CHARS
        assert entry.action.endswith(f"...[+{extra} chars]")
        assert len(entry.action) < MAX_TEXT_CHARS + 32
        assert log.verify().ok


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detail": {"x": float("nan")}}, "JSON"),
        ({"detail": {"x": object()}}, "JSON"),
        ({"detail": ["not", "a", "mapping"]}, "mapping"),
        ({"outcome": 1000}, "status"),
        ({"outcome": True}, "status"),
        ({"actor": "\ud800"}, "Unicode"),
        ({"role": 3}, "str"),
    ],
)
def test_invalid_append_is_refused(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"actor": "a", "role": "admin", "action": "POST /x", "outcome": 200}
    args.update(kwargs)
    with AuditLog.open(tmp_path / DB_FILENAME) as log:
        with pytest.raises(AuditError, match=match):
            log.append(**args)
        assert log.head().seq == 0


def test_closed_log_refuses(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / DB_FILENAME)
    log.close()
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append(actor="a", role="admin", action="POST /x", outcome=200)


# -- append-only at the SQLite level ---------------------------------------------------


def test_triggers_make_the_table_append_only(tmp_path: Path) -> None:
    path = _make(tmp_path, 5)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit_log WHERE seq = 5")
        row = _row(conn, 5)
        row["seq"] = 7  # a gap
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with pytest.raises(sqlite3.IntegrityError, match="extend the chain"):
            conn.execute(f"INSERT INTO audit_log ({cols}) VALUES ({marks})", tuple(row.values()))
        row["seq"] = 6  # right seq, wrong prev_hash
        with pytest.raises(sqlite3.IntegrityError, match="extend the chain"):
            conn.execute(f"INSERT INTO audit_log ({cols}) VALUES ({marks})", tuple(row.values()))
    assert verify(path).ok


def test_dropped_triggers_are_reported_and_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _make(tmp_path, 3)
    with _tamper(path):
        pass
    report = verify(path)
    assert report.ok
    assert any("triggers" in w for w in report.warnings)
    with caplog.at_level(logging.WARNING, logger="cloud_hub.audit"), AuditLog.open(path):
        pass
    assert "append-only triggers" in caplog.text
    assert verify(path).warnings == ()


# -- tampering -------------------------------------------------------------------------

FIELDS: dict[str, Any] = {
    "ts_ms": 1,
    "actor": "mallory",
    "role": "superuser",
    "action": "GET /nothing",
    "target": "deployment/other",
    "outcome": 500,
    "detail": "{}",
    "prev_hash": "f" * 64,
    "hash": "e" * 64,
}


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("seq", [1, 37, 100])
def test_altering_any_field_is_detected(tmp_path: Path, field: str, seq: int) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute(f"UPDATE audit_log SET {field} = ? WHERE seq = ?", (FIELDS[field], seq))
    report = verify(path)
    assert not report.ok
    assert (report.first_bad_seq, report.reason) == (seq, "altered"), report
    assert report.entries_checked == seq


@pytest.mark.parametrize("seq", [1, 50, 99])
def test_deleting_an_entry_is_dropped(tmp_path: Path, seq: int) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))
    report = verify(path)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, seq, "dropped"), report


def test_deleting_and_renumbering_is_dropped(tmp_path: Path) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 50")
        for s in range(51, 101):
            conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (s - 1, s))
    report = verify(path, anchors=[])
    assert (report.first_bad_seq, report.reason) == (50, "dropped"), report


@pytest.mark.parametrize(("a", "b"), [(20, 60), (10, 11), (1, 100)])
def test_swapping_two_seqs_is_reordered(tmp_path: Path, a: int, b: int) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        _swap(conn, a, b)
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (a, "reordered"), report


def test_moving_an_entry_to_the_end_is_reordered(tmp_path: Path) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute("UPDATE audit_log SET seq = 101 WHERE seq = 37")
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (37, "reordered"), report


def test_editing_the_seq_of_the_head_is_altered(tmp_path: Path) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute("UPDATE audit_log SET seq = 150 WHERE seq = 100")
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (100, "altered"), report
    assert "seq was edited" in report.message


def test_forged_huge_seq_does_not_stall_verify(tmp_path: Path) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute("UPDATE audit_log SET seq = ?, actor = 'x' WHERE seq = 100", (10**15,))
    report = verify(path)
    # Written with no seq that a search bounded by the row count finds: entry 100 is gone.
    assert (report.first_bad_seq, report.reason) == (100, "dropped"), report


def test_replayed_entry_is_reordered(tmp_path: Path) -> None:
    path = _make(tmp_path, 10)
    with _tamper(path) as conn:
        row = _row(conn, 4)
        row["seq"] = 11
        cols = ", ".join(row)
        conn.execute(
            f"INSERT INTO audit_log ({cols}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (11, "reordered"), report


@pytest.mark.parametrize("cut", [1, 5, 100])
def test_truncating_the_newest_entries_is_caught_by_the_anchor(tmp_path: Path, cut: int) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq > ?", (100 - cut,))
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (101 - cut, "truncated"), report
    # Without an anchor, a shorter chain is a valid chain: that is what the anchor is for.
    assert verify(path, anchors=[]).ok
    with pytest.raises(AuditError, match="anchor"):
        AuditLog.open(path)


def test_altered_and_rehashed_entry_breaks_the_link(tmp_path: Path) -> None:
    path = _make(tmp_path, 100)
    with _tamper(path) as conn:
        conn.execute("UPDATE audit_log SET outcome = 200 WHERE seq = 50")
        _rehash(conn, 50)
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (51, "dropped"), report
    assert "prev_hash" in report.message


def test_rewritten_tail_is_caught_by_the_anchor_only(tmp_path: Path) -> None:
    path = _make(tmp_path, 100)
    external = read_anchor(default_anchor_path(path))
    with _tamper(path) as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 30")
        prev = _rehash(conn, 30)
        for s in range(31, 101):
            prev = _rehash(conn, s, prev_hash=prev)
    assert verify(path, anchors=[]).ok  # the chain alone is consistent again
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (100, "altered"), report
    # Rewriting the local anchor too defeats it; an anchor kept elsewhere does not.
    write_anchor(default_anchor_path(path), Anchor(100, prev, 0))
    assert verify(path).ok
    report = verify(path, anchors=[external])
    assert (report.first_bad_seq, report.reason) == (100, "altered"), report


def test_anchor_lagging_after_a_crash_is_fine(tmp_path: Path) -> None:
    """The anchor is written after the commit: after a crash it may be one behind."""
    path = _make(tmp_path, 10)
    with AuditLog.open(path) as log:
        entry9 = log.entries(after_seq=8, limit=1)[0]
    write_anchor(default_anchor_path(path), Anchor(9, entry9.hash, entry9.ts_ms))
    assert verify(path).ok
    with AuditLog.open(path) as log:
        _fill(log, 1)
        assert log.head().seq == 11
    assert verify(path).ok


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(AuditNotFoundError):
        verify(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    report = verify(junk)
    assert (report.ok, report.reason) == (False, "unreadable")
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x)")
    assert verify(other).reason == "unreadable"
    path = _make(tmp_path, 3)
    default_anchor_path(path).write_text("{not json")
    assert verify(path).reason == "unreadable"
    with pytest.raises(AuditError, match="anchor"):
        AuditLog.open(path)
    with pytest.raises(AuditNotFoundError):
        verify(path, anchors=[tmp_path / "nope.anchor"])


def test_wrong_column_types_are_unreadable(tmp_path: Path) -> None:
    path = _make(tmp_path, 5)
    with _tamper(path) as conn:
        # An attacker can rebuild the table without STRICT and store other types.
        conn.execute("ALTER TABLE audit_log RENAME TO old")
        conn.execute("CREATE TABLE audit_log AS SELECT * FROM old")
        conn.execute("DROP TABLE old")
        conn.execute("UPDATE audit_log SET outcome = 'ok' WHERE seq = 2")
    report = verify(path)
    assert (report.first_bad_seq, report.reason) == (2, "unreadable"), report


# -- property: any tamper op on any chain is detected ----------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
ENTRY = st.fixed_dictionaries(
    {
        "actor": TEXT,
        "role": st.sampled_from(["admin", "operator", "viewer", "device"]),
        "action": TEXT,
        "target": TEXT,
        "outcome": st.integers(0, 999),
        "detail": st.dictionaries(
            st.text(max_size=4), st.integers() | st.booleans() | st.none() | TEXT, max_size=3
        ),
    }
)
CONTENT_FIELDS = ["ts_ms", "actor", "role", "action", "target", "outcome", "detail"]
OPS = ["alter", "delete", "renumber", "swap", "move", "truncate", "rehash", "rewrite"]


def _different(data: st.DataObject, old: object) -> object:
    if isinstance(old, int):
        return old + data.draw(st.integers(1, 10**6) | st.integers(-(10**6), -1))
    assert isinstance(old, str)
    if len(old) == 64 and set(old) <= set("0123456789abcdef"):
        return data.draw(
            st.text("0123456789abcdef", min_size=64, max_size=64).filter(lambda h: h != old)
        )
    return data.draw(TEXT.filter(lambda t: t != old))


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(ENTRY, min_size=1, max_size=20), op=st.sampled_from(OPS), data=st.data())
def test_any_tamper_is_detected(
    entries: list[dict[str, Any]], op: str, data: st.DataObject
) -> None:
    n = len(entries)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DB_FILENAME
        with AuditLog.open(path) as log:
            for e in entries:
                log.append(**e)
        assert verify(path).ok
        k = data.draw(st.integers(1, n), label="k")
        expected: tuple[int, str]
        with _tamper(path) as conn:
            match op:
                case "alter":
                    field = data.draw(st.sampled_from([*CONTENT_FIELDS, "prev_hash", "hash"]))
                    new = _different(data, _row(conn, k)[field])
                    conn.execute(f"UPDATE audit_log SET {field} = ? WHERE seq = ?", (new, k))
                    expected = (k, "altered")
                case "delete":
                    conn.execute("DELETE FROM audit_log WHERE seq = ?", (k,))
                    expected = (k, "truncated" if k == n else "dropped")
                case "renumber":
                    conn.execute("DELETE FROM audit_log WHERE seq = ?", (k,))
                    for s in range(k + 1, n + 1):
                        conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (s - 1, s))
                    expected = (k, "truncated" if k == n else "dropped")
                case "swap" if n >= 2:
                    j = data.draw(st.integers(1, n).filter(lambda j: j != k), label="j")
                    _swap(conn, k, j)
                    expected = (min(k, j), "reordered")
                case "move":
                    to = n + data.draw(st.integers(1, 1000), label="to")
                    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (to, k))
                    expected = (k, "altered" if k == n else "reordered")
                case "truncate" | "swap":
                    conn.execute("DELETE FROM audit_log WHERE seq >= ?", (k,))
                    expected = (k, "truncated")
                case "rehash":
                    field = data.draw(st.sampled_from(CONTENT_FIELDS))
                    new = _different(data, _row(conn, k)[field])
                    conn.execute(f"UPDATE audit_log SET {field} = ? WHERE seq = ?", (new, k))
                    _rehash(conn, k)
                    expected = (n, "altered") if k == n else (k + 1, "dropped")
                case "rewrite":
                    field = data.draw(st.sampled_from(CONTENT_FIELDS))
                    new = _different(data, _row(conn, k)[field])
                    conn.execute(f"UPDATE audit_log SET {field} = ? WHERE seq = ?", (new, k))
                    prev = _rehash(conn, k)
                    for s in range(k + 1, n + 1):
                        prev = _rehash(conn, s, prev_hash=prev)
                    expected = (n, "altered")
                case _:
                    raise AssertionError(op)
        report = verify(path)
        assert not report.ok, (op, report)
        assert (report.first_bad_seq, report.reason) == expected, (op, report)


# -- concurrency -----------------------------------------------------------------------


def test_concurrent_appends_keep_a_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    threads_n, per_thread = 8, 25
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []
    with AuditLog.open(path) as log:

        def work(t: int) -> None:
            try:
                barrier.wait()
                for i in range(per_thread):
                    log.append(
                        actor=f"thread-{t}",
                        role="operator",
                        action="POST /x",
                        outcome=201,
                        detail={"i": i},
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        entries = log.entries(limit=10_000)
    assert [e.seq for e in entries] == list(range(1, threads_n * per_thread + 1))
    for t in range(threads_n):
        mine = [e.detail_obj()["i"] for e in entries if e.actor == f"thread-{t}"]
        assert mine == list(range(per_thread))
    report = verify(path)
    assert report.ok and report.entries_checked == threads_n * per_thread
    assert read_anchor(default_anchor_path(path)).seq == threads_n * per_thread


# -- CLI -------------------------------------------------------------------------------


def test_cli_verify_intact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make(tmp_path, 20)
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 0
    assert "intact: 20 entries" in capsys.readouterr().out
    assert cli.main(["audit", "verify", "--db", str(tmp_path / DB_FILENAME), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["entries_checked"] == 20


def test_cli_verify_tampered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _make(tmp_path, 20)
    with _tamper(path) as conn:
        conn.execute("UPDATE audit_log SET outcome = 200 WHERE seq = 7")
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "first bad seq 7" in out and "altered" in out
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["first_bad_seq"], report["reason"]) == (7, "altered")


def test_cli_verify_truncated_and_no_local_anchor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _make(tmp_path, 20)
    with _tamper(path) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq > 15")
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 1
    assert "first bad seq 16: truncated" in capsys.readouterr().out
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path), "--no-local-anchor"]) == 0
    default_anchor_path(path).unlink()
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 0
    assert "no local anchor" in capsys.readouterr().err


def test_cli_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 2
    assert "no audit log" in capsys.readouterr().err
    assert cli.main(["audit", "verify", "--db", str(tmp_path / "x.db")]) == 2
    _make(tmp_path, 2)
    argv = ["audit", "verify", "--data-dir", str(tmp_path), "--anchor", str(tmp_path / "no")]
    assert cli.main(argv) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", "verify"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", "verify", "--db", "a", "--data-dir", "b"])
    assert info.value.code == 2


def test_cli_exported_anchor_catches_a_full_rewrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _make(tmp_path, 30)
    exported = tmp_path / "elsewhere" / "head.anchor"
    exported.parent.mkdir()
    assert cli.main(["audit", "anchor", "--data-dir", str(tmp_path), "--out", str(exported)]) == 0
    assert read_anchor(exported).seq == 30
    assert cli.main(["audit", "anchor", "--db", str(path)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["seq"] == 30
    with AuditLog.open(path) as log:
        _fill(log, 5, start=30)
    # The attacker rewrites from entry 10 on, and the local anchor with it.
    with _tamper(path) as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 10")
        prev = _rehash(conn, 10)
        for s in range(11, 36):
            prev = _rehash(conn, s, prev_hash=prev)
    write_anchor(default_anchor_path(path), Anchor(35, prev, 0))
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    argv = ["audit", "verify", "--data-dir", str(tmp_path), "--anchor", str(exported)]
    assert cli.main(argv) == 1
    assert "first bad seq 30: altered" in capsys.readouterr().out
    # And `anchor` refuses to export the head of a log that is not intact.
    with _tamper(path) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 3")
    assert cli.main(["audit", "anchor", "--data-dir", str(tmp_path)]) == 1
