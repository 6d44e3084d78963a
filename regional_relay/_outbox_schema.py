"""Opening the outbox file: pragmas, integrity check, quarantine, migrations.

Blocking; runs off the event loop. Same choices as the agent's journal
(``edge_agent._journal_schema``): WAL, ``synchronous=FULL``, a full
``PRAGMA integrity_check`` at open by default, a corrupt file moved aside to
``<name>.corrupt-<UTC timestamp>`` (with its ``-wal`` and ``-shm``) and a fresh
outbox created, never a crash loop. The connection helper is the journal's; the
open/quarantine sequence is repeated here in small because the journal's is tied
to its own migrations and errors (see the report to the lead: a shared
``open_checked(path, migrations, check)`` would serve both).
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from sqlite_utils import Database, Migrations

from edge_agent._journal_schema import CheckMode, connect
from regional_relay._exceptions import OutboxError

__all__ = ["MIGRATIONS", "ROW_OVERHEAD", "CheckMode", "OpenedOutbox", "connect", "open_outbox_file"]

logger = logging.getLogger(__name__)

ROW_OVERHEAD = 64
"""Approximate bytes per item on top of its payload (id, device, kind, b-tree),
counted against the quota."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

MIGRATIONS = Migrations("novacron_relay_outbox")


@MIGRATIONS(name="0001_initial")
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


class _CorruptError(Exception):
    """The file is not a usable SQLite outbox (internal signal)."""


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


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    # Only the plain DatabaseError class means corruption; locked, I/O or
    # permission errors must never quarantine a file.
    return type(exc) is sqlite3.DatabaseError


def _open_checked(path: Path, check: CheckMode) -> sqlite3.Connection:
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as fh:
            if fh.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise _CorruptError("not an SQLite file (bad header)")
    conn = connect(path)
    try:
        _prepare(conn, path, check)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path, check: CheckMode) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OutboxError(f"cannot enable WAL (journal_mode={mode})", path=str(path))
    if check != "none":
        pragma = "integrity_check" if check == "integrity" else "quick_check"
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}(20)").fetchall()]
        if rows != ["ok"]:
            raise _CorruptError(f"{pragma}: " + "; ".join(str(r) for r in rows[:5]))
    MIGRATIONS.apply(Database(conn, execute_plugins=False))
    conn.isolation_level = None  # explicit BEGIN/COMMIT only


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


def _quarantine(path: Path, reason: str) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.replace(Path(f"{target}{suffix}"))
    logger.error(
        "outbox %s is corrupt (%s): moved aside to %s and starting empty; items it held "
        "that were acknowledged to agents but not yet to the hub may be lost (the moved "
        "file can be inspected and replayed by hand)",
        path,
        reason,
        target,
    )
    return target


def _open(path: Path, check: CheckMode) -> OpenedOutbox:
    conn = _open_checked(path, check)
    try:
        return _load(conn)
    except BaseException:
        conn.close()
        raise


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
    quarantined: Path | None = None
    try:
        try:
            opened = _open(path, check)
        except _CorruptError as exc:
            quarantined = _quarantine(path, str(exc))
            opened = _open(path, check)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            quarantined = _quarantine(path, str(exc))
            opened = _open(path, check)
    except (sqlite3.Error, _CorruptError, OSError) as exc:
        raise OutboxError(f"cannot open outbox: {exc}", path=str(path)) from exc
    opened.quarantined_path = quarantined
    return opened
