"""The outbox's single writer thread and the write operations it applies.

The thread is the agent journal's (:class:`edge_agent._sqlite.SqliteWriter`,
shared): callers on the event loop queue :class:`WriteOp` objects; the thread
takes up to ``max_batch_rows`` rows of them per transaction (group commit),
commits with ``synchronous=FULL`` and hands all results back to the loop in one
``call_soon_threadsafe``. A failed transaction is rolled back and its ops retried
one per transaction, so one bad write fails alone.

Counters are persisted in the same transaction as the write that caused them:
each op carries the increments the event loop decided (refusals, over-quota
stores) and adds its own (``appended``, ``deleted``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent._sqlite import SqliteWriter, WriterLink
from regional_relay._outbox_schema import ERRORS, OpenedOutbox

__all__ = [
    "AppendOp",
    "Completion",
    "CountersOp",
    "DeleteOp",
    "OutboxWriter",
    "PutStateOp",
    "WriteOp",
]

logger = logging.getLogger(__name__)

_INSERT_ITEM = "INSERT INTO items (id, device, kind, payload, size) VALUES (?, ?, ?, ?, ?)"
# Last writer wins, ordered as sync.crdt orders LWW entries: (ts, origin, counter).
_UPSERT_REPLICA = (
    "INSERT INTO replica (scope, key, ts, origin, counter, deleted, value) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
    "ts = excluded.ts, origin = excluded.origin, counter = excluded.counter, "
    "deleted = excluded.deleted, value = excluded.value "
    "WHERE (excluded.ts, excluded.origin, excluded.counter) > "
    "(replica.ts, replica.origin, replica.counter)"
)
_ADD_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)
_DELETE_CHUNK = 500

Completion = tuple["WriteOp", object, BaseException | None]


@dataclass(slots=True, eq=False)
class WriteOp:
    """One write call, applied by the writer thread inside a transaction.

    Attributes:
        future: resolved on the event loop after the COMMIT that included it.
        rows: weight for the queue bound and batch sizing.
        carried: counter increments decided on the loop, committed with the op.
        weight: quota bytes the op adds while in flight (appends).
    """

    future: asyncio.Future[Any]
    rows: int
    carried: dict[str, int] = field(default_factory=dict)
    weight: int = 0

    def apply(self, w: OutboxWriter) -> object:
        """Apply the op on the writer's connection, inside its transaction."""
        raise NotImplementedError


@dataclass(slots=True, eq=False)
class AppendOp(WriteOp):
    """Insert items ``(device, kind, payload, size)``; result: their ids."""

    items: Sequence[tuple[str, str, bytes, int]] = ()

    def apply(self, w: OutboxWriter) -> list[int]:
        first = w.next_id
        w.conn.executemany(
            _INSERT_ITEM,
            [(first + i, d, k, p, s) for i, (d, k, p, s) in enumerate(self.items)],
        )
        w.next_id = first + len(self.items)
        w.tx_counters["appended"] += len(self.items)
        return list(range(first, w.next_id))


@dataclass(slots=True, eq=False)
class DeleteOp(WriteOp):
    """Delete items by id; result: ``(rows deleted, payload bytes freed)``."""

    ids: Sequence[int] = ()

    def apply(self, w: OutboxWriter) -> tuple[int, int]:
        count = freed = 0
        for start in range(0, len(self.ids), _DELETE_CHUNK):
            chunk = self.ids[start : start + _DELETE_CHUNK]
            marks = ",".join("?" * len(chunk))
            for (size,) in w.conn.execute(
                f"DELETE FROM items WHERE id IN ({marks}) RETURNING size", chunk
            ):
                count += 1
                freed += int(size)
        w.tx_counters["deleted"] += count
        return count, freed


@dataclass(slots=True, eq=False)
class PutStateOp(WriteOp):
    """LWW-upsert replica rows ``(scope, key, ts, origin, counter, deleted, value)``;
    result: how many rows changed."""

    entries: Sequence[tuple[str, str, int, str, int, int, bytes]] = ()

    def apply(self, w: OutboxWriter) -> int:
        # rowcount sums sqlite3_changes(): an upsert whose WHERE is false counts 0.
        return max(w.conn.executemany(_UPSERT_REPLICA, self.entries).rowcount, 0)


@dataclass(slots=True, eq=False)
class CountersOp(WriteOp):
    """Only persist carried counters (refusals with nothing stored); result: None."""

    def apply(self, w: OutboxWriter) -> None:
        return None


class OutboxWriter(SqliteWriter[WriteOp]):
    """Owns the write connection and the thread that applies :class:`WriteOp`.

    ``next_id`` and ``tx_counters`` are touched only by the writer thread.
    """

    _errors = ERRORS
    _logger = logger

    def __init__(
        self,
        opened: OpenedOutbox,
        *,
        path: Path,
        max_batch_rows: int,
        link: WriterLink[WriteOp],
    ) -> None:
        """Prepare the writer; :meth:`start` launches its thread."""
        super().__init__(opened.conn, path=path, max_batch_rows=max_batch_rows, link=link)
        self.next_id = opened.next_id
        self.tx_counters: Counter[str] = Counter()

    def _apply(self, op: WriteOp) -> object:
        return op.apply(self)

    def _snapshot(self) -> object:
        self.tx_counters.clear()
        return self.next_id

    def _restore(self, snapshot: object) -> None:
        assert isinstance(snapshot, int)
        self.next_id = snapshot

    def _before_commit(self, batch: list[WriteOp]) -> None:
        # Counters commit with the writes that caused them.
        for op in batch:
            self.tx_counters.update(op.carried)
        changed = [(k, v) for k, v in self.tx_counters.items() if v]
        if changed:
            self.conn.executemany(_ADD_COUNTER, changed)
