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
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from edge_agent._journal_errors import JournalError

if TYPE_CHECKING:
    from sqlite_utils import Database, Migrations

__all__ = [
    "MIGRATIONS",
    "ROW_OVERHEAD",
    "CheckMode",
    "OpenResult",
    "open_journal_file",
]

logger = logging.getLogger(__name__)

CheckMode = Literal["integrity", "quick", "none"]

ROW_OVERHEAD = 24
"""Approximate per-event bytes on top of payload, stream and kind (quota accounting)."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_MIGRATION_SET: Final = "novacron_edge_journal"
_MIGRATIONS_TABLE: Final = "_sqlite_migrations"  # sqlite-utils' Migrations.migrations_table


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


_STEPS: Final[tuple[tuple[str, Callable[[Database], None]], ...]] = (
    ("0001_initial", _m0001_initial),
)
"""The journal's migrations, in order: (name, function). Append only."""


@functools.cache
def _migrations() -> Migrations:
    from sqlite_utils import Migrations  # noqa: PLC0415 - only when a migration runs

    migrations = Migrations(_MIGRATION_SET)
    for name, fn in _STEPS:
        migrations(name=name)(fn)
    return migrations


def __getattr__(name: str) -> object:
    # MIGRATIONS (the sqlite-utils object) is built on first use so that importing
    # this module does not import sqlite-utils.
    if name == "MIGRATIONS":
        return _migrations()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    MIGRATIONS: Migrations


def _recorded_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names of the applied journal migrations in the order applied, read with plain sqlite3.

    The same list as ``MIGRATIONS.applied(db)``: empty when there is no migrations table.
    """
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_MIGRATIONS_TABLE,)
    ).fetchone()
    if exists is None:
        return []
    return [
        row[0]
        for row in conn.execute(
            f"SELECT name FROM {_MIGRATIONS_TABLE} WHERE migration_set = ? ORDER BY rowid",
            (_MIGRATION_SET,),
        )
    ]


def _migrations_table_current(conn: sqlite3.Connection) -> bool:
    # sqlite-utils 4 keeps the table with an ``id`` primary key and rebuilds an
    # older one in ``apply``; a missing table has no primary key columns at all.
    pks = sorted(
        (pk, name)
        for _cid, name, _type, _notnull, _default, pk in conn.execute(
            f"PRAGMA table_info({_MIGRATIONS_TABLE})"
        )
        if pk
    )
    return [name for _pk, name in pks] == ["id"]


def _apply_migrations(conn: sqlite3.Connection) -> None:
    """Run ``MIGRATIONS.apply``, unless plain sqlite3 shows it would do nothing.

    ``apply`` does nothing when the migrations table exists in its current shape
    and every migration is recorded: the usual start, which then never imports
    sqlite-utils.
    """
    if _migrations_table_current(conn) and not (
        {name for name, _fn in _STEPS} - set(_recorded_migrations(conn))
    ):
        return
    from sqlite_utils import Database  # noqa: PLC0415 - only when a migration runs

    _migrations().apply(Database(conn, execute_plugins=False))


class _CorruptError(Exception):
    """The file is not a usable SQLite journal (internal signal)."""


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


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """Open a connection with the journal's pragmas.

    Args:
        path: the journal file.
        read_only: a reader connection (``query_only``).

    Returns:
        A connection usable from any thread (callers serialise access).
    """
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    if read_only:
        conn.execute("PRAGMA query_only = 1")
    else:
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    # Without an error code, only the plain DatabaseError class means corruption;
    # OperationalError (locked, I/O, permissions) must never quarantine a file.
    return type(exc) is sqlite3.DatabaseError


def _check_header(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb") as fh:
        header = fh.read(len(_SQLITE_MAGIC))
    if header != _SQLITE_MAGIC:
        raise _CorruptError("not an SQLite file (bad header)")


def _run_check(conn: sqlite3.Connection, check: CheckMode) -> None:
    if check == "none":
        return
    pragma = "integrity_check" if check == "integrity" else "quick_check"
    rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}(20)").fetchall()]
    if rows != ["ok"]:
        raise _CorruptError(f"{pragma}: " + "; ".join(str(r) for r in rows[:5]))


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"cannot enable WAL (journal_mode={mode})", path=str(path))


def _open_checked(path: Path, check: CheckMode) -> sqlite3.Connection:
    _check_header(path)
    conn = connect(path)
    try:
        _enable_wal(conn, path)
        _run_check(conn, check)
        _apply_migrations(conn)
        # sqlite-utils leaves the legacy isolation level alone; the writer wants
        # explicit BEGIN/COMMIT only.
        conn.isolation_level = None
    except BaseException:
        conn.close()
        raise
    return conn


def _quarantine(path: Path, reason: str) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.replace(Path(f"{target}{suffix}"))
    logger.warning(
        "journal %s is corrupt (%s): moved aside to %s; starting a fresh journal, "
        "state will be rebuilt from an upstream snapshot",
        path,
        reason,
        target,
    )
    return target


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


def _start_session(path: Path, check: CheckMode) -> OpenResult:
    conn = _open_checked(path, check)
    try:
        conn.execute("BEGIN IMMEDIATE")
        (bd_seq,) = conn.execute(
            "INSERT INTO meta (key, value) VALUES ('bd_seq', 1) "
            "ON CONFLICT (key) DO UPDATE SET value = value + 1 RETURNING value"
        ).fetchone()
        applied = len(_recorded_migrations(conn))
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
    except BaseException:
        conn.close()
        raise
    return result


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
    quarantined: Path | None = None
    try:
        try:
            result = _start_session(path, check)
        except _CorruptError as exc:
            quarantined = _quarantine(path, str(exc))
            result = _start_session(path, check)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            quarantined = _quarantine(path, str(exc))
            result = _start_session(path, check)
    except (sqlite3.Error, _CorruptError) as exc:
        raise JournalError(f"cannot open journal: {exc}", path=str(path)) from exc
    result.quarantined_path = quarantined
    return result
