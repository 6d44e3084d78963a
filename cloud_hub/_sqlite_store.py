"""The embedded :class:`cloud_hub.store.Store`: one SQLite file in WAL mode.

Threads, so that sqlite3 never blocks the event loop:

- **one writer thread** owning the one write connection: every write method is
  one ``BEGIN IMMEDIATE`` ... ``COMMIT`` there, in the order called. Callers
  wait (counted in :attr:`StoreStats.writes_waited`) while
  ``max_pending_writes`` writes are queued already, so the queue is bounded;
- **a small pool of reader threads** (``readers``, default 4), each with its own
  read-only connection: API reads run in their own read transaction (a
  consistent snapshot, WAL) and are never stuck behind ingest writes.

Schema, migrations and opening: :mod:`cloud_hub._sqlite_store_schema`; the
operations themselves (plain blocking functions): :mod:`cloud_hub._sqlite_store_ops`.

Page sizes outside ``1..MAX_PAGE_LIMIT`` raise :class:`ValueError` (callers
validate their input first); a cursor this store did not hand out for the same
listing raises :class:`~cloud_hub.store.CursorError`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Self, TypeVar

from cloud_hub import _sqlite_store_ops as ops
from cloud_hub._closing import AsyncClosing
from cloud_hub._sqlite_store_schema import CheckMode, connect, is_corruption, open_database
from cloud_hub.store import (
    DEFAULT_PAGE_LIMIT,
    AssignmentRecord,
    DeploymentRecord,
    DeviceQuery,
    DeviceRecord,
    DeviceStatus,
    DeviceStatusUpdate,
    EnrollTokenRecord,
    EventRecord,
    IngestCommit,
    Page,
    RolloutRecord,
    StoreError,
)

__all__ = ["DEFAULT_MAX_EVENTS_PER_STREAM", "SQLiteStore", "StoreStats", "open_sqlite_store"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS_PER_STREAM = 10_000

_T = TypeVar("_T")


@dataclass(slots=True)
class StoreStats:
    """Counters of one open store (for ``/metrics``).

    Attributes:
        write_transactions: write transactions committed.
        write_failures: write transactions rolled back (a refused redeem counts).
        writes_waited: writes that waited for room in the bounded write queue.
        events_stored: events inserted by :meth:`SQLiteStore.commit_ingest`.
        events_duplicate: events it ignored as stored already.
        events_pruned: old events deleted to keep each stream within
            ``max_events_per_stream``.
    """

    write_transactions: int = 0
    write_failures: int = 0
    writes_waited: int = 0
    events_stored: int = 0
    events_duplicate: int = 0
    events_pruned: int = 0


class SQLiteStore(AsyncClosing):
    """The embedded hub store (see the module docstring). Open it with
    :func:`open_sqlite_store`; close it with :meth:`aclose` or ``async with``.

    Every method is safe to call concurrently from one event loop.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        *,
        max_events_per_stream: int,
        readers: int,
        max_pending_writes: int,
    ) -> None:
        """Wrap an open, migrated write connection; use :func:`open_sqlite_store`."""
        self.path = path
        self.max_events_per_stream = max_events_per_stream
        self.stats = StoreStats()
        self._conn = conn
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-store-writer")
        self._readers = ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="hub-store-reader"
        )
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._max_pending_writes = max_pending_writes
        self._write_slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._shut = False

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Return the (already open) store."""
        self._check_open()
        return self

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` (or :meth:`close`) was called."""
        return self._closed

    async def aclose(self) -> None:
        """Let queued writes commit, then close the threads and connections; idempotent.

        Methods called afterwards raise :class:`StoreError`.
        """
        self._closed = True
        await asyncio.shield(asyncio.to_thread(self.close))

    def close(self) -> None:
        """Blocking :meth:`aclose`, for synchronous callers (not on the event loop)."""
        self._closed = True
        with self._lock:
            if self._shut:
                return
            self._shut = True
        # Not under the lock: a reader thread opening its connection takes it, and
        # shutdown waits for that thread (a deadlock seen in CI).
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            try:
                # Refresh the planner's statistics (label and status selectivity)
                # when they are stale; cheap when they are not.
                self._conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                logger.debug("hub store %s: PRAGMA optimize failed", self.path, exc_info=True)
            for conn in [self._conn, *self._reader_conns]:
                try:
                    conn.close()
                except sqlite3.Error:  # pragma: no cover - close does not fail in practice
                    logger.warning("hub store %s: error closing a connection", self.path)
            self._reader_conns.clear()
        logger.debug("hub store %s closed", self.path)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"hub store {self.path} is closed")

    # -- transactions ------------------------------------------------------------------

    def _error(self, what: str, exc: sqlite3.Error) -> StoreError:
        if is_corruption(exc):
            logger.error("hub store %s: database is corrupt: %s", self.path, exc)
            return StoreError(f"hub store {self.path}: database is corrupt ({exc})")
        return StoreError(f"hub store {self.path}: {what} failed: {exc}")

    def _slots(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._write_slots is None or self._slots_loop is not loop:
            self._write_slots = asyncio.Semaphore(self._max_pending_writes)
            self._slots_loop = loop
        return self._write_slots

    def _transaction(
        self,
        fn: Callable[[sqlite3.Connection], _T],
        on_commit: Callable[[_T], None] | None,
    ) -> _T:
        # On the writer thread: the only user of self._conn.
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.warning("hub store %s: rollback failed", self.path, exc_info=True)
            self.stats.write_failures += 1
            if isinstance(exc, sqlite3.Error):
                raise self._error("write", exc) from exc
            raise
        self.stats.write_transactions += 1
        if on_commit is not None:
            on_commit(result)
        return result

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], _T],
        on_commit: Callable[[_T], None] | None = None,
    ) -> _T:
        self._check_open()
        slots = self._slots()
        if slots.locked():
            self.stats.writes_waited += 1
        async with slots:
            self._check_open()
            loop = asyncio.get_running_loop()
            try:
                fut = loop.run_in_executor(self._writer, self._transaction, fn, on_commit)
            except RuntimeError as exc:  # the executor shut down meanwhile
                raise StoreError(f"hub store {self.path} is closed") from exc
            return await fut

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = connect(self.path, read_only=True)
            self._reader_local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    def _read_transaction(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            conn = self._reader()
            conn.execute("BEGIN")  # one snapshot for every statement of the read
            try:
                return fn(conn)
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise self._error("read", exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self._readers, self._read_transaction, fn)
        except RuntimeError as exc:
            raise StoreError(f"hub store {self.path} is closed") from exc
        return await fut

    # -- devices -----------------------------------------------------------------------

    async def get_device(self, device_id: str) -> DeviceRecord:
        """See :meth:`cloud_hub.store.Store.get_device`."""
        return await self._read(partial(ops.get_device, device_id=device_id))

    async def list_devices(self, query: DeviceQuery) -> Page[DeviceRecord]:
        """See :meth:`cloud_hub.store.Store.list_devices`."""
        return await self._read(partial(ops.list_devices, query=query))

    async def count_devices(self) -> dict[DeviceStatus, int]:
        """See :meth:`cloud_hub.store.Store.count_devices`."""
        return await self._read(ops.count_devices)

    async def set_device_labels(self, device_id: str, labels: Mapping[str, str]) -> DeviceRecord:
        """See :meth:`cloud_hub.store.Store.set_device_labels`."""
        return await self._write(partial(ops.set_device_labels, device_id=device_id, labels=labels))

    async def update_device_status(self, updates: Sequence[DeviceStatusUpdate]) -> None:
        """See :meth:`cloud_hub.store.Store.update_device_status` (last_seen never lowered)."""
        if updates:
            await self._write(partial(ops.update_device_status, updates=list(updates)))

    async def delete_device(self, device_id: str) -> DeviceRecord:
        """See :meth:`cloud_hub.store.Store.delete_device`.

        Its labels, events and stream cursors go too; assignments and scopes stay.
        """
        return await self._write(partial(ops.delete_device, device_id=device_id))

    async def add_devices(self, devices: Sequence[DeviceRecord]) -> None:
        """Insert devices as they are, in one transaction (benches, tests, imports).

        Not part of :class:`~cloud_hub.store.Store`: devices join through
        :meth:`redeem_enroll_token`.

        Raises:
            ConflictError: a duplicate device id or public key (nothing is stored).
        """
        await self._write(partial(ops.insert_devices, devices=list(devices)))

    # -- enrollment tokens -------------------------------------------------------------

    async def create_enroll_token(self, token: EnrollTokenRecord) -> EnrollTokenRecord:
        """See :meth:`cloud_hub.store.Store.create_enroll_token`."""
        return await self._write(partial(ops.create_enroll_token, token=token))

    async def get_enroll_token(self, token_id: str) -> EnrollTokenRecord:
        """See :meth:`cloud_hub.store.Store.get_enroll_token`."""
        return await self._read(partial(ops.get_enroll_token, token_id=token_id))

    async def list_enroll_tokens(
        self, *, cursor: str | None = None, limit: int = DEFAULT_PAGE_LIMIT
    ) -> Page[EnrollTokenRecord]:
        """See :meth:`cloud_hub.store.Store.list_enroll_tokens`."""
        return await self._read(partial(ops.list_enroll_tokens, cursor=cursor, limit=limit))

    async def revoke_enroll_token(self, token_id: str, now_ms: int) -> EnrollTokenRecord:
        """See :meth:`cloud_hub.store.Store.revoke_enroll_token`."""
        return await self._write(partial(ops.revoke_enroll_token, token_id=token_id, now_ms=now_ms))

    async def redeem_enroll_token(
        self,
        token_id: str,
        secret_hash: str,
        now_ms: int,
        make_device: Callable[[EnrollTokenRecord], DeviceRecord],
    ) -> DeviceRecord:
        """See :meth:`cloud_hub.store.Store.redeem_enroll_token`.

        The checks run in this order: unknown id or wrong secret, revoked,
        expired (``now_ms >= expires_at_ms``), spent, then ``make_device`` and
        the duplicate id / public key check. ``make_device`` runs on the
        writer thread.
        """
        return await self._write(
            partial(
                ops.redeem_enroll_token,
                token_id=token_id,
                secret_hash=secret_hash,
                now_ms=now_ms,
                make_device=make_device,
            )
        )

    # -- deployments, rollouts, placements --------------------------------------------

    async def put_deployment(
        self, name: str, document: Mapping[str, Any], actor: str, now_ms: int
    ) -> tuple[DeploymentRecord, bool]:
        """See :meth:`cloud_hub.store.Store.put_deployment` (compares canonical JSON)."""
        return await self._write(
            partial(ops.put_deployment, name=name, document=document, actor=actor, now_ms=now_ms)
        )

    async def get_deployment(self, name: str, version: int | None = None) -> DeploymentRecord:
        """See :meth:`cloud_hub.store.Store.get_deployment`.

        The latest version of a deleted deployment is its deleted record
        (``deleted`` true), not a :class:`~cloud_hub.store.NotFoundError`.
        """
        return await self._read(partial(ops.get_deployment, name=name, version=version))

    async def list_deployments(
        self,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_LIMIT,
        include_deleted: bool = False,
    ) -> Page[DeploymentRecord]:
        """See :meth:`cloud_hub.store.Store.list_deployments`."""
        return await self._read(
            partial(
                ops.list_deployments, cursor=cursor, limit=limit, include_deleted=include_deleted
            )
        )

    async def deployment_history(self, name: str) -> list[DeploymentRecord]:
        """See :meth:`cloud_hub.store.Store.deployment_history`."""
        return await self._read(partial(ops.deployment_history, name=name))

    async def delete_deployment(self, name: str, actor: str, now_ms: int) -> DeploymentRecord:
        """See :meth:`cloud_hub.store.Store.delete_deployment`.

        Deleting a deleted deployment raises :class:`~cloud_hub.store.NotFoundError`.
        """
        return await self._write(
            partial(ops.delete_deployment, name=name, actor=actor, now_ms=now_ms)
        )

    async def save_rollout(self, rollout: RolloutRecord) -> None:
        """See :meth:`cloud_hub.store.Store.save_rollout`."""
        await self._write(partial(ops.save_rollout, rollout=rollout))

    async def get_rollout(self, deployment: str) -> RolloutRecord:
        """See :meth:`cloud_hub.store.Store.get_rollout`."""
        return await self._read(partial(ops.get_rollout, deployment=deployment))

    async def list_rollouts(
        self,
        *,
        phase: str | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_LIMIT,
    ) -> Page[RolloutRecord]:
        """See :meth:`cloud_hub.store.Store.list_rollouts`."""
        return await self._read(partial(ops.list_rollouts, phase=phase, cursor=cursor, limit=limit))

    async def set_assignments(
        self, deployment: str, device_ids: Sequence[str], now_ms: int
    ) -> list[AssignmentRecord]:
        """See :meth:`cloud_hub.store.Store.set_assignments`."""
        return await self._write(
            partial(
                ops.set_assignments, deployment=deployment, device_ids=device_ids, now_ms=now_ms
            )
        )

    async def list_assignments(
        self, *, deployment: str | None = None, device_id: str | None = None
    ) -> list[AssignmentRecord]:
        """See :meth:`cloud_hub.store.Store.list_assignments`."""
        return await self._read(
            partial(ops.list_assignments, deployment=deployment, device_id=device_id)
        )

    # -- replicated state and events ---------------------------------------------------

    async def load_scopes(self) -> dict[str, bytes]:
        """See :meth:`cloud_hub.store.Store.load_scopes`."""
        return await self._read(ops.load_scopes)

    async def get_scope(self, scope: str) -> bytes | None:
        """See :meth:`cloud_hub.store.Store.get_scope`."""
        return await self._read(partial(ops.get_scope, scope=scope))

    async def save_scopes(self, scopes: Mapping[str, bytes]) -> None:
        """See :meth:`cloud_hub.store.Store.save_scopes`."""
        if scopes:
            await self._write(partial(ops.save_scopes, scopes=dict(scopes)))

    async def load_cursors(self) -> dict[tuple[str, str], int]:
        """See :meth:`cloud_hub.store.Store.load_cursors`."""
        return await self._read(ops.load_cursors)

    async def commit_ingest(self, commit: IngestCommit) -> None:
        """See :meth:`cloud_hub.store.Store.commit_ingest`.

        Then each stream written to is pruned to its newest
        ``max_events_per_stream`` events (counted in :attr:`stats`). Cursors,
        like last-seen times, only move forward. A body holding ``bytes`` is
        stored with them as base64 text; any other non-JSON body refuses the
        whole commit with :class:`StoreError`.
        """
        await self._write(
            partial(ops.commit_ingest, commit=commit, max_per_stream=self.max_events_per_stream),
            self._count_ingest,
        )

    def _count_ingest(self, counts: ops.IngestCounts) -> None:
        self.stats.events_stored += counts.stored
        self.stats.events_duplicate += counts.duplicate
        self.stats.events_pruned += counts.pruned

    async def list_events(
        self,
        device_id: str,
        *,
        stream: str | None = None,
        after_seq: int = 0,
        limit: int = DEFAULT_PAGE_LIMIT,
    ) -> list[EventRecord]:
        """See :meth:`cloud_hub.store.Store.list_events`."""
        return await self._read(
            partial(
                ops.list_events,
                device_id=device_id,
                stream=stream,
                after_seq=after_seq,
                limit=limit,
            )
        )


def open_sqlite_store(
    path: Path,
    *,
    max_events_per_stream: int = DEFAULT_MAX_EVENTS_PER_STREAM,
    readers: int = 4,
    max_pending_writes: int = 256,
    check: CheckMode = "quick",
) -> SQLiteStore:
    """Open (creating and migrating if needed) the hub store in one SQLite file.

    Blocking (it opens, checks and migrates the file): call it at start-up, or
    through ``asyncio.to_thread`` from a running loop.

    Args:
        path: the database file; its directory is created if missing.
        max_events_per_stream: events kept per (device, stream); older ones are
            pruned first.
        readers: reader threads (and connections) for concurrent reads.
        max_pending_writes: writes queued for the writer thread before callers wait.
        check: integrity check at open: ``quick`` (default), ``integrity`` or ``none``.

    Raises:
        ValueError: an option out of range.
        StoreError: the file cannot be opened, is not an SQLite database or is
            corrupt (it is left untouched), or its schema is newer than this code.
    """
    for name, value in (
        ("max_events_per_stream", max_events_per_stream),
        ("readers", readers),
        ("max_pending_writes", max_pending_writes),
    ):
        if type(value) is not int or value < 1:
            raise ValueError(f"hub store: {name} must be an int >= 1, not {value!r}")
    if check not in ("quick", "integrity", "none"):
        raise ValueError(f"hub store: check must be quick, integrity or none, not {check!r}")
    path = Path(path)
    conn = open_database(path, check=check)
    logger.info("hub store %s open", path)
    return SQLiteStore(
        path,
        conn,
        max_events_per_stream=max_events_per_stream,
        readers=readers,
        max_pending_writes=max_pending_writes,
    )
