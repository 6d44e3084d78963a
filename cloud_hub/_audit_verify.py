"""Verification of an audit log file, and the SQLite table layout it shares with the log.

Read-only: opens the database with ``mode=ro``. See :mod:`cloud_hub.audit` for the
rules and the reasons reported.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cloud_hub._audit_chain import (
    GENESIS_HASH,
    Anchor,
    AuditEntry,
    default_anchor_path,
    hashed_seq,
    read_anchor,
)
from cloud_hub._exceptions import AuditError, AuditNotFoundError

__all__ = [
    "COLUMNS",
    "TABLE",
    "TRIGGERS",
    "Reason",
    "VerifyReport",
    "missing_triggers",
    "row_entry",
    "verify",
]

Reason = Literal["altered", "dropped", "reordered", "truncated", "unreadable"]

TABLE: Final = "audit_log"
COLUMNS: Final = "seq, ts_ms, actor, role, action, target, outcome, detail, prev_hash, hash"

TRIGGERS: Final[dict[str, str]] = {
    "audit_log_no_update": f"""CREATE TRIGGER IF NOT EXISTS audit_log_no_update
        BEFORE UPDATE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    "audit_log_no_delete": f"""CREATE TRIGGER IF NOT EXISTS audit_log_no_delete
        BEFORE DELETE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    "audit_log_chain_insert": f"""CREATE TRIGGER IF NOT EXISTS audit_log_chain_insert
        BEFORE INSERT ON {TABLE}
        WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM {TABLE})
          OR NEW.prev_hash IS NOT COALESCE(
               (SELECT hash FROM {TABLE} ORDER BY seq DESC LIMIT 1), '{GENESIS_HASH}')
        BEGIN SELECT RAISE(ABORT, 'audit_log insert does not extend the chain'); END""",
}
"""The append-only triggers by name (created by the migration, restored at open)."""


def missing_triggers(conn: sqlite3.Connection) -> list[str]:
    """Return the names of the append-only triggers absent from the database."""
    present = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (TABLE,)
        )
    }
    return sorted(set(TRIGGERS) - present)


def row_entry(row: Sequence[object]) -> AuditEntry | None:
    """Build an entry from a row, or ``None`` when a column has the wrong type."""
    seq, ts_ms, actor, role, action, target, outcome, detail, prev_hash, hash_ = row
    ints = (seq, ts_ms, outcome)
    strs = (actor, role, action, target, detail, prev_hash, hash_)
    if not all(type(v) is int for v in ints) or not all(type(v) is str for v in strs):
        return None
    return AuditEntry(*row)  # type: ignore[arg-type]


# -- verification ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes:
        ok: no problem found.
        entries_checked: rows examined (all of them when ``ok``).
        head_seq: seq of the last row read (0 for an empty log).
        head_hash: its hash (:data:`GENESIS_HASH` for an empty log).
        first_bad_seq: the chain position where the first problem is, or ``None``.
        reason: what the problem is (see the module docstring), or ``None``.
        message: a sentence for humans.
        anchors_checked: how many anchors were compared.
        warnings: things that are not proof of tampering (no anchor, missing
            append-only triggers).
    """

    ok: bool
    entries_checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: Reason | None = None
    message: str = ""
    anchors_checked: int = 0
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


@dataclass(slots=True)
class _Failure:
    seq: int
    reason: Reason
    message: str


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise AuditNotFoundError("no audit log here", path=str(path))
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open audit log: {exc}", path=str(path)) from exc
    return conn


def _rows(conn: sqlite3.Connection) -> Iterator[Sequence[object]]:
    yield from conn.execute(f"SELECT {COLUMNS} FROM {TABLE} ORDER BY seq")


def _present_elsewhere(conn: sqlite3.Connection, seq: int, skip: int) -> bool:
    """Whether some row other than the one stored at ``skip`` was hashed with ``seq``."""
    for row in _rows(conn):
        entry = row_entry(row)
        if entry is None or entry.seq == skip:
            continue
        if hashed_seq(entry, range(seq, seq + 1)) == seq:
            return True
    return False


