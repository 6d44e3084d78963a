"""The outbox's single writer thread and the write operations it applies.

Same pattern as the agent journal's writer (``edge_agent._journal_writer``):
callers on the event loop queue :class:`WriteOp` objects; the thread takes up to
``max_batch_rows`` rows of them per transaction (group commit), commits with
``synchronous=FULL`` and hands all results back to the loop in one
``call_soon_threadsafe``. A failed transaction is rolled back and its ops retried
one per transaction, so one bad write fails alone.

Counters are persisted in the same transaction as the write that caused them:
each op carries the increments the event loop decided (refusals, over-quota
stores) and adds its own (``appended``, ``deleted``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regional_relay._exceptions import OutboxClosedError, OutboxError, OutboxWriteError
from regional_relay._outbox_schema import OpenedOutbox

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


class OutboxWriter:
    """Owns the write connection and the thread that applies :class:`WriteOp`.

    ``next_id`` and ``tx_counters`` are touched only by the writer thread.
    """

    def __init__(
        self,
        opened: OpenedOutbox,
        *,
        path: Path,
        max_batch_rows: int,
        loop: asyncio.AbstractEventLoop,
        on_complete: Callable[[list[Completion]], None],
        on_stopped: Callable[[], None],
    ) -> None:
        """Prepare the writer; :meth:`start` launches its thread."""
        self.conn = opened.conn
        self.path = path
        self.next_id = opened.next_id
        self.tx_counters: Counter[str] = Counter()
        self.transactions = 0
        self._max_batch_rows = max_batch_rows
        self._loop = loop
        self._on_complete = on_complete
        self._on_stopped = on_stopped
        self._queue: deque[WriteOp] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"outbox-writer:{path.name}", daemon=True
        )

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def submit(self, op: WriteOp) -> None:
        """Queue an op; the caller enforces the queue bound.

        Raises:
            OutboxClosedError: the writer is stopping or stopped.
        """
        with self._cond:
            if self._stopping:
                raise OutboxClosedError("outbox is closing", path=str(self.path))
            self._queue.append(op)
            self._cond.notify()

    def stop(self) -> None:
        """Ask the thread to commit everything queued, then exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _take(self) -> list[WriteOp] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            while self._queue and rows + self._queue[0].rows <= self._max_batch_rows:
                op = self._queue.popleft()
                rows += op.rows
                batch.append(op)
            return batch

    def _run(self) -> None:
        failure: BaseException | None = None
        try:
            while (batch := self._take()) is not None:
                self._commit(batch)
        except BaseException as exc:  # a bug: never leave callers hanging
            failure = exc
            logger.exception("outbox writer for %s stopped on an unexpected error", self.path)
        finally:
            with self._cond:
                self._stopping = True
                leftover = list(self._queue)
                self._queue.clear()
            if leftover:
                err = OutboxClosedError("outbox writer stopped", path=str(self.path))
                err.__cause__ = failure
                self._deliver([(op, None, err) for op in leftover])
            try:
                self.conn.close()
            except sqlite3.Error:
                logger.warning("error closing outbox %s", self.path, exc_info=True)
            self._call_loop(self._on_stopped)

    def _call_loop(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: nobody is left to tell
            logger.debug("event loop closed; dropping outbox completion")

    def _deliver(self, items: list[Completion]) -> None:
        if items:
            self._call_loop(self._on_complete, items)

    def _commit(self, batch: list[WriteOp]) -> None:
        saved_next_id = self.next_id
        self.tx_counters.clear()
        results: list[Completion] = []
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            results.extend((op, op.apply(self), None) for op in batch)
            for op in batch:
                self.tx_counters.update(op.carried)
            changed = [(k, v) for k, v in self.tx_counters.items() if v]
            if changed:
                self.conn.executemany(_ADD_COUNTER, changed)
            self.conn.execute("COMMIT")
        except Exception as exc:  # isolated and reported per op below
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.warning("outbox %s: rollback failed", self.path, exc_info=True)
            self.next_id = saved_next_id
            if len(batch) > 1:
                for op in batch:
                    self._commit([op])
                return
            if isinstance(exc, OutboxError):
                err: OutboxError = exc
            else:
                err = OutboxWriteError(f"write failed: {exc}", path=str(self.path))
                err.__cause__ = exc
            logger.debug("outbox %s: write failed: %s", self.path, exc)
            self._deliver([(batch[0], None, err)])
            return
        self.transactions += 1
        self._deliver(results)
