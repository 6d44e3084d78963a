"""Opening the journal file: pragmas, integrity check, quarantine, migrations.

Everything here is blocking and runs off the event loop (``asyncio.to_thread``).

Integrity check choice: ``PRAGMA integrity_check`` by default. It reads every
page and also cross-checks every index against its table; ``quick_check`` skips
the index cross-check and UNIQUE verification (O(N) instead of O(N log N)).
Measured on a 77 MB journal (300,000 events, warm page cache, x86 dev box):
integrity_check 0.13 s, quick_check 0.05 s; expect roughly 10-20x that on
gateway flash. The journal is bounded by the firmware profile's quota and the
check runs once per agent start, so the full check is the default;
``check="quick"`` is there for very slow storage and ``check="none"`` for tests
and benchmarks.

Migrations are sqlite-utils ``Migrations``, recorded in its ``_sqlite_migrations``
table. sqlite-utils (with click, pluggy and dateutil under it, ~3.5 MB of RSS) is
imported only when a migration must run: the usual start, on a journal that is
up to date, reads the recorded names with plain sqlite3 and skips it.

The open/check/quarantine sequence and the migration runner are shared with the
relay's outbox (:mod:`edge_agent._sqlite`); this module holds what is the
journal's own: its tables, its session start (``bd_seq``) and what it loads.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from edge_agent._journal_errors import (
    JournalClosedError,
    JournalError,
    JournalWriteError,
)
from edge_agent._sqlite import CheckMode, MigrationSet, StoreErrors, connect, open_store

if TYPE_CHECKING:
    from sqlite_utils import Database, Migrations

__all__ = [
    "ERRORS",
    "MIGRATIONS",
    "ROW_OVERHEAD",
    "CheckMode",
    "OpenResult",
    "connect",
    "open_journal_file",
]

logger = logging.getLogger(__name__)

ROW_OVERHEAD = 24
"""Approximate per-event bytes on top of payload, stream and kind (quota accounting)."""

ERRORS: Final = StoreErrors(
    label="journal", base=JournalError, closed=JournalClosedError, write=JournalWriteError
)
"""The journal's name and error classes, for the shared machinery."""


def _m0001_initial(db: Database) -> None:
    for statement in (
        """CREATE TABLE state (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            hlc INTEGER NOT NULL,
            origin TEXT NOT NULL,
            counter INTEGER NOT NULL,
            tombstone INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID""",
        """CREATE TABLE deltas (
            scope TEXT NOT NULL,
            origin TEXT NOT NULL,
            counter INTEGER NOT NULL,
            payload BLOB NOT NULL,
            PRIMARY KEY (scope, origin, counter)
        ) WITHOUT ROWID""",
        # id gives global insertion order, which quota drops walk oldest first.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            stream TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            payload BLOB NOT NULL,
            ts INTEGER NOT NULL,
            UNIQUE (stream, seq)
        )""",
        """CREATE TABLE cursors (
            stream TEXT PRIMARY KEY,
            acked_seq INTEGER NOT NULL
        )""",
        """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
    ):
        db.execute(statement)


_MIGRATION_SET: Final = MigrationSet(
    "novacron_edge_journal",
    (("0001_initial", _m0001_initial),),
)
"""The journal's migrations, in order: (name, function). Append only."""


# MIGRATIONS (the sqlite-utils object) is built on first use so that importing
# this module does not import sqlite-utils.
__getattr__ = _MIGRATION_SET.module_getattr(__name__)


if TYPE_CHECKING:
    MIGRATIONS: Migrations


@dataclass(slots=True)
class OpenResult:
    """What :func:`open_journal_file` hands to the journal.

    Attributes:
        conn: the write connection, in autocommit mode (explicit BEGIN/COMMIT).
        quarantined_path: where a corrupt file was moved, if one was.
        bd_seq: this session's birth/death sequence number (already incremented).
        schema_version: number of applied migrations.
        next_seq: per stream, the next sequence number to assign.
        acked: per stream, the acknowledged cursor.
        event_bytes: approximate bytes of all event rows.
        event_rows: number of event rows.
        counters: persisted counters (``dropped_metrics`` etc.).
    """

    conn: sqlite3.Connection
    quarantined_path: Path | None
    bd_seq: int
    schema_version: int
    next_seq: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    event_bytes: int = 0
    event_rows: int = 0
    counters: dict[str, int] = field(default_factory=dict)


def _load(conn: sqlite3.Connection, result: OpenResult) -> None:
    for stream, max_seq in conn.execute("SELECT stream, MAX(seq) FROM events GROUP BY stream"):
        result.next_seq[stream] = int(max_seq) + 1
    for stream, acked in conn.execute("SELECT stream, acked_seq FROM cursors"):
        result.acked[stream] = int(acked)
        result.next_seq[stream] = max(result.next_seq.get(stream, 1), int(acked) + 1)
    total, count = conn.execute(
        "SELECT COALESCE(SUM(length(payload) + length(stream) + length(kind) + ?), 0), "
        "COUNT(*) FROM events",
        (ROW_OVERHEAD,),
    ).fetchone()
    result.event_bytes = int(total)
    result.event_rows = int(count)
    for key, value in conn.execute("SELECT key, value FROM meta"):
        result.counters[key] = int(value)


def _start_session(conn: sqlite3.Connection) -> OpenResult:
    conn.execute("BEGIN IMMEDIATE")
    (bd_seq,) = conn.execute(
        "INSERT INTO meta (key, value) VALUES ('bd_seq', 1) "
        "ON CONFLICT (key) DO UPDATE SET value = value + 1 RETURNING value"
    ).fetchone()
    applied = len(_MIGRATION_SET.recorded(conn))
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (applied,),
    )
    conn.execute("COMMIT")
    result = OpenResult(
        conn=conn, quarantined_path=None, bd_seq=int(bd_seq), schema_version=applied
    )
    _load(conn, result)
    return result


def _report_quarantine(path: Path, reason: str, target: Path) -> None:
    logger.warning(
        "journal %s is corrupt (%s): moved aside to %s; starting a fresh journal, "
        "state will be rebuilt from an upstream snapshot",
        path,
        reason,
        target,
    )


def open_journal_file(path: Path, *, check: CheckMode) -> OpenResult:
    """Open (creating or repairing) the journal file and start a new session.

    A file that is not SQLite, is truncated or fails the integrity check is
    moved aside to ``<name>.corrupt-<UTC timestamp>`` (with its ``-wal`` and
    ``-shm``) and a fresh journal is created in its place.

    Args:
        path: the journal file.
        check: which integrity check to run (see the module docstring).

    Returns:
        The open write connection and everything loaded from the file.

    Raises:
        JournalError: the file cannot be opened for a reason other than
            corruption (permissions, locked, missing directory...).
    """
    result, quarantined = open_store(
        path,
        check=check,
        migrations=_MIGRATION_SET,
        errors=ERRORS,
        load=_start_session,
        report_quarantine=_report_quarantine,
    )
    result.quarantined_path = quarantined
    return result
