"""The journal's single writer thread and the write operations it applies.

Callers on the event loop enqueue :class:`WriteOp` objects; the thread drains up
to ``max_batch_rows`` rows of them per transaction (group commit), commits with
``synchronous=FULL`` and hands every result back to the loop in one
``call_soon_threadsafe`` per transaction. Nothing here touches asyncio futures
directly: completion runs on the loop, in the journal facade.

If a transaction fails, it is rolled back and its operations are retried one per
transaction, so one bad write fails alone and never takes its batch with it.

The thread, the queue and the group commit are :class:`edge_agent._sqlite.SqliteWriter`
(shared with the relay's outbox); this module adds the journal's ops, its
in-memory bookkeeping (next seqs, event bytes), quota drops and counters.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack

from edge_agent._journal_errors import JournalError
from edge_agent._journal_schema import ERRORS, ROW_OVERHEAD, OpenResult
from edge_agent._journal_types import KIND_DROPPED, KIND_METRIC, Dot, StateEntry
from edge_agent._sqlite import SqliteWriter, WriterLink

__all__ = [
    "AckDeltasOp",
    "AckDeltasThroughOp",
    "AckEventsOp",
    "AppendEventsOp",
    "Completion",
    "JournalWriter",
    "PutStateOp",
    "WriteOp",
]

logger = logging.getLogger(__name__)

_INSERT_EVENT = "INSERT INTO events (stream, seq, kind, payload, ts) VALUES (?, ?, ?, ?, ?)"
_UPSERT_STATE = (
    "INSERT INTO state (scope, key, value, hlc, origin, counter, tombstone) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
    "value = excluded.value, hlc = excluded.hlc, origin = excluded.origin, "
    "counter = excluded.counter, tombstone = excluded.tombstone"
)
# A dot names one delta forever, so a replayed dot is a duplicate, not an update.
_INSERT_DELTA = (
    "INSERT INTO deltas (scope, origin, counter, payload) VALUES (?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
_UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_ROW_BYTES_SQL = f"length(payload) + length(stream) + length(kind) + {ROW_OVERHEAD}"

#: Quota drops free down to this fraction of the quota, so they happen in
#: chunks rather than on every write once the journal is full.
QUOTA_LOW_WATER = 0.9
_DROP_CHUNK = 4096
_PERSISTED_COUNTERS = ("dropped_metrics", "dropped_events", "refused_metrics")

Completion = tuple["WriteOp", object, BaseException | None]


@dataclass(slots=True, eq=False)
class WriteOp:
    """One write call; applied inside a transaction by the writer thread.

    Attributes:
        future: resolved on the event loop after the COMMIT that included it.
        rows: weight of the op for queue bounds and batch sizing.
    """

    future: asyncio.Future[Any]
    rows: int

    def apply(self, w: JournalWriter) -> object:
        """Apply the op on the writer's connection, inside its transaction."""
        raise NotImplementedError


@dataclass(slots=True, eq=False)
class AppendEventsOp(WriteOp):
    """Append events ``(kind, payload, ts_ms)`` to a stream; result: their seqs."""

    stream: str = ""
    events: Sequence[tuple[str, bytes, int]] = ()
    #: metric events refused (and counted) instead of waiting when the queue is
    #: full: the call's size when it carries only metrics, else 0.
    refuse: int = 0

    def apply(self, w: JournalWriter) -> list[int]:
        return w.append_rows(self.stream, self.events)


@dataclass(slots=True, eq=False)
class PutStateOp(WriteOp):
    """Upsert state entries and record outbound deltas atomically; result: None."""

    entries: Sequence[StateEntry] = ()
    deltas: Sequence[tuple[str, str, int, bytes]] = ()

    def apply(self, w: JournalWriter) -> None:
        w.flush_events()
        if self.entries:
            w.conn.executemany(
                _UPSERT_STATE,
                [
                    (e.scope, e.key, e.value, e.hlc, e.origin, e.counter, int(e.tombstone))
                    for e in self.entries
                ],
            )
        if self.deltas:
            w.conn.executemany(_INSERT_DELTA, self.deltas)


@dataclass(slots=True, eq=False)
class AckDeltasOp(WriteOp):
    """Delete the deltas of ``scope`` with the given dots; result: rows deleted."""

    scope: str = ""
    dots: Sequence[Dot] = ()

    def apply(self, w: JournalWriter) -> int:
        w.flush_events()
        cur = w.conn.executemany(
            "DELETE FROM deltas WHERE scope = ? AND origin = ? AND counter = ?",
            [(self.scope, d.origin, d.counter) for d in self.dots],
        )
        return max(cur.rowcount, 0)


