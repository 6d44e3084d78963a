"""The SQLite hub store's schema, its migrations and opening a file (blocking).

Tables (all ``STRICT``; JSON columns hold canonical JSON, see :func:`dumps`):

- ``devices`` (id primary key, public_key unique, indexes on region, profile and
  status, each with the id so that a filtered listing reads in page order) and
  ``device_labels`` (device_id, key, value), the labels again as rows so a label
  filter is an index lookup; ``devices.labels`` keeps the map for reading.
- ``enroll_tokens``.
- ``deployment_versions`` (name, version) and ``deployments`` (name, its latest
  version and whether it is deleted: the listing reads one row per name).
- ``rollouts`` (one per deployment, indexed by phase) and ``assignments``.
- ``scopes`` (opaque CRDT state), ``stream_cursors``, ``events`` and
  ``event_counts`` (rows per stream, so pruning never counts a stream).

Opening never repairs: the hub database is the fleet's source of truth, so a
file that is not SQLite, fails the integrity check or carries migrations this
code does not know is refused with :class:`~cloud_hub.store.StoreError`, and
left where it is for an operator to restore from a backup.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cloud_hub.store import StoreError

# The header and integrity checks are the agent journal's and relay outbox's
# (edge_agent._sqlite); the hub's answer to what they find is its own: refuse
# the file (never quarantine it).
from edge_agent._sqlite import (
    CheckMode,
    MigrationSet,
    _check_header,
    _CorruptError,
    _is_corruption,
    _run_check,
)

if TYPE_CHECKING:
    from sqlite_utils import Database

__all__ = ["MIGRATION_SET", "CheckMode", "connect", "open_database"]

logger = logging.getLogger(__name__)


# -- migrations (append only) ----------------------------------------------------------


def _m0001_initial(db: Database) -> None:
    for statement in _INITIAL:
        db.execute(statement)


_INITIAL: Final = (
    """CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        region TEXT NOT NULL,
        profile TEXT NOT NULL,
        public_key TEXT NOT NULL UNIQUE,
        arch TEXT NOT NULL,
        labels TEXT NOT NULL,
        facts TEXT NOT NULL,
        enrolled_at_ms INTEGER NOT NULL,
        token_id TEXT,
        mqtt_username TEXT NOT NULL,
        status TEXT NOT NULL,
        last_seen_ms INTEGER
    ) STRICT""",
    "CREATE INDEX devices_region ON devices (region, id)",
    "CREATE INDEX devices_profile ON devices (profile, id)",
    "CREATE INDEX devices_status ON devices (status, id)",
    """CREATE TABLE device_labels (
        device_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (device_id, key)
    ) STRICT, WITHOUT ROWID""",
    "CREATE INDEX device_labels_kv ON device_labels (key, value, device_id)",
    """CREATE TABLE enroll_tokens (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        name TEXT NOT NULL,
        region TEXT NOT NULL,
        labels TEXT NOT NULL,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL,
        expires_at_ms INTEGER,
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        revoked_at_ms INTEGER
    ) STRICT""",
    """CREATE TABLE deployment_versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        document TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        deleted INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE deployments (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        deleted INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE rollouts (
        deployment TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        phase TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_at_ms INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX rollouts_phase ON rollouts (phase, deployment)",
    """CREATE TABLE assignments (
        deployment TEXT NOT NULL,
        device_id TEXT NOT NULL,
        assigned_at_ms INTEGER NOT NULL,
        PRIMARY KEY (deployment, device_id)
    ) STRICT, WITHOUT ROWID""",
    "CREATE INDEX assignments_device ON assignments (device_id, deployment)",
    """CREATE TABLE scopes (
        scope TEXT PRIMARY KEY,
        state BLOB NOT NULL
    ) STRICT""",
    """CREATE TABLE stream_cursors (
        device_id TEXT NOT NULL,
        stream TEXT NOT NULL,
        next_seq INTEGER NOT NULL,
        PRIMARY KEY (device_id, stream)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE events (
        device_id TEXT NOT NULL,
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ingested_at_ms INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (device_id, stream, seq)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE event_counts (
        device_id TEXT NOT NULL,
        stream TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (device_id, stream)
    ) STRICT, WITHOUT ROWID""",
)

MIGRATION_SET: Final = MigrationSet("novacron_hub_store", (("0001_initial", _m0001_initial),))
"""The store's migrations, recorded in the database under this set name (other
sets, such as the API tokens', may share the file). Append only."""


# -- opening -----------------------------------------------------------------------------


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """Open one connection with the store's pragmas (blocking).

    Args:
        path: the database file.
        read_only: a reader connection (``query_only``).

    Returns:
        A connection in autocommit mode (explicit ``BEGIN`` only), usable from
        the one thread that the store gives it to.
    """
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        # WAL + NORMAL: a commit is atomic and the file never corrupt, but the
        # last transactions before a power cut (not a process crash) may be lost
        # until the next checkpoint. The hub can afford it: every write it takes
        # from the fleet is re-sent by the relay (ingest is acknowledged only
        # after commit, and re-ingest is idempotent), and an API write lost to a
        # power cut is one the client saw succeed moments before the host died.
        # FULL would fsync the WAL on every commit of the ingest path.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = OFF")
        if read_only:
            conn.execute("PRAGMA query_only = 1")
    except BaseException:
        conn.close()
        raise
    return conn


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether an SQLite error means the file is damaged or not a database."""
    return isinstance(exc, sqlite3.DatabaseError) and _is_corruption(exc)


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
    if mode != "wal":
        raise StoreError(f"hub store {path}: cannot enable WAL (journal_mode={mode})")


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    known = {name for name, _fn in MIGRATION_SET.steps}
    unknown = [name for name in MIGRATION_SET.recorded(conn) if name not in known]
    if unknown:
        raise StoreError(
            f"hub store {path}: schema is newer than this version of the hub knows "
            f"(migrations {', '.join(unknown)}); upgrade the hub"
        )


def open_database(path: Path, *, check: CheckMode = "quick") -> sqlite3.Connection:
    """Open (creating if needed) and migrate the store file; return the write connection.

    Blocking: run it off the event loop.

    Args:
        path: the database file; its directory is created if missing.
        check: ``quick`` (``PRAGMA quick_check``, the default), ``integrity``
            (slower and thorough) or ``none`` (skip it: for a very large file
            whose start time matters more).

    Raises:
        StoreError: the file cannot be opened, is not an SQLite database, is
            corrupt, carries a newer schema, or WAL cannot be enabled.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"hub store {path}: cannot create its directory: {exc}") from exc
    try:
        _check_header(path)
    except _CorruptError as exc:
        raise StoreError(
            f"hub store {path}: not an SQLite database (bad header); "
            "restore it from a backup or point the hub at another file"
        ) from exc
    try:
        conn = connect(path)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from exc
    try:
        _enable_wal(conn, path)
        _run_check(conn, check)
        _check_version(conn, path)
        MIGRATION_SET.apply(conn)
        conn.isolation_level = None  # sqlite-utils may leave it set
    except _CorruptError as exc:
        conn.close()
        raise StoreError(
            f"hub store {path}: database is corrupt ({exc}); restore it from a backup"
        ) from exc
    except sqlite3.Error as exc:
        conn.close()
        raise _open_error(path, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    if is_corruption(exc):
        return StoreError(
            f"hub store {path}: database is corrupt or not an SQLite file ({exc}); "
            "restore it from a backup"
        )
    return StoreError(f"hub store {path}: cannot open: {exc}")
