"""The hub's audit log: a hash-chained, append-only record of every mutating API call.

Storage
    One SQLite file (``audit.db`` in the hub's data directory; WAL,
    ``synchronous=FULL``), kept apart from the fleet store so that it can be
    verified, copied and archived on its own. Table ``audit_log``, one row per
    entry: ``seq`` (1, 2, 3, ...), ``ts_ms`` (wall clock, Unix milliseconds),
    ``actor`` (the API token id), ``role``, ``action`` (``"POST
    /api/v1/deployments"``), ``target`` (what was acted on), ``outcome`` (the HTTP
    status), ``detail`` (canonical JSON text, at most :data:`MAX_DETAIL_BYTES`),
    ``prev_hash`` and ``hash``.

Chain
    ``hash = sha256(canonical(entry)).hexdigest()`` where ``canonical`` is the JSON
    encoding of every field except ``hash`` -- ``seq, ts_ms, actor, role, action,
    target, outcome, detail, prev_hash`` -- with sorted keys, no whitespace
    (``separators=(",", ":")``) and ``ensure_ascii=True``, as ASCII bytes (see
    :func:`canonical_bytes`). ``detail`` enters the encoding as the stored JSON
    *text* (a string), so verification never re-parses it. ``prev_hash`` is the
    previous entry's ``hash``; the first entry's is :data:`GENESIS_HASH` (64 zeros).

Append-only in SQLite too
    ``BEFORE UPDATE`` and ``BEFORE DELETE`` triggers abort any change to a row, and
    a ``BEFORE INSERT`` trigger refuses a row that does not extend the chain (its
    ``seq`` is not the next one or its ``prev_hash`` is not the head's hash). This
    stops mistakes and casual edits, not an attacker with write access to the file,
    who can drop the triggers: the chain and the anchor are what detect that. A log
    whose triggers are gone gets them back at the next :meth:`AuditLog.open` (with
    a warning), and :func:`verify` reports their absence as a warning.

Anchor
    After each append commits, the head ``(seq, hash)`` is written atomically
    (temporary file, ``fsync``, ``rename``) to ``audit.anchor`` next to the
    database. The anchor is what detects the newest entries being cut off, which
    the chain alone cannot (a shorter chain is still a valid chain). The anchor is
    written *after* the commit, so after a crash it may lag the database by one
    entry but is never ahead of it: an anchor ahead of the database always means
    entries were removed. :meth:`AuditLog.open` refuses a database that does not
    match its anchor, so that new appends cannot overwrite the evidence.

    Limits: the chain is unkeyed. An attacker who can write both files can rewrite
    every entry from some point on, recompute the hashes and rewrite the anchor;
    only an anchor kept *outside* the attacker's reach catches that. Export one
    regularly with ``novacron audit anchor --data-dir DIR --out FILE`` (it verifies
    the log first and prints ``{"seq", "hash", "ts_ms"}``) to another host,
    write-once storage or a ticket, and check against it with ``novacron audit
    verify --anchor FILE``: an old anchor stays valid as the log grows.

Verification (:func:`verify`) walks the rows in ``seq`` order and stops at the first
problem. For each row it finds the ``seq`` the row was hashed with (its stored seq,
or, when that does not match, any other seq up to the row count or the highest
anchor that makes its hash match), then reports, with ``first_bad_seq`` the chain
position ``e`` expected next:

* ``"altered"`` -- the row at ``e`` matches its hash with no seq at all (a field or
  the hash was edited), or only with a seq other than its stored one while it sits
  where it belongs (its ``seq`` column was edited); or, from an anchor, the entry at
  the anchor's seq has another hash (the chain was rewritten up to there);
* ``"dropped"`` -- entry ``e`` is found nowhere (deleted, whether or not later rows
  were renumbered, or its row now matches no seq in the searched range), or the
  row at ``e`` does not link to its predecessor's hash (``prev_hash`` mismatch: an
  entry before it was replaced by a re-hashed one);
* ``"reordered"`` -- the row at ``e`` was hashed with a different seq while entry
  ``e`` itself is still present elsewhere (two seqs swapped, an entry moved);
* ``"truncated"`` -- an anchor names a seq beyond the last entry (the newest
  entries were removed);
* ``"unreadable"`` -- the file is not an audit database, a row has the wrong types
  or an anchor file is malformed.

Concurrency: :meth:`AuditLog.append` is thread-safe (one lock around the
transaction and the anchor write; the hub calls it from a worker thread); the next
``seq`` and ``prev_hash`` are read inside a ``BEGIN IMMEDIATE`` transaction, so
a second process appending to the same file cannot fork the chain either, though
the anchor then reflects whichever process wrote last. Run one writer per file.

Example::

    with AuditLog.open(data_dir / "audit.db") as log:
        log.append(actor="a1b2c3d4e5f6", role="operator",
                   action="POST /api/v1/deployments", target="deployment/web",
                   outcome=201, detail={"version": 3})
    report = verify(data_dir / "audit.db")
    assert report.ok
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Self

from cloud_hub._audit_chain import (
    GENESIS_HASH,
    MAX_DETAIL_BYTES,
    MAX_TEXT_CHARS,
    Anchor,
    AuditEntry,
    canonical_bytes,
    canonical_detail,
    clean_text,
    default_anchor_path,
    entry_hash,
    read_anchor,
    write_anchor,
)
from cloud_hub._audit_verify import (
    COLUMNS,
    TABLE,
    TRIGGERS,
    Reason,
    VerifyReport,
    missing_triggers,
    row_entry,
    verify,
)
from cloud_hub._closing import Closing
from cloud_hub._exceptions import AuditError

if TYPE_CHECKING:
    from sqlite_utils import Database

__all__ = [
    "ANCHOR_FILENAME",
    "DB_FILENAME",
    "GENESIS_HASH",
    "MAX_DETAIL_BYTES",
    "MAX_TEXT_CHARS",
    "Anchor",
    "AuditEntry",
    "AuditLog",
    "Reason",
    "VerifyReport",
    "canonical_bytes",
    "default_anchor_path",
    "entry_hash",
    "read_anchor",
    "verify",
    "write_anchor",
]

logger = logging.getLogger(__name__)

DB_FILENAME: Final = "audit.db"
"""The audit database's name in the hub's data directory."""
ANCHOR_FILENAME: Final = "audit.anchor"
"""The local anchor's name in the hub's data directory."""

_MIGRATION_SET: Final = "novacron_hub_audit"


# -- schema ----------------------------------------------------------------------------


def _m0001_initial(db: Database) -> None:
    # STRICT: a value of the wrong type is refused rather than coerced, so what is
    # read back is what was hashed.
    db.execute(
        f"""CREATE TABLE {TABLE} (
            seq INTEGER PRIMARY KEY CHECK (seq >= 1),
            ts_ms INTEGER NOT NULL,
            actor TEXT NOT NULL,
            role TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome INTEGER NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        ) STRICT"""
    )
    for statement in TRIGGERS.values():
        db.execute(statement)


_STEPS: Final[tuple[tuple[str, Callable[[Database], None]], ...]] = (
    ("0001_initial", _m0001_initial),
)
"""The audit schema's migrations, in order. Append only."""


