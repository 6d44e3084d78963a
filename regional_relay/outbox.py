"""The relay's durable store-and-forward outbox: one SQLite file.

What it holds:

* **items** — every verified uplink the relay accepted: a device's signed
  envelope, forwarded verbatim (``payload``), with its ``device``, its ``kind``
  (``delta``, ``event``, ``metric``, ``presence`` or ``agg``) and a monotonic
  ``id`` (never reused). The relay acknowledges an agent only once
  :meth:`Outbox.append` has returned, batches with :meth:`Outbox.oldest` and
  deletes with :meth:`Outbox.delete` only on the hub's application-level ACK.
* **replica** — the relay's copy of its region's device scopes, as LWW wire
  entries ``[key, ts, origin, counter, deleted, value]`` keyed by
  ``(scope, key)``, so agents sync desired state while the hub is away.
* **counters** — persisted figures (``appended``, ``deleted``,
  ``refused_metrics``, ``refused_other``, ``over_quota_deltas``,
  ``over_quota_other``), readable with :meth:`Outbox.stats` for the hub's
  ``/metrics``.

Concurrency, as in the agent's journal and through the same code
(:mod:`edge_agent._sqlite`): one writer thread commits in groups with
``synchronous=FULL`` (each write call returns after the COMMIT that made it
durable); reads run on one reader thread with its own connection; the event loop
never runs SQLite. The write queue is bounded (``max_pending_rows``): a write
waits for room.

Quota and overflow policy (``quota_bytes``; each item counts its payload plus
:data:`~regional_relay._outbox_schema.ROW_OVERHEAD` bytes, in flight included).
Nothing stored is ever evicted. Once the outbox is at its quota, each new item is
judged by the policy:

* ``refuse-metrics`` (default): ``metric`` and ``agg`` items are refused
  (``refused_metrics``); ``delta`` items are stored (``over_quota_deltas``) and
  so are ``event`` and ``presence`` items (``over_quota_other``).
* ``deltas-only``: only ``delta`` items are stored (``over_quota_deltas``);
  everything else is refused (``refused_metrics`` for metric/agg,
  ``refused_other`` for the rest).

A refusal raises :class:`OutboxFullError` after the rest of the call is stored;
the relay then does not acknowledge the refused items, so their agents keep them
and send them again later. Refusal counters with no stored item to ride on are
persisted with the next write or at close.

Example::

    async with Outbox.open(path, quota_bytes=512 << 20) as outbox:
        ids = await outbox.append([ItemIn("gw-1", "delta", envelope_bytes)])
        batch = await outbox.oldest(500, 200 * 1024)
        await outbox.delete([item.id for item in batch])
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Self, cast

from edge_agent._sqlite import SqliteStore
from regional_relay._exceptions import (
    OutboxClosedError,
    OutboxError,
    OutboxFullError,
    OutboxWriteError,
)
from regional_relay._outbox_schema import (
    ERRORS,
    ROW_OVERHEAD,
    CheckMode,
    OpenedOutbox,
    open_outbox_file,
)
from regional_relay._outbox_writer import (
    AppendOp,
    CountersOp,
    DeleteOp,
    OutboxWriter,
    PutStateOp,
    WriteOp,
)
from regional_relay.config import OverflowPolicy, RelayConfig
from sync.crdt import validate_entries
from sync.envelope import packb, unpackb_strict

__all__ = [
    "ITEM_KINDS",
    "ItemIn",
    "ItemKind",
    "Outbox",
    "OutboxClosedError",
    "OutboxError",
    "OutboxFullError",
    "OutboxItem",
    "OutboxStats",
    "OutboxWriteError",
]

ItemKind = Literal["delta", "event", "metric", "presence", "agg"]
ITEM_KINDS: Final[frozenset[str]] = frozenset({"delta", "event", "metric", "presence", "agg"})
_METRIC_KINDS: Final = frozenset({"metric", "agg"})
_POLICIES: Final = frozenset({"refuse-metrics", "deltas-only"})
_COUNTERS: Final = (
    "appended",
    "deleted",
    "refused_metrics",
    "refused_other",
    "over_quota_deltas",
    "over_quota_other",
)
_MAX_NAME: Final = 255


@dataclass(frozen=True, slots=True)
class ItemIn:
    """An item to append; the outbox assigns its id.

    Attributes:
        device: the device the envelope came from.
        kind: what it carries; decides the overflow policy's verdict.
        payload: the device's signed envelope, stored and forwarded verbatim.
    """

    device: str
    kind: ItemKind
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """An item read back from the outbox.

    Attributes:
        id: monotonic, never reused.
        device: the device the envelope came from.
        kind: ``delta``, ``event``, ``metric``, ``presence`` or ``agg``.
        payload: the envelope bytes.
        size: ``len(payload)``.
    """

    id: int
    device: str
    kind: str
    payload: bytes
    size: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """The outbox's figures (:meth:`Outbox.stats`); counters are lifetime totals.

    Attributes:
        depth: items held (committed).
        bytes: payload bytes held (committed).
        quota_bytes: the quota.
        pending_rows: rows queued for the writer.
        appended: items ever stored.
        deleted: items ever deleted (hub ACKs).
        refused_metrics: metric/agg items refused at quota.
        refused_other: other items refused at quota (``deltas-only``).
        over_quota_deltas: deltas stored while at quota.
        over_quota_other: events/presence stored while at quota.
        transactions: write transactions since open.
    """

    depth: int
    bytes: int
    quota_bytes: int
    pending_rows: int
    appended: int
    deleted: int
    refused_metrics: int
    refused_other: int
    over_quota_deltas: int
    over_quota_other: int
    transactions: int


class Outbox(SqliteStore[WriteOp, OutboxWriter]):
    """The relay's durable outbox (an async context manager).

    Create with :meth:`open` (or :meth:`for_config`) and enter with
    ``async with``; leaving the block (or :meth:`aclose`) commits every queued
    write, then stops the threads.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        quota_bytes: int,
        policy: OverflowPolicy = "refuse-metrics",
        check: CheckMode = "integrity",
        max_batch_rows: int = 4096,
        max_pending_rows: int = 32768,
    ) -> None:
        """Configure an outbox; nothing touches the disk until it is entered.

        Args:
            path: the SQLite file (created, with its directory, if missing).
            quota_bytes: size quota; see the module docstring.
            policy: overflow policy at quota.
            check: integrity check at open: ``"integrity"``, ``"quick"``, ``"none"``.
            max_batch_rows: most rows committed in one transaction.
            max_pending_rows: bound of the write queue, in rows (an item, an id
                to delete or a replica entry each count one).

        Raises:
            OutboxError: an argument is out of range.
        """
        if quota_bytes <= 0 or max_batch_rows <= 0 or max_pending_rows <= 0:
            raise OutboxError("quota_bytes, max_batch_rows and max_pending_rows must be > 0")
        if policy not in _POLICIES:
            raise OutboxError(f"unknown overflow policy {policy!r}")
        super().__init__(Path(path), errors=ERRORS, max_pending_rows=max_pending_rows)
        self._quota_bytes = quota_bytes
        self._policy: OverflowPolicy = policy
        self._check: CheckMode = check
        self._max_batch_rows = max_batch_rows
        self._pending_bytes = 0
        self._depth = 0
        self._bytes = 0
        self._counters: Counter[str] = Counter()
        self._unflushed: Counter[str] = Counter()

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        quota_bytes: int,
        policy: OverflowPolicy = "refuse-metrics",
        check: CheckMode = "integrity",
        max_batch_rows: int = 4096,
        max_pending_rows: int = 32768,
    ) -> Self:
        """Return an unopened outbox for ``async with Outbox.open(...) as o``.

        See :meth:`__init__` for the arguments.
        """
        return cls(
            path,
            quota_bytes=quota_bytes,
            policy=policy,
            check=check,
            max_batch_rows=max_batch_rows,
            max_pending_rows=max_pending_rows,
        )

    @classmethod
    def for_config(cls, config: RelayConfig) -> Self:
        """Return an unopened outbox at ``config.outbox_path`` with its settings."""
        return cls(
            config.outbox_path,
            quota_bytes=config.outbox.quota_bytes,
            policy=config.outbox.overflow,
            check=config.outbox.integrity_check,
        )

    async def start(self) -> None:
        """Open the file, run the integrity check and migrations, start the threads.

        A corrupt file is quarantined (see :attr:`quarantined_path`), not raised.

        Raises:
            OutboxError: already started, or the file cannot be opened for a
                reason other than corruption.
        """

        def open_file() -> OpenedOutbox:
            try:
                self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise OutboxError(f"cannot create directory: {exc}", path=str(self._path)) from exc
            return open_outbox_file(self._path, check=self._check)

        opened = await self._open_file(open_file)
        self._depth, self._bytes = opened.depth, opened.bytes
        self._counters = Counter({k: opened.counters.get(k, 0) for k in _COUNTERS})
        self._launch(
            OutboxWriter(
                opened,
                path=self._path,
                max_batch_rows=self._max_batch_rows,
                link=self._link,
            )
        )

    async def aclose(self) -> None:
        """Commit every queued write (and unflushed counters), then close. Idempotent.

        Writes still waiting for queue room fail with :class:`OutboxClosedError`;
        writes already queued are committed and their callers see success.
        """
        await self._close()

    # -- properties ------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The outbox file."""
        return self._path

    @property
    def quarantined_path(self) -> Path | None:
        """Where a corrupt outbox was moved at open, or ``None``."""
        return self._quarantined

    @property
    def policy(self) -> OverflowPolicy:
        """The overflow policy."""
        return self._policy

    def stats(self) -> OutboxStats:
        """Return the outbox's figures (no I/O).

        Raises:
            OutboxClosedError: the outbox was never started.
        """
        w = self._writer
        if w is None:
            raise OutboxClosedError("outbox not started", path=str(self._path))
        c = self._counters
        return OutboxStats(
            depth=self._depth,
            bytes=self._bytes,
            quota_bytes=self._quota_bytes,
            pending_rows=self._pending_rows,
            appended=c["appended"],
            deleted=c["deleted"],
            refused_metrics=c["refused_metrics"],
            refused_other=c["refused_other"],
            over_quota_deltas=c["over_quota_deltas"],
            over_quota_other=c["over_quota_other"],
            transactions=w.transactions,
        )

    # -- writes ----------------------------------------------------------------------

    async def append(self, items: Sequence[ItemIn]) -> list[int]:
        """Store items and wait until they are durable.

        If the caller is cancelled while waiting, the write may still commit.

        Args:
            items: the items, in order.

        Returns:
            Their ids, in order (increasing).

        Raises:
            OutboxFullError: the policy refused some items at quota; the others
                are stored and durable (:attr:`OutboxFullError.ids`).
            OutboxClosedError: the outbox is not open or is closing.
            OutboxWriteError: SQLite failed to commit.
            OutboxError: an invalid device, kind or payload.
        """
        self._check_open()
        for item in items:
            _check_name("device", item.device)
            if item.kind not in ITEM_KINDS:
                raise OutboxError(f"invalid item kind {item.kind!r}")
            if type(item.payload) is not bytes:
                raise OutboxError(f"payload must be bytes, not {type(item.payload).__name__}")
        if not items:
            return []
        decisions: Counter[str] = Counter()
        ids: list[int | None] = [None] * len(items)
        stored: list[int] = []
        rows: list[tuple[str, str, bytes, int]] = []
        used = self._used_bytes()
        weight = 0
        for index, item in enumerate(items):
            if used + weight >= self._quota_bytes:
                verdict = self._over_quota(item.kind)
                decisions[verdict] += 1
                if verdict.startswith("refused"):
                    continue
            stored.append(index)
            size = len(item.payload)
            rows.append((item.device, item.kind, item.payload, size))
            weight += size + ROW_OVERHEAD
        self._counters.update(decisions)
        if not rows:
            self._unflushed.update(decisions)
            raise self._full(ids)
        carried = self._take_unflushed()
        carried.update(decisions)
        op = AppendOp(self._new_future(), len(rows), carried, weight, rows)
        new_ids = cast(list[int], await self._run(op))
        for index, new_id in zip(stored, new_ids, strict=True):
            ids[index] = new_id
        if len(new_ids) != len(items):
            raise self._full(ids)
        return new_ids

    async def delete(self, ids: Iterable[int]) -> int:
        """Delete items by id (on the hub's ACK); unknown ids are ignored.

        Returns:
            How many items were deleted.
        """
        id_list = [int(i) for i in ids]
        self._check_open()
        if not id_list:
            return 0
        op = DeleteOp(self._new_future(), len(id_list), self._take_unflushed(), 0, id_list)
        return cast(int, await self._run(op))

    async def put_state(self, scope: str, entries: Sequence[Sequence[Any]]) -> int:
        """Merge LWW wire entries into the replica of ``scope``, durably.

        An entry replaces the stored one of its key only if it is newer by
        ``(ts, origin, counter)``, the order of :mod:`sync.crdt`, so replays and
        reordered puts are harmless.

        Args:
            scope: e.g. ``"device/gw-0001"``.
            entries: ``[key, ts, origin, counter, deleted, value]`` each; ``value``
                any msgpack-able value (``None`` for a tombstone).

        Returns:
            How many keys changed.

        Raises:
            CrdtError: an entry is not a valid LWW wire entry.
            OutboxError: an invalid scope.
        """
        _check_name("scope", scope)
        checked = validate_entries([list(e) for e in entries])
        if not checked:
            return 0
        rows = [
            (scope, key, ts, origin, counter, int(deleted), packb(value))
            for key, ts, origin, counter, deleted, value in checked
        ]
        op = PutStateOp(self._new_future(), len(rows), self._take_unflushed(), 0, rows)
        return cast(int, await self._run(op))

    # -- reads -----------------------------------------------------------------------

    async def oldest(self, max_items: int, max_bytes: int, after_id: int = 0) -> list[OutboxItem]:
        """Return the oldest items with ``id > after_id``, for one batch.

        Args:
            max_items: at most this many items.
            max_bytes: at most this many payload bytes in total, except that the
                first item is returned even if it alone is larger.
            after_id: skip items up to this id (those already in flight).

        Returns:
            Items ordered by id; empty when none is left.
        """
        if max_items <= 0:
            return []

        def query(conn: sqlite3.Connection) -> list[OutboxItem]:
            out: list[OutboxItem] = []
            total = 0
            cur = conn.execute(
                "SELECT id, device, kind, payload, size FROM items WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after_id, max_items),
            )
            try:
                for id_, device, kind, payload, size in cur:  # rows are read lazily
                    if out and total + size > max_bytes:
                        break
                    out.append(OutboxItem(int(id_), device, kind, bytes(payload), int(size)))
                    total += size
            finally:
                cur.close()
            return out

        return await self._read(query)

    async def read_state(self, scope: str) -> list[list[Any]]:
        """Return the replica of ``scope`` as LWW wire entries, ordered by key.

        Tombstones are included (``deleted`` true, ``value`` ``None``).
        """
        rows = await self._read(
            lambda c: c.execute(
                "SELECT key, ts, origin, counter, deleted, value FROM replica "
                "WHERE scope = ? ORDER BY key",
                (scope,),
            ).fetchall()
        )
        return [
            [key, int(ts), origin, int(counter), bool(deleted), unpackb_strict(bytes(value))]
            for key, ts, origin, counter, deleted, value in rows
        ]

    async def scopes(self) -> list[str]:
        """Return every scope the replica holds, sorted."""
        rows = await self._read(
            lambda c: c.execute("SELECT DISTINCT scope FROM replica ORDER BY scope").fetchall()
        )
        return [str(r[0]) for r in rows]

    # -- internals -------------------------------------------------------------------

    def _used_bytes(self) -> int:
        return self._bytes + self._depth * ROW_OVERHEAD + self._pending_bytes

    def _over_quota(self, kind: str) -> str:
        if kind == "delta":
            return "over_quota_deltas"
        if kind in _METRIC_KINDS:
            return "refused_metrics"
        return "refused_other" if self._policy == "deltas-only" else "over_quota_other"

    def _full(self, ids: list[int | None]) -> OutboxFullError:
        return OutboxFullError(
            ids=ids,
            stored_bytes=self._used_bytes(),
            quota_bytes=self._quota_bytes,
            policy=self._policy,
            path=str(self._path),
        )

    def _take_unflushed(self) -> dict[str, int]:
        carried, self._unflushed = dict(self._unflushed), Counter()
        return carried

    # -- hooks of the shared front (edge_agent._sqlite.SqliteStore) -----------------

    def _pending_changed(self, op: WriteOp, sign: int) -> None:
        self._pending_bytes += sign * op.weight

    def _not_queued(self, op: WriteOp) -> None:
        self._unflushed.update(op.carried)  # persist them with a later write

    def _settle(self, op: WriteOp, outcome: object, exc: BaseException | None) -> object:
        if exc is not None:
            self._unflushed.update(op.carried)  # persist them with a later write
        elif isinstance(op, AppendOp):
            self._depth += len(op.items)
            self._bytes += sum(row[3] for row in op.items)
            self._counters["appended"] += len(op.items)
        elif isinstance(op, DeleteOp):
            count, freed = cast(tuple[int, int], outcome)
            self._depth -= count
            self._bytes -= freed
            self._counters["deleted"] += count
            return count
        return outcome

    def _before_close(self) -> None:
        # Refusal counters with no stored item to ride on are committed at close.
        if self._unflushed and not self._closing:
            writer = self._check_open()
            op = CountersOp(self._new_future(), 1, self._take_unflushed())
            self._pending_rows += 1
            writer.submit(op)


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise OutboxError(f"{what} must be a non-empty string of at most {_MAX_NAME} chars")
