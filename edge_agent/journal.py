"""The edge agent's local journal: one SQLite file that survives power loss.

What it holds (see DESIGN.md, "State model"):

* **state** — the current value of every key of every CRDT scope, compacted by
  upsert on ``(scope, key)`` and never dropped;
* **deltas** — outbound deltas keyed by scope and dot ``(origin, counter)``,
  deleted only when upstream acknowledges them;
* **events** — per-device append-only streams; the journal assigns ``seq``
  (monotonic per stream, persisted), upstream acknowledges a cursor and the
  journal deletes events up to it;
* **meta** — ``bd_seq`` (incremented at every open), the schema version and
  the drop/refusal counters.

Concurrency: one writer thread owns the write connection and commits in groups
(many callers' writes per ``COMMIT`` with ``synchronous=FULL``); every write
call returns only after the COMMIT that made it durable. Reads run on a
dedicated reader thread with its own connection (WAL lets them proceed during
writes). The event loop never runs SQLite. That machinery (writer thread, bounded
queue, reader thread, open/check/quarantine) is :mod:`edge_agent._sqlite`, shared
with the relay's outbox.

Overflow policy of the bounded write queue (``max_pending_rows``): a write of
state, deltas, acks or non-metric events **waits** for room (backpressure); an
append made only of ``metric`` events is **refused** with
:class:`JournalOverflowError` and counted in ``refused_metrics`` (persisted).
Refusing, not evicting, keeps the contract simple: every accepted write is
durable once its await returns.

Retention: event rows are accounted approximately (payload + stream + kind +
:data:`~edge_agent._journal_schema.ROW_OVERHEAD` bytes) against ``quota_bytes``.
Over quota, the oldest ``metric`` events are deleted first (then, only if that
is not enough, the oldest other events, never ``dropped`` markers) down to 90%
of the quota; each affected stream gets a ``dropped`` event whose msgpack
payload is ``{reason, kind, count, from_seq, to_seq}`` and the counters
``dropped_metrics`` / ``dropped_events`` are persisted. State and deltas do not
count against the quota and are never dropped.

Example::

    async with Journal.open(path, quota_bytes=64 << 20) as journal:
        seqs = await journal.append_events("dev1/metrics", [EventIn("metric", b"...")])
        await journal.ack_events("dev1/metrics", seqs[-1])
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, cast

from edge_agent._journal_errors import (
    JournalClosedError,
    JournalError,
    JournalOverflowError,
    JournalWriteError,
)
from edge_agent._journal_schema import ERRORS, CheckMode, open_journal_file
from edge_agent._journal_types import (
    KIND_DROPPED,
    KIND_METRIC,
    Delta,
    Dot,
    Event,
    EventIn,
    JournalStats,
    StateEntry,
)
from edge_agent._journal_writer import (
    AckDeltasOp,
    AckDeltasThroughOp,
    AckEventsOp,
    AppendEventsOp,
    FreezeSizeOp,
    JournalWriter,
    PutStateOp,
    WriteOp,
)
from edge_agent._sqlite import SqliteStore

__all__ = [
    "Delta",
    "Dot",
    "Event",
    "EventIn",
    "Journal",
    "JournalClosedError",
    "JournalError",
    "JournalOverflowError",
    "JournalStats",
    "JournalWriteError",
    "KIND_DROPPED",
    "KIND_METRIC",
    "StateEntry",
]

_MAX_NAME = 255

_STATE_COLUMNS = "scope, key, value, hlc, origin, counter, tombstone"


def _row_to_state(row: tuple[Any, ...]) -> StateEntry:
    scope, key, value, hlc, origin, counter, tombstone = row
    return StateEntry(scope, key, bytes(value), int(hlc), origin, int(counter), bool(tombstone))


class Journal(SqliteStore[WriteOp, JournalWriter]):
    """The agent's durable local journal (an async context manager).

    Create it with :meth:`open` and enter it with ``async with``; leaving the
    block (or :meth:`aclose`) commits every write already queued, then stops
    the writer and reader threads.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        quota_bytes: int,
        check: CheckMode = "integrity",
        max_batch_rows: int = 4096,
        max_pending_rows: int = 32768,
    ) -> None:
        """Configure a journal; nothing touches the disk until it is entered.

        Args:
            path: the SQLite file (created if missing).
            quota_bytes: event retention quota (firmware profile
                ``journal_quota_mb`` * 2**20).
            check: integrity check at open: ``"integrity"`` (default, full),
                ``"quick"`` (``quick_check``, skips index cross-checks) or ``"none"``.
            max_batch_rows: most rows committed in one transaction.
            max_pending_rows: bound of the write queue, in rows (an event, a
                state entry, a delta or a dot each count one; an ack counts one).

        Raises:
            JournalError: an argument is out of range.
        """
        if quota_bytes <= 0 or max_batch_rows <= 0 or max_pending_rows <= 0:
            raise JournalError("quota_bytes, max_batch_rows and max_pending_rows must be > 0")
        super().__init__(Path(path), errors=ERRORS, max_pending_rows=max_pending_rows)
        self._quota_bytes = quota_bytes
        self._check: CheckMode = check
        self._max_batch_rows = max_batch_rows
        self._bd_seq = 0
        self._schema_version = 0

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        quota_bytes: int,
        check: CheckMode = "integrity",
        max_batch_rows: int = 4096,
        max_pending_rows: int = 32768,
    ) -> Self:
        """Return an unopened journal to use as ``async with Journal.open(...) as j``.

        See :meth:`__init__` for the arguments.
        """
        return cls(
            path,
            quota_bytes=quota_bytes,
            check=check,
            max_batch_rows=max_batch_rows,
            max_pending_rows=max_pending_rows,
        )

    async def start(self) -> None:
        """Open the file, run the integrity check and migrations, start the threads.

        A corrupt file is quarantined (see :attr:`quarantined_path`) rather than
        raised.

        Raises:
            JournalError: already started, or the file cannot be opened for a
                reason other than corruption.
        """
        opened = await self._open_file(lambda: open_journal_file(self._path, check=self._check))
        self._bd_seq = opened.bd_seq
        self._schema_version = opened.schema_version
        self._launch(
            JournalWriter(
                opened,
                path=self._path,
                quota_bytes=self._quota_bytes,
                max_batch_rows=self._max_batch_rows,
                link=self._link,
            )
        )

    async def aclose(self) -> None:
        """Commit every queued write, then stop the threads and close the file.

        Writes still waiting for queue room fail with :class:`JournalClosedError`;
        writes already queued are committed and their callers see success.
        Idempotent.
        """
        await self._close()

    # -- properties ----------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The journal file."""
        return self._path

    @property
    def bd_seq(self) -> int:
        """This session's birth/death sequence number (incremented at every open)."""
        return self._bd_seq

    @property
    def schema_version(self) -> int:
        """Number of schema migrations applied to the file."""
        return self._schema_version

    @property
    def quarantined_path(self) -> Path | None:
        """Where a corrupt journal was moved at open, or ``None``."""
        return self._quarantined

    @property
    def needs_snapshot(self) -> bool:
        """True when the journal was rebuilt empty: ask upstream for a full snapshot."""
        return self._quarantined is not None

    @property
    def transactions(self) -> int:
        """Write transactions committed since open (group commit makes this < writes)."""
        return self._writer.transactions if self._writer is not None else 0

    def stats(self) -> JournalStats:
        """Return the journal's counters (no I/O)."""
        w = self._writer
        if w is None:
            raise JournalClosedError("journal not started", path=str(self._path))
        return JournalStats(
            bd_seq=self._bd_seq,
            schema_version=self._schema_version,
            transactions=w.transactions,
            committed_writes=w.committed_writes,
            event_bytes=w.event_bytes,
            quota_bytes=self._quota_bytes,
            dropped_metrics=w.counters["dropped_metrics"],
            dropped_events=w.counters["dropped_events"],
            refused_metrics=w.refused_metrics,
            pending_rows=self._pending_rows,
        )

    # -- writes ----------------------------------------------------------------------

    async def append_events(self, stream: str, events: Sequence[EventIn]) -> list[int]:
        """Append events to a stream and wait until they are durable.

        Args:
            stream: stream name, e.g. ``"<device>/metrics"``.
            events: the events, in order; kind ``"dropped"`` is reserved.

        Returns:
            The sequence numbers assigned, in order (consecutive).

        Raises:
            JournalOverflowError: every event is a metric and the queue is full.
            JournalClosedError: the journal is not open or is closing.
            JournalWriteError: SQLite failed to commit.
            JournalError: invalid stream, kind or payload.
        """
        _check_name("stream", stream)
        if not events:
            return []
        now_ms = time.time_ns() // 1_000_000
        rows: list[tuple[str, bytes, int]] = []
        metrics = 0
        for ev in events:
            kind, payload = ev.kind, ev.payload
            if kind == KIND_METRIC:
                metrics += 1
            elif not kind or kind == KIND_DROPPED or not isinstance(kind, str):
                raise JournalError(f"invalid or reserved event kind {kind!r}")
            if type(payload) is not bytes:
                raise JournalError(f"event payload must be bytes, not {type(payload).__name__}")
            rows.append((kind, payload, now_ms if ev.ts_ms is None else ev.ts_ms))
        refuse = metrics if metrics == len(rows) else 0
        op = AppendEventsOp(self._new_future(), len(rows), stream, rows, refuse)
        return cast(list[int], await self._run(op))

    async def put_state(
        self, entries: Sequence[StateEntry], *, deltas: Sequence[Delta] = ()
    ) -> None:
        """Upsert state entries (and record outbound deltas) in one transaction.

        The journal stores what the caller merged: a put replaces the row of
        ``(scope, key)`` whatever its timestamp.

        Args:
            entries: the new values.
            deltas: outbound deltas produced by the same mutation (atomic with it).
        """
        for e in entries:
            _check_name("scope", e.scope)
            if type(e.value) is not bytes:
                raise JournalError("state value must be bytes")
        delta_rows = _delta_rows(deltas)
        if not entries and not delta_rows:
            return
        op = PutStateOp(
            self._new_future(), len(entries) + len(delta_rows), list(entries), delta_rows
        )
        await self._run(op)

    async def freeze_size(self, frozen: bool) -> None:
        """Let the file grow no more (``True``), as if its disk were full, or again.

        While frozen, a write that needs a new page fails with
        :class:`JournalWriteError` ("database or disk is full"), exactly as on a
        full disk; pages the journal freed are still reused. The simulator's
        ``fill_disk`` fault uses it: filling a real disk would fill the host's.
        """
        await self._run(FreezeSizeOp(self._new_future(), 0, frozen))

    async def add_deltas(self, deltas: Sequence[Delta]) -> None:
        """Record outbound deltas; a dot already present is left unchanged."""
        await self.put_state((), deltas=deltas)

    async def ack_deltas(self, scope: str, dots: Iterable[Dot]) -> int:
        """Delete the deltas of ``scope`` that upstream acknowledged by dot.

        Returns:
            How many deltas were deleted (unknown dots are ignored).
        """
        _check_name("scope", scope)
        dot_list = [Dot(str(o), int(c)) for o, c in dots]
        if not dot_list:
            return 0
        op = AckDeltasOp(self._new_future(), len(dot_list), scope, dot_list)
        return cast(int, await self._run(op))

    async def ack_deltas_through(self, scope: str, version_vector: Mapping[str, int]) -> int:
        """Delete the deltas of ``scope`` covered by an upstream version vector.

        Returns:
            How many deltas were deleted.
        """
        _check_name("scope", scope)
        if not version_vector:
            return 0
        op = AckDeltasThroughOp(
            self._new_future(), len(version_vector), scope, dict(version_vector)
        )
        return cast(int, await self._run(op))

    async def ack_events(self, stream: str, seq: int) -> int:
        """Record upstream's cursor for a stream and delete its events ``<= seq``.

        An ack at or below the current cursor is a no-op.

        Returns:
            How many events were deleted.

        Raises:
            JournalError: ``seq`` is beyond the last sequence number assigned.
        """
        _check_name("stream", stream)
        op = AckEventsOp(self._new_future(), 1, stream, int(seq))
        return cast(int, await self._run(op))

    # -- reads (reader thread) -------------------------------------------------------

    async def read_events(
        self, stream: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[Event]:
        """Return up to ``limit`` events of ``stream`` with ``seq > after_seq``, in order."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT seq, kind, payload, ts FROM events WHERE stream = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (stream, after_seq, limit),
            ).fetchall()
        )
        return [Event(stream, int(s), k, bytes(p), int(t)) for s, k, p, t in rows]

    async def acked_seq(self, stream: str) -> int:
        """Return upstream's acknowledged cursor for ``stream`` (0 when none)."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT acked_seq FROM cursors WHERE stream = ?", (stream,)
            ).fetchone()
        )
        return 0 if row is None else int(row[0])

    async def event_streams(self) -> dict[str, tuple[int, int]]:
        """Return ``{stream: (first seq held, last seq held)}`` for streams with events."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT stream, MIN(seq), MAX(seq) FROM events GROUP BY stream"
            ).fetchall()
        )
        return {s: (int(lo), int(hi)) for s, lo, hi in rows}

    async def event_count(self, stream: str | None = None) -> int:
        """Return how many events the journal holds (in one stream, or all)."""
        if stream is None:
            row = await self._read(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone())
        else:
            row = await self._read(
                lambda c: c.execute(
                    "SELECT COUNT(*) FROM events WHERE stream = ?", (stream,)
                ).fetchone()
            )
        return int(row[0])

    async def read_state(self, scope: str) -> list[StateEntry]:
        """Return every entry of ``scope`` (tombstones included), ordered by key."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_STATE_COLUMNS} FROM state WHERE scope = ? ORDER BY key", (scope,)
            ).fetchall()
        )
        return [_row_to_state(r) for r in rows]

    async def get_state(self, scope: str, key: str) -> StateEntry | None:
        """Return one state entry, or ``None``."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_STATE_COLUMNS} FROM state WHERE scope = ? AND key = ?", (scope, key)
            ).fetchone()
        )
        return None if row is None else _row_to_state(row)

    async def pending_deltas(self, *, scope: str | None = None, limit: int = 1000) -> list[Delta]:
        """Return unacknowledged deltas (of one scope, or all), by scope, origin, counter."""
        sql = "SELECT scope, origin, counter, payload FROM deltas"
        params: tuple[object, ...] = (limit,)
        if scope is not None:
            sql += " WHERE scope = ?"
            params = (scope, limit)
        sql += " ORDER BY scope, origin, counter LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [Delta(s, o, int(n), bytes(p)) for s, o, n, p in rows]

    # -- internals -------------------------------------------------------------------

    def _on_queue_full(self, op: WriteOp) -> None:
        # Metrics are periodic samples: refuse a metrics-only append (the next
        # sample supersedes it) rather than make the sampler wait.
        if isinstance(op, AppendEventsOp) and op.refuse:
            writer = self._check_open()
            writer.refused_metrics += op.refuse
            raise JournalOverflowError(
                pending_rows=self._pending_rows,
                limit_rows=self._max_pending_rows,
                refused=op.refuse,
                path=str(self._path),
            )


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise JournalError(f"{what} must be a non-empty string of at most {_MAX_NAME} chars")


def _delta_rows(deltas: Sequence[Delta]) -> list[tuple[str, str, int, bytes]]:
    rows = []
    for d in deltas:
        _check_name("scope", d.scope)
        if type(d.payload) is not bytes:
            raise JournalError("delta payload must be bytes")
        rows.append((d.scope, d.origin, int(d.counter), d.payload))
    return rows