def _apply_migrations(conn: sqlite3.Connection) -> None:
    # sqlite-utils is imported only here: `novacron audit verify` never migrates.
    from sqlite_utils import Database, Migrations  # noqa: PLC0415

    migrations = Migrations(_MIGRATION_SET)
    for name, fn in _STEPS:
        migrations(name=name)(fn)
    migrations.apply(Database(conn, execute_plugins=False))


# -- the log ---------------------------------------------------------------------------


class AuditLog(Closing):
    """An open audit log (a context manager; see the module docstring).

    Open it with :meth:`open`. All methods are blocking and thread-safe: call them
    from a worker thread (``asyncio.to_thread``), never on the event loop.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        anchor_path: Path | None,
        clock: Callable[[], float],
    ) -> None:
        """Wrap an open connection; use :meth:`open` instead."""
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._anchor_path = anchor_path
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        anchor_path: str | Path | Literal["default"] | None = "default",
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (creating if needed) an audit log.

        Args:
            path: the database file; its directory is created if missing.
            anchor_path: the local anchor file written after each append:
                ``"default"`` for :func:`default_anchor_path`, ``None`` for none.
            clock: wall clock in seconds (``ts_ms`` of new entries).

        Returns:
            The open log.

        Raises:
            AuditError: the file cannot be opened or migrated, or it does not match
                its anchor (entries were removed or the chain was rewritten: run
                ``novacron audit verify``; to accept the database as it is, move the
                anchor aside yourself).
        """
        db_path = Path(path)
        anchor = (
            default_anchor_path(db_path)
            if anchor_path == "default"
            else (None if anchor_path is None else Path(anchor_path))
        )
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db_path, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise AuditError(f"cannot open audit log: {exc}", path=str(db_path)) from exc
        try:
            cls._prepare(conn, db_path, anchor)
        except BaseException:
            conn.close()
            raise
        return cls(conn, db_path, anchor, clock)

    @staticmethod
    def _prepare(conn: sqlite3.Connection, path: Path, anchor_path: Path | None) -> None:
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise AuditError(f"cannot enable WAL (journal_mode={mode})", path=str(path))
            conn.execute("PRAGMA synchronous = FULL")
            _apply_migrations(conn)
            conn.isolation_level = None  # explicit BEGIN/COMMIT only
            missing = missing_triggers(conn)
            if missing:
                logger.warning(
                    "audit log %s had lost its append-only triggers %s (tampering?); "
                    "recreated them; run `novacron audit verify`",
                    path,
                    ", ".join(missing),
                )
                for name in missing:
                    conn.execute(TRIGGERS[name])
            if anchor_path is not None and anchor_path.exists():
                _check_against_anchor(conn, path, read_anchor(anchor_path))
        except sqlite3.Error as exc:
            raise AuditError(f"cannot open audit log: {exc}", path=str(path)) from exc

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def anchor_path(self) -> Path | None:
        """The local anchor file, or ``None`` when the log keeps none."""
        return self._anchor_path

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AuditError("audit log is closed", path=str(self._path))
        return self._conn

    # -- writes ----------------------------------------------------------------------

    def append(
        self,
        *,
        actor: str,
        role: str,
        action: str,
        target: str = "",
        outcome: int,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """Append an entry and return it once it is durable (and anchored).

        Text fields longer than :data:`MAX_TEXT_CHARS` are cut (with a
        ``...[+N chars]`` suffix); a ``detail`` whose canonical JSON is longer than
        :data:`MAX_DETAIL_BYTES` is replaced by ``{"truncated": true, "bytes": N,
        "sha256": ...}`` of it, so an entry is never refused for its size.

        Args:
            actor: the API token id (or user) that made the call.
            role: its role.
            action: method and route, e.g. ``"POST /api/v1/deployments"``.
            target: what was acted on, e.g. ``"deployment/web"``.
            outcome: the HTTP status code returned (0-999).
            detail: JSON-encodable details (request id, versions, reason, ...).

        Returns:
            The entry as stored.

        Raises:
            AuditError: invalid arguments, a closed log, or SQLite or the anchor
                write failed (the entry is not in the log unless the failure was
                the anchor write, which happens after the commit).
        """
        fields = {
            "actor": clean_text("actor", actor),
            "role": clean_text("role", role),
            "action": clean_text("action", action),
            "target": clean_text("target", target),
        }
        if type(outcome) is not int or not 0 <= outcome <= 999:
            raise AuditError(f"outcome must be an HTTP status code, not {outcome!r}")
        detail_text = canonical_detail(detail)
        with self._lock:
            conn = self._connection()
            try:
                entry = self._append_locked(conn, fields, outcome, detail_text)
            except sqlite3.Error as exc:
                raise AuditError(f"cannot append: {exc}", path=str(self._path)) from exc
            if self._anchor_path is not None:
                write_anchor(self._anchor_path, Anchor(entry.seq, entry.hash, entry.ts_ms))
        logger.debug("audit %s %s %s -> %s", entry.seq, entry.actor, entry.action, outcome)
        return entry

    def _append_locked(
        self, conn: sqlite3.Connection, fields: dict[str, str], outcome: int, detail: str
    ) -> AuditEntry:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                f"SELECT seq, hash FROM {TABLE} ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev_hash = (1, GENESIS_HASH) if row is None else (int(row[0]) + 1, str(row[1]))
            ts_ms = int(self._clock() * 1000)
            digest = entry_hash(
                seq=seq,
                ts_ms=ts_ms,
                actor=fields["actor"],
                role=fields["role"],
                action=fields["action"],
                target=fields["target"],
                outcome=outcome,
                detail=detail,
                prev_hash=prev_hash,
            )
            entry = AuditEntry(
                seq=seq,
                ts_ms=ts_ms,
                actor=fields["actor"],
                role=fields["role"],
                action=fields["action"],
                target=fields["target"],
                outcome=outcome,
                detail=detail,
                prev_hash=prev_hash,
                hash=digest,
            )
            conn.execute(
                f"INSERT INTO {TABLE} ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.ts_ms,
                    entry.actor,
                    entry.role,
                    entry.action,
                    entry.target,
                    entry.outcome,
                    entry.detail,
                    entry.prev_hash,
                    entry.hash,
                ),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return entry

    # -- reads -----------------------------------------------------------------------

    def entries(self, *, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Return up to ``limit`` entries with ``seq > after_seq``, oldest first.

        Rows that no longer have the right column types are skipped; use
        :func:`verify` to check the log.
        """
        if limit <= 0:
            return []
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    f"SELECT {COLUMNS} FROM {TABLE} WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                )
                .fetchall()
            )
        entries = [e for e in map(row_entry, rows) if e is not None]
        if len(entries) != len(rows):
            logger.warning(
                "audit log %s: %d rows with wrong column types skipped; run `novacron audit "
                "verify`",
                self._path,
                len(rows) - len(entries),
            )
        return entries

    def head(self) -> Anchor:
        """Return the current head ``(seq, hash)`` (``(0, GENESIS_HASH)`` when empty)."""
        with self._lock:
            row = (
                self._connection()
                .execute(f"SELECT seq, hash, ts_ms FROM {TABLE} ORDER BY seq DESC LIMIT 1")
                .fetchone()
            )
        if row is None:
            return Anchor(0, GENESIS_HASH, 0)
        return Anchor(int(row[0]), str(row[1]), int(row[2]))

    def verify(self, *, anchors: Sequence[Path | Anchor] | None = None) -> VerifyReport:
        """Verify this log's file, see :func:`verify` (the local anchor by default)."""
        if anchors is None:
            local = self._anchor_path
            # No anchor file yet means nothing was appended through this path.
            anchors = [local] if local is not None and local.exists() else []
        return verify(self._path, anchors=anchors)


def _check_against_anchor(conn: sqlite3.Connection, path: Path, anchor: Anchor) -> None:
    if anchor.seq == 0:
        return
    row = conn.execute(f"SELECT hash FROM {TABLE} WHERE seq = ?", (anchor.seq,)).fetchone()
    if row is None or row[0] != anchor.hash:
        what = "is missing" if row is None else "has a different hash"
        raise AuditError(
            f"entry {anchor.seq} named by the anchor {what}: entries were removed or the "
            "chain was rewritten; run `novacron audit verify` and move the anchor aside "
            "only once the log has been dealt with",
            path=str(path),
        )