@dataclass(slots=True, eq=False)
class AckDeltasThroughOp(WriteOp):
    """Delete the deltas of ``scope`` covered by a version vector; result: rows deleted."""

    scope: str = ""
    version_vector: Mapping[str, int] = field(default_factory=dict)

    def apply(self, w: JournalWriter) -> int:
        w.flush_events()
        cur = w.conn.executemany(
            "DELETE FROM deltas WHERE scope = ? AND origin = ? AND counter <= ?",
            [(self.scope, o, c) for o, c in self.version_vector.items()],
        )
        return max(cur.rowcount, 0)


@dataclass(slots=True, eq=False)
class AckEventsOp(WriteOp):
    """Record an upstream cursor and delete events ``<= seq``; result: rows deleted."""

    stream: str = ""
    seq: int = 0

    def apply(self, w: JournalWriter) -> int:
        return w.ack_events(self.stream, self.seq)


@dataclass(slots=True, eq=False)
class FreezeSizeOp(WriteOp):
    """Stop (or let again) the file growing, as on a full disk; result: None.

    ``PRAGMA max_page_count`` is a setting of the writer's own connection, so it
    is changed on the writer thread, between two writes.
    """

    frozen: bool = False

    def apply(self, w: JournalWriter) -> None:
        if self.frozen:
            (pages,) = w.conn.execute("PRAGMA page_count").fetchone()
            w.conn.execute(f"PRAGMA max_page_count = {int(pages)}")
        else:
            w.conn.execute(f"PRAGMA max_page_count = {_MAX_PAGE_COUNT}")


_MAX_PAGE_COUNT = 0xFFFFFFFE
"""SQLite's own upper bound for ``max_page_count``."""


