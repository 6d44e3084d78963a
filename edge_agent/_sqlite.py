"""SQLite machinery shared by the agent's journal and the relay's outbox.

Shared with ``regional_relay`` (its ``_outbox*`` modules import from here): a
change here changes both stores, each one SQLite file behind an async front:

* **opening** (:func:`open_store`, blocking, run off the loop): header check,
  WAL, an integrity check chosen by :data:`CheckMode`, migrations
  (:class:`MigrationSet`, sqlite-utils imported only when one must run), and a
  corrupt file moved aside to ``<name>.corrupt-<UTC timestamp>`` (with its
  ``-wal`` and ``-shm``) and recreated empty rather than raised;
* **the writer thread** (:class:`SqliteWriter`): callers' ops are queued, taken
  up to ``max_batch_rows`` rows per transaction (group commit) and committed with
  ``synchronous=FULL``; results go back to the loop in one
  ``call_soon_threadsafe`` per transaction. A failed transaction is rolled back
  and its ops retried one per transaction, so one bad write fails alone;
* **the async front** (:class:`SqliteStore`): a write queue bounded in rows
  (callers wait for room), futures resolved only after the COMMIT that made
  their write durable, one reader thread with its own connection, and the
  closed/closing state.

What differs (tables, ops, errors, log messages, counters, quota) stays in each
store's modules, through the hooks documented on each class.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Generic,
    Literal,
    Protocol,
    Self,
    TypeVar,
    cast,
)

if TYPE_CHECKING:
    from sqlite_utils import Database, Migrations

__all__ = [
    "CheckMode",
    "Completion",
    "MigrationSet",
    "OpenedFile",
    "SqliteStore",
    "SqliteWriter",
    "StoreErrors",
    "WriteOpLike",
    "WriterLink",
    "connect",
    "open_store",
]

CheckMode = Literal["integrity", "quick", "none"]

_SQLITE_MAGIC = b"SQLite format 3\x00"
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_MIGRATIONS_TABLE: Final = "_sqlite_migrations"  # sqlite-utils' Migrations.migrations_table

_R = TypeVar("_R")
_T = TypeVar("_T")


# -- errors ------------------------------------------------------------------------------


class PathErrorType(Protocol):
    """The constructor shape of ``JournalError``/``OutboxError`` and their subclasses."""

    def __call__(self, message: str, *, path: str = "") -> Exception: ...


@dataclass(frozen=True, slots=True)
class StoreErrors:
    """How one store names itself and which of its exceptions to raise.

    Attributes:
        label: ``"journal"`` or ``"outbox"``, used in messages and thread names.
        base: the store's base error; errors of this class raised by an op are
            delivered to its caller as they are.
        closed: raised for use before start, after close, or while closing.
        write: wraps any other failure to apply or commit a write.
    """

    label: str
    base: type[Exception]
    closed: PathErrorType
    write: PathErrorType

    def error(self, message: str, path: Path) -> Exception:
        """Return an instance of :attr:`base`."""
        return cast(PathErrorType, self.base)(message, path=str(path))


# -- opening -----------------------------------------------------------------------------


class MigrationSet:
    """A named list of sqlite-utils migrations, applied without importing sqlite-utils
    when plain sqlite3 shows there is nothing to do (the usual start).

    sqlite-utils (with click, pluggy and dateutil under it, ~3.5 MB of RSS) is
    imported only by :meth:`migrations` and when :meth:`apply` has work to do.
    """

    def __init__(
        self, name: str, steps: tuple[tuple[str, Callable[[Database], None]], ...]
    ) -> None:
        """Name the set (as recorded in the database) and its ``(name, fn)`` steps, in order."""
        self.name = name
        self.steps = steps
        self._built: Migrations | None = None

    def migrations(self) -> Migrations:
        """The sqlite-utils ``Migrations`` object (built, and sqlite-utils imported, once)."""
        if self._built is None:
            from sqlite_utils import Migrations  # noqa: PLC0415 - only when a migration runs

            built = Migrations(self.name)
            for name, fn in self.steps:
                built(name=name)(fn)
            self._built = built
        return self._built

    def module_getattr(self, module: str) -> Callable[[str], object]:
        """Return a module ``__getattr__`` that builds ``MIGRATIONS`` on first use.

        So that importing the store's schema module does not import sqlite-utils.
        """

        def __getattr__(name: str) -> object:  # noqa: N807 - PEP 562 hook
            if name == "MIGRATIONS":
                return self.migrations()
            raise AttributeError(f"module {module!r} has no attribute {name!r}")

        return __getattr__

    def recorded(self, conn: sqlite3.Connection) -> list[str]:
        """Names of the applied migrations in the order applied, read with plain sqlite3.

        The same list as ``migrations().applied(db)``: empty when there is no table.
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
                (self.name,),
            )
        ]

    def apply(self, conn: sqlite3.Connection) -> None:
        """Run ``Migrations.apply``, unless plain sqlite3 shows it would do nothing.

        ``apply`` does nothing when the migrations table exists in its current
        shape and every migration is recorded.
        """
        if _migrations_table_current(conn) and not (
            {name for name, _fn in self.steps} - set(self.recorded(conn))
        ):
            return
        from sqlite_utils import Database  # noqa: PLC0415 - only when a migration runs

        self.migrations().apply(Database(conn, execute_plugins=False))


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


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """Open a connection with the stores' pragmas.

    Args:
        path: the SQLite file.
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


class _CorruptError(Exception):
    """The file is not a usable SQLite store (internal signal)."""


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


def _enable_wal(conn: sqlite3.Connection, path: Path, errors: StoreErrors) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise errors.error(f"cannot enable WAL (journal_mode={mode})", path)


def _open_checked(
    path: Path, check: CheckMode, migrations: MigrationSet, errors: StoreErrors
) -> sqlite3.Connection:
    _check_header(path)
    conn = connect(path)
    try:
        _enable_wal(conn, path, errors)
        _run_check(conn, check)
        migrations.apply(conn)
        # sqlite-utils leaves the legacy isolation level alone; the writer wants
        # explicit BEGIN/COMMIT only.
        conn.isolation_level = None
    except BaseException:
        conn.close()
        raise
    return conn


def _quarantine(path: Path) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.replace(Path(f"{target}{suffix}"))
    return target


def open_store(
    path: Path,
    *,
    check: CheckMode,
    migrations: MigrationSet,
    errors: StoreErrors,
    load: Callable[[sqlite3.Connection], _R],
    report_quarantine: Callable[[Path, str, Path], None],
    also_wrap: tuple[type[Exception], ...] = (),
) -> tuple[_R, Path | None]:
    """Open (creating, or replacing a corrupt file, see the module docstring); blocking.

    Args:
        path: the SQLite file.
        check: ``"integrity"``, ``"quick"`` or ``"none"``.
        migrations: the store's schema.
        errors: the store's error classes.
        load: reads what the store needs from the open, migrated write
            connection (closed if ``load`` raises).
        report_quarantine: logs ``(path, reason, moved-to path)`` its own way.
        also_wrap: other exceptions (besides SQLite's) to raise as ``errors.base``.

    Returns:
        What ``load`` returned and where a corrupt file was moved (or ``None``).

    Raises:
        Exception: ``errors.base``, when the file cannot be opened for a reason
            other than corruption (permissions, locked, missing directory...).
    """

    def attempt() -> _R:
        conn = _open_checked(path, check, migrations, errors)
        try:
            return load(conn)
        except BaseException:
            conn.close()
            raise

    def quarantine(reason: str) -> Path:
        target = _quarantine(path)
        report_quarantine(path, reason, target)
        return target

    wrapped: tuple[type[Exception], ...] = (sqlite3.Error, _CorruptError, *also_wrap)
    quarantined: Path | None = None
    try:
        try:
            result = attempt()
        except _CorruptError as exc:
            quarantined = quarantine(str(exc))
            result = attempt()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            quarantined = quarantine(str(exc))
            result = attempt()
    except wrapped as exc:
        raise errors.error(f"cannot open {errors.label}: {exc}", path) from exc
    return result, quarantined


# -- the writer thread -------------------------------------------------------------------


class WriteOpLike(Protocol):
    """What the writer and the front need of a write op."""

    @property
    def future(self) -> asyncio.Future[Any]:
        """Resolved on the event loop after the COMMIT that included the op."""

    @property
    def rows(self) -> int:
        """Weight of the op for the queue bound and batch sizing."""


_Op = TypeVar("_Op", bound=WriteOpLike)
Completion = tuple[_Op, object, BaseException | None]


@dataclass(frozen=True, slots=True)
class WriterLink(Generic[_Op]):
    """How a writer thread reports back to its store on the event loop.

    Attributes:
        loop: the store's event loop.
        on_complete: called on the loop with every completion of a transaction.
        on_stopped: called on the loop once the thread has exited.
    """

    loop: asyncio.AbstractEventLoop
    on_complete: Callable[[list[Completion[_Op]]], None]
    on_stopped: Callable[[], None]


class SqliteWriter(Generic[_Op]):
    """Owns the write connection and the thread that applies ops in group commits.

    Subclasses set :attr:`_errors` and :attr:`_logger` (their own, so log
    records keep their module's logger name), implement :meth:`_apply` and may
    override the transaction hooks :meth:`_snapshot`, :meth:`_restore`,
    :meth:`_before_commit`, :meth:`_after_commit` and :meth:`_finish`; all run
    on the writer thread.
    """

    _errors: ClassVar[StoreErrors]
    _logger: ClassVar[logging.Logger]

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        path: Path,
        max_batch_rows: int,
        link: WriterLink[_Op],
    ) -> None:
        """Prepare the writer; :meth:`start` launches its thread."""
        self.conn = conn
        self.path = path
        self.max_batch_rows = max_batch_rows
        self.transactions = 0
        self.committed_writes = 0
        self._loop = link.loop
        self._on_complete = link.on_complete
        self._on_stopped = link.on_stopped
        self._queue: deque[_Op] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = False
        self._thread = threading.Thread(
            target=self._run, name=f"{self._errors.label}-writer:{path.name}", daemon=True
        )

    # -- control (event-loop side) -------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def submit(self, op: _Op) -> None:
        """Queue an op; the caller enforces the queue bound.

        Raises:
            Exception: ``errors.closed``, the writer is stopping or stopped.
        """
        with self._cond:
            if self._stopping:
                raise self._errors.closed(f"{self._errors.label} is closing", path=str(self.path))
            self._queue.append(op)
            self._cond.notify()

    def stop(self) -> None:
        """Ask the thread to commit everything queued, then exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def pause(self) -> None:
        """Hold the thread before its next batch (tests: make batching observable)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        with self._cond:
            self._paused = False
            self._cond.notify()

    @property
    def alive(self) -> bool:
        """Whether the writer thread is running."""
        return self._thread.is_alive()

    # -- hooks (writer thread) -------------------------------------------------------

    def _apply(self, op: _Op) -> object:
        """Apply one op inside the open transaction and return its result."""
        raise NotImplementedError

    def _snapshot(self) -> object:
        """Save in-memory bookkeeping before a transaction (restored on rollback)."""
        return None

    def _restore(self, snapshot: object) -> None:
        """Undo in-memory bookkeeping after a rollback."""

    def _before_commit(self, batch: list[_Op]) -> None:
        """Last writes of the transaction, after every op applied (counters...)."""

    def _after_commit(self, batch: list[_Op]) -> None:
        """Bookkeeping once the transaction committed."""

    def _finish(self) -> None:
        """Last work once the queue is drained at stop, before the connection closes."""

    # -- thread ------------------------------------------------------------------------

    def _take(self) -> list[_Op] | None:
        with self._cond:
            while (not self._queue or self._paused) and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            while self._queue and rows + self._queue[0].rows <= self.max_batch_rows:
                op = self._queue.popleft()
                rows += op.rows
                batch.append(op)
            return batch

    def _run(self) -> None:
        label, log = self._errors.label, self._logger
        failure: BaseException | None = None
        try:
            while (batch := self._take()) is not None:
                self._commit(batch)
            self._finish()
        except BaseException as exc:  # a bug: never leave callers hanging
            failure = exc
            log.exception("%s writer for %s stopped on an unexpected error", label, self.path)
        finally:
            with self._cond:
                self._stopping = True
                leftover = list(self._queue)
                self._queue.clear()
            if leftover:
                err = self._errors.closed(f"{label} writer stopped", path=str(self.path))
                if failure is not None:
                    err.__cause__ = failure
                self._deliver([(op, None, err) for op in leftover])
            try:
                self.conn.close()
            except sqlite3.Error:
                log.warning("error closing %s %s", label, self.path, exc_info=True)
            self._call_loop(self._on_stopped)

    def _call_loop(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: nobody is left to tell
            self._logger.debug("event loop closed; dropping %s completion", self._errors.label)

    def _deliver(self, items: list[Completion[_Op]]) -> None:
        if items:
            self._call_loop(self._on_complete, items)

    def _commit(self, batch: list[_Op]) -> None:
        saved = self._snapshot()
        results: list[Completion[_Op]] = []
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            results.extend((op, self._apply(op), None) for op in batch)
            self._before_commit(batch)
            self.conn.execute("COMMIT")
        except Exception as exc:  # isolated and reported per op below
            label = self._errors.label
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._logger.warning("%s %s: rollback failed", label, self.path, exc_info=True)
            self._restore(saved)
            if len(batch) > 1:
                for op in batch:
                    self._commit([op])
                return
            if isinstance(exc, self._errors.base):
                err: Exception = exc
            else:
                err = self._errors.write(f"write failed: {exc}", path=str(self.path))
                err.__cause__ = exc
            self._logger.debug("%s %s: write failed: %s", label, self.path, exc)
            self._deliver([(batch[0], None, err)])
            return
        self.transactions += 1
        self.committed_writes += len(batch)
        self._after_commit(batch)
        self._deliver(results)


# -- the async front ---------------------------------------------------------------------


class OpenedFile(Protocol):
    """What an ``open_*_file`` function hands to the front."""

    @property
    def conn(self) -> sqlite3.Connection:
        """The write connection."""

    @property
    def quarantined_path(self) -> Path | None:
        """Where a corrupt file was moved at open, or ``None``."""


_Writer = TypeVar("_Writer", bound="SqliteWriter[Any]")
_Opened = TypeVar("_Opened", bound=OpenedFile)


class SqliteStore(Generic[_Op, _Writer]):
    """The event-loop side of a store: bounded write queue, reader thread, lifecycle.

    A write is an op handed to :meth:`_run`: it waits while the queue holds more
    than ``max_pending_rows`` rows (never when the queue is empty, so an op
    larger than the bound still goes through), is submitted to the writer and
    returns once the COMMIT that included it resolved its future. Writes already
    queued at close are committed; writes still waiting for room fail with
    ``errors.closed``.

    Subclasses call :meth:`_open_file` then :meth:`_launch` from their
    ``start``, :meth:`_close` from their ``aclose``, and may override the hooks
    :meth:`_on_queue_full`, :meth:`_pending_changed`, :meth:`_not_queued`,
    :meth:`_settle` and :meth:`_before_close` (all on the event loop).
    """

    def __init__(self, path: Path, *, errors: StoreErrors, max_pending_rows: int) -> None:
        """Set the state of an unopened store."""
        self._path = path
        self._errors = errors
        self._max_pending_rows = max_pending_rows
        self._writer: _Writer | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._pending_rows = 0
        self._space_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._closed = False
        self._quarantined: Path | None = None

    async def __aenter__(self) -> Self:
        """Open the file (off the loop) and start the writer and reader threads."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Flush and close, see :meth:`aclose`."""
        await self.aclose()

    async def start(self) -> None:
        """Open the file and start the threads (implemented by each store)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Commit every queued write, then close (implemented by each store)."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------

    async def _open_file(self, open_file: Callable[[], _Opened]) -> _Opened:
        """Run ``open_file`` off the loop and open the reader connection."""
        if self._writer is not None or self._closed:
            raise self._errors.error(f"{self._errors.label} already started", self._path)
        loop = asyncio.get_running_loop()
        opened = await asyncio.to_thread(open_file)
        executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{self._errors.label}-reader"
        )
        try:
            reader = await loop.run_in_executor(
                executor, lambda: connect(self._path, read_only=True)
            )
        except BaseException:
            executor.shutdown(wait=False)
            opened.conn.close()
            raise
        self._loop = loop
        self._stopped = loop.create_future()
        self._reader = reader
        self._read_executor = executor
        self._quarantined = opened.quarantined_path
        return opened

    def _launch(self, writer: _Writer) -> None:
        """Adopt and start the writer built on what :meth:`_open_file` returned."""
        self._writer = writer
        writer.start()

    @property
    def _link(self) -> WriterLink[_Op]:
        """What a writer built in ``start`` needs to report back to this store."""
        assert self._loop is not None
        return WriterLink(self._loop, self._complete, self._on_writer_stopped)

    async def _close(self) -> None:
        if self._closed or self._writer is None or self._stopped is None:
            self._closed = True
            return
        self._before_close()
        self._closing = True
        self._wake_space_waiters()
        self._writer.stop()
        await asyncio.shield(self._stopped)
        if not self._closed:
            self._closed = True
            if self._read_executor is not None and self._reader is not None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._read_executor, self._reader.close)
                self._read_executor.shutdown(wait=False)

    # -- hooks -----------------------------------------------------------------------

    def _on_queue_full(self, op: _Op) -> None:
        """Called before ``op`` waits for room; raise to refuse it instead."""

    def _pending_changed(self, op: _Op, sign: int) -> None:
        """``op`` entered (``sign`` 1) or left (-1) the pending queue."""

    def _not_queued(self, op: _Op) -> None:
        """``op`` will never reach the writer (cancelled, closed or refused at submit)."""

    def _settle(self, op: _Op, outcome: object, exc: BaseException | None) -> object:
        """Account for a completed op; return the result its caller gets."""
        return outcome

    def _before_close(self) -> None:
        """Last submissions before the writer is told to stop."""

    # -- writes and reads ------------------------------------------------------------

    def _check_open(self) -> _Writer:
        if self._writer is None or self._closing:
            label = self._errors.label
            raise self._errors.closed(
                f"{label} is closed" if self._closing else f"{label} not started",
                path=str(self._path),
            )
        return self._writer

    def _new_future(self) -> asyncio.Future[Any]:
        self._check_open()
        assert self._loop is not None
        return self._loop.create_future()

    async def _run(self, op: _Op) -> object:
        writer = self._check_open()
        while self._pending_rows > 0 and self._pending_rows + op.rows > self._max_pending_rows:
            self._on_queue_full(op)
            waiter: asyncio.Future[None] = op.future.get_loop().create_future()
            self._space_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._not_queued(op)
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
            try:
                writer = self._check_open()
            except BaseException:
                self._not_queued(op)
                raise
        self._pending_rows += op.rows
        self._pending_changed(op, 1)
        try:
            writer.submit(op)
        except BaseException:
            self._pending_rows -= op.rows
            self._pending_changed(op, -1)
            self._not_queued(op)
            raise
        return await op.future

    def _complete(self, items: list[Completion[_Op]]) -> None:
        for op, outcome, exc in items:
            self._pending_rows -= op.rows
            self._pending_changed(op, -1)
            result = self._settle(op, outcome, exc)
            fut = op.future
            if fut.done():  # the caller was cancelled; the write still happened
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        self._wake_space_waiters()

    def _wake_space_waiters(self) -> None:
        waiters, self._space_waiters = self._space_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _on_writer_stopped(self) -> None:
        self._closing = True
        self._wake_space_waiters()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._check_open()
        reader, executor = self._reader, self._read_executor
        assert reader is not None and executor is not None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, fn, reader)
        except sqlite3.Error as exc:
            raise self._errors.error(f"read failed: {exc}", self._path) from exc