def _walk(conn: sqlite3.Connection, top: int) -> tuple[int, int, str, _Failure | None]:
    """Check the chain; return (rows read, head seq, head hash, first failure)."""
    expected, prev_hash, checked = 1, GENESIS_HASH, 0
    # Seqs a moved entry may have been written with (``top`` is the row count or the
    # highest anchor); one past it also covers the head renumbered after a deletion.
    candidates = range(1, top + 2)
    for row in _rows(conn):
        checked += 1
        entry = row_entry(row)
        if entry is None:
            return (
                checked,
                expected - 1,
                prev_hash,
                _Failure(
                    expected, "unreadable", f"row stored at seq {row[0]!r} has wrong column types"
                ),
            )
        hashed = hashed_seq(entry, candidates)
        claimed = entry.seq if hashed is None else hashed
        failure: _Failure | None = None
        if claimed < expected:
            failure = _Failure(
                expected,
                "reordered",
                f"the entry at seq {expected} was written as seq {claimed} "
                "(an earlier entry repeated or moved)",
            )
        elif claimed > expected:
            if _present_elsewhere(conn, expected, entry.seq):
                failure = _Failure(
                    expected,
                    "reordered",
                    f"the entry at seq {expected} was written as seq {claimed}, "
                    f"and entry {expected} is stored elsewhere",
                )
            else:
                failure = _Failure(
                    expected, "dropped", f"entry {expected} is missing (next found: {claimed})"
                )
        elif hashed is None:
            failure = _Failure(expected, "altered", f"entry {expected} does not match its hash")
        elif hashed != entry.seq:
            failure = _Failure(
                expected,
                "altered",
                f"entry {expected} is stored with seq {entry.seq} (its seq was edited)",
            )
        elif entry.prev_hash != prev_hash:
            failure = _Failure(
                expected,
                "dropped",
                f"entry {expected} does not link to entry {expected - 1} (prev_hash "
                "mismatch): an entry before it was removed or replaced",
            )
        if failure is not None:
            return checked, expected - 1, prev_hash, failure
        prev_hash = entry.hash
        expected += 1
    return checked, expected - 1, prev_hash, None


def _check_anchor(
    conn: sqlite3.Connection, head_seq: int, anchor: Anchor, label: str
) -> _Failure | None:
    if anchor.seq > head_seq:
        return _Failure(
            head_seq + 1,
            "truncated",
            f"{label} names seq {anchor.seq} but the log ends at seq {head_seq}: "
            "the newest entries were removed",
        )
    if anchor.seq == 0:
        return None
    row = conn.execute(f"SELECT hash FROM {TABLE} WHERE seq = ?", (anchor.seq,)).fetchone()
    if row is None or row[0] != anchor.hash:
        return _Failure(
            anchor.seq,
            "altered",
            f"entry {anchor.seq} differs from {label}: the chain was rewritten up to it",
        )
    return None


def verify(path: str | Path, *, anchors: Sequence[Path | Anchor] | None = None) -> VerifyReport:
    """Verify an audit log file (read-only; see the module docstring for the rules).

    Args:
        path: the database file.
        anchors: anchors to check the chain against (files or :class:`Anchor`
            values). ``None`` means the local anchor (:func:`default_anchor_path`)
            if it exists, with a warning if it does not.

    Returns:
        The report; a tampered log is a report with ``ok=False``, not an error.

    Raises:
        AuditNotFoundError: ``path`` or an anchor file given does not exist.
        AuditError: the file cannot be opened at all.
    """
    db_path = Path(path)
    warnings: list[str] = []
    if anchors is None:
        local = default_anchor_path(db_path)
        if local.exists():
            anchors = [local]
        else:
            anchors = []
            warnings.append(
                f"no anchor at {local}: removal of the newest entries cannot be detected"
            )
    conn = _open_read_only(db_path)
    try:
        try:
            # The row count, not MAX(seq), bounds the search for the seq a moved entry
            # was written with: a forged seq of 10**15 must not make verify spin.
            count = int(conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])
            if missing_triggers(conn):
                warnings.append("the append-only triggers are missing (dropped by hand?)")
            loaded: list[tuple[Anchor, str]] = []
            for a in anchors:
                if isinstance(a, Anchor):
                    loaded.append((a, "the anchor given"))
                else:
                    loaded.append((read_anchor(a), f"the anchor {a}"))
            top = max([count, *(a.seq for a, _ in loaded)])
            checked, head_seq, head_hash, failure = _walk(conn, top)
            if failure is None:
                for anchor, label in loaded:
                    failure = _check_anchor(conn, head_seq, anchor, label)
                    if failure is not None:
                        break
        except sqlite3.DatabaseError as exc:
            return VerifyReport(
                ok=False,
                entries_checked=0,
                head_seq=0,
                head_hash=GENESIS_HASH,
                first_bad_seq=None,
                reason="unreadable",
                message=f"not a readable audit log: {exc}",
                warnings=tuple(warnings),
            )
        except AuditError as exc:
            if isinstance(exc, AuditNotFoundError):
                raise
            return VerifyReport(
                ok=False,
                entries_checked=0,
                head_seq=0,
                head_hash=GENESIS_HASH,
                reason="unreadable",
                message=str(exc),
                warnings=tuple(warnings),
            )
    finally:
        conn.close()
    if failure is None:
        return VerifyReport(
            ok=True,
            entries_checked=checked,
            head_seq=head_seq,
            head_hash=head_hash,
            message=f"{checked} entries intact",
            anchors_checked=len(loaded),
            warnings=tuple(warnings),
        )
    return VerifyReport(
        ok=False,
        entries_checked=checked,
        head_seq=head_seq,
        head_hash=head_hash,
        first_bad_seq=failure.seq,
        reason=failure.reason,
        message=failure.message,
        anchors_checked=len(loaded),
        warnings=tuple(warnings),
    )