class JournalWriter(SqliteWriter[WriteOp]):
    """Owns the write connection and the thread that applies :class:`WriteOp`.

    All mutable bookkeeping (next seqs, byte count, counters) is touched only by
    the writer thread, except :attr:`refused_metrics`, which the event loop
    increments and the thread only reads when persisting counters.
    """

    _errors = ERRORS
    _logger = logger

    def __init__(
        self,
        opened: OpenResult,
        *,
        path: Path,
        quota_bytes: int,
        max_batch_rows: int,
        link: WriterLink[WriteOp],
    ) -> None:
        """Prepare the writer; :meth:`start` launches its thread."""
        super().__init__(opened.conn, path=path, max_batch_rows=max_batch_rows, link=link)
        self.quota_bytes = quota_bytes
        self.next_seq: dict[str, int] = dict(opened.next_seq)
        self.acked: dict[str, int] = dict(opened.acked)
        self.event_bytes = opened.event_bytes
        self.event_rows = opened.event_rows
        self.counters: dict[str, int] = {k: opened.counters.get(k, 0) for k in _PERSISTED_COUNTERS}
        self.refused_metrics = self.counters["refused_metrics"]
        self._persisted = dict(self.counters)
        self._event_rows: list[tuple[str, int, str, bytes, int]] = []
        self._over_quota_warned = False

    # -- transaction hooks (writer thread) ---------------------------------------------

    def _apply(self, op: WriteOp) -> object:
        return op.apply(self)

    def _snapshot(self) -> object:
        return (
            dict(self.next_seq),
            dict(self.acked),
            self.event_bytes,
            self.event_rows,
            dict(self.counters),
        )

    def _restore(self, snapshot: object) -> None:
        self._event_rows.clear()
        (self.next_seq, self.acked, self.event_bytes, self.event_rows, self.counters) = cast(
            "tuple[dict[str, int], dict[str, int], int, int, dict[str, int]]", snapshot
        )

    def _before_commit(self, batch: list[WriteOp]) -> None:
        self.flush_events()
        self._enforce_quota()
        self._persist_counters()

    def _after_commit(self, batch: list[WriteOp]) -> None:
        self._persisted.update(self.counters)

    def _finish(self) -> None:
        self._persist_final()

    # -- helpers used by ops (writer thread, inside a transaction) ---------------------

    def append_rows(self, stream: str, events: Sequence[tuple[str, bytes, int]]) -> list[int]:
        """Assign seqs to events and buffer their rows for one executemany."""
        first = self.next_seq.get(stream, 1)
        rows = self._event_rows
        size = (len(stream) + ROW_OVERHEAD) * len(events)
        seq = first
        for kind, payload, ts in events:
            rows.append((stream, seq, kind, payload, ts))
            size += len(payload) + len(kind)
            seq += 1
        self.next_seq[stream] = seq
        self.event_bytes += size
        self.event_rows += len(events)
        return list(range(first, seq))

    def flush_events(self) -> None:
        """Insert buffered event rows (before any op that reads or deletes events)."""
        if self._event_rows:
            self.conn.executemany(_INSERT_EVENT, self._event_rows)
            self._event_rows.clear()

    def ack_events(self, stream: str, seq: int) -> int:
        """Move the stream's acked cursor to ``seq`` and delete events up to it."""
        last = self.next_seq.get(stream, 1) - 1
        if seq > last:
            raise JournalError(
                f"ack of {stream!r} seq {seq} beyond the last assigned seq {last}",
                path=str(self.path),
            )
        if seq <= self.acked.get(stream, 0):
            return 0
        self.flush_events()
        (freed,) = self.conn.execute(
            f"SELECT COALESCE(SUM({_ROW_BYTES_SQL}), 0) FROM events WHERE stream = ? AND seq <= ?",
            (stream, seq),
        ).fetchone()
        cur = self.conn.execute("DELETE FROM events WHERE stream = ? AND seq <= ?", (stream, seq))
        self.conn.execute(
            "INSERT INTO cursors (stream, acked_seq) VALUES (?, ?) "
            "ON CONFLICT (stream) DO UPDATE SET acked_seq = excluded.acked_seq",
            (stream, seq),
        )
        self.event_bytes -= int(freed)
        self.event_rows -= max(cur.rowcount, 0)
        self.acked[stream] = seq
        return max(cur.rowcount, 0)

    def _enforce_quota(self) -> None:
        if self.event_bytes <= self.quota_bytes:
            self._over_quota_warned = False
            return
        target = int(self.quota_bytes * QUOTA_LOW_WATER)
        for label, where, counter in (
            (KIND_METRIC, f"kind = '{KIND_METRIC}'", "dropped_metrics"),
            ("event", f"kind NOT IN ('{KIND_METRIC}', '{KIND_DROPPED}')", "dropped_events"),
        ):
            if self.event_bytes <= target:
                return
            self._drop(label, where, counter, target)
        if self.event_bytes > self.quota_bytes and not self._over_quota_warned:
            self._over_quota_warned = True
            logger.warning(
                "journal %s: %d event bytes over a %d-byte quota with nothing left to drop",
                self.path,
                self.event_bytes,
                self.quota_bytes,
            )

    def _drop(self, label: str, where: str, counter: str, target: int) -> None:
        # stream -> [count, first seq, last seq]
        spans: dict[str, list[int]] = {}
        total = 0
        while self.event_bytes > target:
            # Size each DELETE from the average row so a drop barely overshoots.
            avg = max(self.event_bytes // max(self.event_rows, 1), 1)
            chunk = min(max(-(-(self.event_bytes - target) // avg), 1), _DROP_CHUNK)
            rows = self.conn.execute(
                f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE {where} "
                f"ORDER BY id LIMIT {chunk}) RETURNING stream, seq, {_ROW_BYTES_SQL}"
            ).fetchall()
            if not rows:
                break
            self.event_rows -= len(rows)
            for stream, seq, size in rows:
                self.event_bytes -= int(size)
                span = spans.get(stream)
                if span is None:
                    spans[stream] = [1, seq, seq]
                else:
                    span[0] += 1
                    span[1] = min(span[1], seq)
                    span[2] = max(span[2], seq)
            total += len(rows)
        if not total:
            return
        self.counters[counter] += total
        now_ms = time.time_ns() // 1_000_000
        for stream, (count, first, last) in spans.items():
            payload = msgpack.packb(
                {
                    "reason": "quota",
                    "kind": label,
                    "count": count,
                    "from_seq": first,
                    "to_seq": last,
                }
            )
            self.append_rows(stream, [(KIND_DROPPED, bytes(payload), now_ms)])
        self.flush_events()
        logger.warning(
            "journal %s over its %d-byte quota: dropped %d oldest %s event(s) from %d stream(s)",
            self.path,
            self.quota_bytes,
            total,
            label,
            len(spans),
        )

    def _persist_counters(self) -> None:
        self.counters["refused_metrics"] = self.refused_metrics
        changed = [(k, v) for k, v in self.counters.items() if self._persisted.get(k) != v]
        if changed:
            self.conn.executemany(_UPSERT_META, changed)

    def _persist_final(self) -> None:
        if self.refused_metrics == self._persisted.get("refused_metrics"):
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self._persist_counters()
            self.conn.execute("COMMIT")
            self._persisted.update(self.counters)
        except sqlite3.Error:
            logger.warning("journal %s: could not persist counters", self.path, exc_info=True)
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
