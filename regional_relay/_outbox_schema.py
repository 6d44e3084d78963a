"""Opening the outbox file: pragmas, integrity check, quarantine, migrations.

Blocking; runs off the event loop. Same choices as the agent's journal, through
the same code (:func:`edge_agent._sqlite.open_store`): WAL, ``synchronous=FULL``,
a full ``PRAGMA integrity_check`` at open by default, a corrupt file moved aside
to ``<name>.corrupt-<UTC timestamp>`` (with its ``-wal`` and ``-shm``) and a fresh
outbox created, never a crash loop. sqlite-utils is imported only when a
migration must actually run. This module holds what is the outbox's own: its
tables, what it loads at open and how a quarantine is reported.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from edge_agent._sqlite import CheckMode, MigrationSet, StoreErrors, connect, open_store
from regional_relay._exceptions import OutboxClosedError, OutboxError, OutboxWriteError

if TYPE_CHECKING:
    from sqlite_utils import Database, Migrations

__all__ = [
    "ERRORS",
    "MIGRATIONS",
    "ROW_OVERHEAD",
    "CheckMode",
    "OpenedOutbox",
    "connect",
    "open_outbox_file",
]

logger = logging.getLogger(__name__)

ROW_OVERHEAD = 64
"""Approximate bytes per item on top of its payload (id, device, kind, b-tree),
counted against the quota."""

ERRORS: Final = StoreErrors(
    label="outbox", base=OutboxError, closed=OutboxClosedError, write=OutboxWriteError
)
"""The outbox's name and error classes, for the shared machinery."""


def _m0001_initial(db: Database) -> None:
    for statement in (
        # AUTOINCREMENT: an id is never reused, even after the newest row is
        # deleted, so the hub can dedupe (relay, id) forever.
        """CREATE TABLE items (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            kind TEXT NOT NULL,
            payload BLOB NOT NULL,
            size INTEGER NOT NULL
        )""",
        """CREATE TABLE replica (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            ts INTEGER NOT NULL,
            origin TEXT NOT NULL,
            counter INTEGER NOT NULL,
            deleted INTEGER NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID""",
        """CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
    ):
        db.execute(statement)


_MIGRATION_SET: Final = MigrationSet(
    "novacron_relay_outbox",
    (("0001_initial", _m0001_initial),),
)
"""The outbox's migrations, in order: (name, function). Append only."""


# MIGRATIONS (the sqlite-utils object) is built on first use so that importing
# this module does not import sqlite-utils.
__getattr__ = _MIGRATION_SET.module_getattr(__name__)


if TYPE_CHECKING:
    MIGRATIONS: Migrations


@dataclass(slots=True)
class OpenedOutbox:
    """What :func:`open_outbox_file` hands to the outbox.

    Attributes:
        conn: the write connection, in autocommit mode (explicit BEGIN/COMMIT).
        quarantined_path: where a corrupt file was moved, if one was.
        next_id: the id the next appended item gets.
        depth: items held.
        bytes: payload bytes held.
        counters: persisted counters.
    """

    conn: sqlite3.Connection
    quarantined_path: Path | None = None
    next_id: int = 1
    depth: int = 0
    bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)


def _load(conn: sqlite3.Connection) -> OpenedOutbox:
    opened = OpenedOutbox(conn=conn)
    depth, total, max_id = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM items"
    ).fetchone()
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
    opened.next_id = max(int(max_id), int(row[0]) if row else 0) + 1
    opened.depth, opened.bytes = int(depth), int(total)
    opened.counters = {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}
    return opened


def _report_quarantine(path: Path, reason: str, target: Path) -> None:
    logger.error(
        "outbox %s is corrupt (%s): moved aside to %s and starting empty; items it held "
        "that were acknowledged to agents but not yet to the hub may be lost (the moved "
        "file can be inspected and replayed by hand)",
        path,
        reason,
        target,
    )


def open_outbox_file(path: Path, *, check: CheckMode) -> OpenedOutbox:
    """Open (creating or repairing) the outbox file.

    Args:
        path: the outbox file; its directory must exist.
        check: ``"integrity"``, ``"quick"`` or ``"none"``.

    Returns:
        The open write connection and the figures loaded from the file.

    Raises:
        OutboxError: the file cannot be opened for a reason other than corruption.
    """
    opened, quarantined = open_store(
        path,
        check=check,
        migrations=_MIGRATION_SET,
        errors=ERRORS,
        load=_load,
        report_quarantine=_report_quarantine,
        also_wrap=(OSError,),
    )
    opened.quarantined_path = quarantined
    return opened
