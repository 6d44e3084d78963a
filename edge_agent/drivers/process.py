"""The ``process`` driver: workloads as supervised child processes.

Each workload is one child started with :func:`asyncio.create_subprocess_exec` in a
new session (so it leads its own process group), with stdin from ``/dev/null`` and
stdout and stderr merged into one pipe. A pump task copies the pipe into a bounded,
rotated log file (``<logs_dir>/<name>.log`` plus ``.1`` … ``.N``); a watcher task
records the exit status. Both live in the driver's task group.

Stopping sends SIGTERM to the whole process group, waits ``stop_grace_s``, then sends
SIGKILL; when the leader has exited, what is left of its group is killed too, so a
workload never leaks grandchildren.

Agent restarts: children are not adopted. Each running child has a pid file
(``<run_dir>/<name>.pid`` holding its pid and kernel start time); when the driver
starts, it kills the process groups of any pid files left by a previous agent (after
checking that the pid still belongs to the same process) and the supervisor then
starts the workloads again from the journal. The driver keeps no other state across
restarts; a workload it does not know is ``missing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from edge_agent.drivers._exceptions import (
    DriverError,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from edge_agent.drivers._logs import RotatingLogWriter, log_files, read_tail
from edge_agent.drivers.base import (
    ActualPhase,
    ActualState,
    DriverBase,
    DriverCapability,
    WorkloadHandle,
)
from sync.models import WorkloadSpec

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_READ_CHUNK = 65_536


@dataclass(eq=False)
class _Entry:
    """What the driver knows about one workload."""

    spec: WorkloadSpec
    process: asyncio.subprocess.Process | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str = ""
    failed: bool = False
    stopping: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.process is not None and not self.exited.is_set()


class ProcessDriver(DriverBase):
    """Runs workloads as supervised subprocesses.

    Use as an async context manager (it owns a task group)::

        async with ProcessDriver("agent-1", logs_dir=path) as driver:
            await driver.apply(spec)

    Args:
        owner: the agent id (kept for symmetry with the other drivers; every process
            this driver started is its own).
        logs_dir: directory for log files (created if missing).
        run_dir: directory for pid files; defaults to ``logs_dir``.
        log_max_bytes: size cap of one log file.
        log_backups: rotated log files kept per workload.
        stop_grace_s: time between SIGTERM and SIGKILL.
        base_env: environment every workload starts from (``spec.env`` overrides it);
            defaults to a standard ``PATH`` only, so the agent's own environment
            (and any secret in it) does not leak into workloads.
    """

    def __init__(
        self,
        owner: str,
        logs_dir: Path,
        *,
        run_dir: Path | None = None,
        log_max_bytes: int = 1_048_576,
        log_backups: int = 3,
        stop_grace_s: float = 10.0,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if log_max_bytes < 1 or log_backups < 0:
            raise ValueError("log_max_bytes must be >= 1 and log_backups >= 0")
        self.owner = owner
        self.logs_dir = logs_dir
        self.run_dir = run_dir if run_dir is not None else logs_dir
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self.stop_grace_s = stop_grace_s
        self.base_env = dict(base_env) if base_env is not None else {"PATH": DEFAULT_PATH}
        self._entries: dict[str, _Entry] = {}
        self._stack: AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._closed = False
        self.on_exit: Callable[[str], None] | None = None
        """Called with the workload name when a child exits (the supervisor's
        wake-up: a crash is handled at once, not at the next reconcile tick)."""

    @property
    def name(self) -> str:
        """The driver name, ``"process"``."""
        return "process"

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._prepare_dirs)
        stack = AsyncExitStack()
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every running workload (SIGTERM, grace, SIGKILL) and end the tasks."""
        if self._closed:
            return
        self._closed = True
        running = [name for name, entry in self._entries.items() if entry.running]
        try:
            async with asyncio.TaskGroup() as tg:
                for name in running:
                    tg.create_task(self._stop_entry(name), name=f"process-driver:close:{name}")
        finally:
            if self._stack is not None:
                stack, self._stack, self._tg = self._stack, None, None
                await stack.aclose()

    async def probe(self) -> DriverCapability:
        """The process driver is available wherever the agent runs."""
        return DriverCapability(available=True, reason="subprocesses")

    async def apply(self, spec: WorkloadSpec) -> WorkloadHandle:
        """Start ``spec``, or replace the running one when its version differs.

        Raises:
            WorkloadStartError: the command could not be executed.
            DriverError: the driver is not entered or is closed.
        """
        async with self._lock(spec.name):
            entry = self._entries.get(spec.name)
            if entry is not None and entry.spec.version == spec.version and not entry.failed:
                if not entry.running:
                    await self._spawn(entry)
                return self._handle(entry, created=False)
            if entry is not None:
                if entry.spec.version != spec.version:
                    logger.info(
                        "replacing process workload %s: version %s -> %s",
                        spec.name,
                        entry.spec.version,
                        spec.version,
                    )
                await self._stop_entry(spec.name)
            entry = _Entry(spec=spec)
            self._entries[spec.name] = entry
            await self._spawn(entry)
            return self._handle(entry, created=True)

    async def stop(self, name: str) -> None:
        """Stop a workload's process group: SIGTERM, grace period, SIGKILL.

        Raises:
            WorkloadNotFoundError: the driver does not know the workload.
        """
        async with self._lock(name):
            self._require(name)
            await self._stop_entry(name)

    async def start(self, name: str) -> None:
        """Start a known, stopped workload again with its current spec.

        Raises:
            WorkloadNotFoundError: the driver does not know the workload.
            WorkloadStartError: the command could not be executed.
        """
        async with self._lock(name):
            entry = self._require(name)
            if not entry.running:
                await self._spawn(entry)

    async def remove(self, name: str) -> None:
        """Stop a workload, forget it and delete its log files; no-op when unknown."""
        async with self._lock(name):
            if name not in self._entries:
                return
            await self._stop_entry(name)
            del self._entries[name]
            await asyncio.to_thread(self._delete_files, name)
            logger.info("removed process workload %s", name)

    async def inspect(self, name: str) -> ActualState:
        """Observe one workload; ``missing`` when the driver does not know it."""
        entry = self._entries.get(name)
        if entry is None:
            return ActualState(name=name, driver=self.name, phase="missing")
        return self._state(entry)

    async def list(self) -> list[ActualState]:
        """Observe every workload the driver knows, sorted by name."""
        return [self._state(self._entries[name]) for name in sorted(self._entries)]

    async def logs(self, name: str, tail: int | None = None) -> str:
        """Return the last ``tail`` lines (all when None) of a workload's output.

        stdout and stderr are merged in the order the kernel delivered them.

        Raises:
            WorkloadNotFoundError: no log file exists for that name.
        """
        path = self._log_path(name)
        files = await asyncio.to_thread(log_files, path)
        if not files:
            raise WorkloadNotFoundError("no logs", driver=self.name, workload=name)
        return await asyncio.to_thread(read_tail, path, tail)

    # -- internals -------------------------------------------------------------

    def _require(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise WorkloadNotFoundError("not found", driver=self.name, workload=name)
        return entry

    def _handle(self, entry: _Entry, *, created: bool) -> WorkloadHandle:
        pid = entry.process.pid if entry.process is not None else 0
        return WorkloadHandle(
            name=entry.spec.name,
            driver=self.name,
            runtime_id=str(pid),
            version=entry.spec.version,
            created=created,
        )

    def _state(self, entry: _Entry) -> ActualState:
        phase: ActualPhase
        if entry.failed:
            phase = "failed"
        elif entry.running:
            phase = "running"
        else:
            phase = "exited"
        return ActualState(
            name=entry.spec.name,
            driver=self.name,
            phase=phase,
            version=entry.spec.version,
            exit_code=entry.exit_code if phase == "exited" else None,
            reason=entry.reason,
            started_at=entry.started_at,
            finished_at=entry.finished_at,
            runtime_id=str(entry.process.pid) if entry.process is not None else "",
        )

    def _log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def _pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    async def _spawn(self, entry: _Entry) -> None:
        tg = self._tg
        if tg is None or self._closed:
            raise DriverError(
                "driver not started (use 'async with')", driver=self.name, workload=entry.spec.name
            )
        spec = entry.spec
        env = {**self.base_env, **spec.env}
        writer = await asyncio.to_thread(
            RotatingLogWriter,
            self._log_path(spec.name),
            max_bytes=self.log_max_bytes,
            backups=self.log_backups,
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=spec.working_dir,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            await asyncio.to_thread(writer.close)
            entry.process = None
            entry.failed = True
            entry.exit_code = None
            detail = exc.strerror or str(exc)
            if exc.filename is not None:
                detail = f"{detail}: {exc.filename}"  # the command or the working dir
            entry.reason = f"cannot execute {spec.command[0]!r}: {detail}"
            entry.finished_at = _now()
            logger.warning("process workload %s failed to start: %s", spec.name, entry.reason)
            raise WorkloadStartError(entry.reason, driver=self.name, workload=spec.name) from exc
        entry.process = process
        entry.exited = asyncio.Event()
        entry.failed = False
        entry.stopping = False
        entry.exit_code = None
        entry.reason = ""
        entry.started_at = _now()
        entry.finished_at = None
        await asyncio.to_thread(self._write_pidfile, spec.name, process.pid)
        tg.create_task(self._pump(process, writer), name=f"process-driver:pump:{spec.name}")
        tg.create_task(self._watch(entry, process), name=f"process-driver:watch:{spec.name}")
        logger.info(
            "started process workload %s version %s pid %s", spec.name, spec.version, process.pid
        )

    async def _pump(self, process: asyncio.subprocess.Process, writer: RotatingLogWriter) -> None:
        """Copy the merged output pipe into the log until EOF."""
        stream = process.stdout
        if stream is None:  # pragma: no cover - always created with stdout=PIPE
            await asyncio.to_thread(writer.close)
            return
        writable = True
        try:
            while data := await stream.read(_READ_CHUNK):
                if not writable:
                    continue  # keep draining so the child never blocks on a full pipe
                try:
                    await asyncio.to_thread(writer.write, data)
                except OSError as exc:
                    writable = False
                    logger.warning("log %s unwritable, dropping output: %s", writer.path, exc)
        finally:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(writer.close)

    async def _watch(self, entry: _Entry, process: asyncio.subprocess.Process) -> None:
        """Record the exit status and clean up the process group of one child."""
        returncode = await process.wait()
        _killpg(process.pid, signal.SIGKILL)  # stragglers of an exited leader
        if entry.process is not process:  # pragma: no cover - replaced meanwhile
            return
        entry.finished_at = _now()
        if returncode < 0:
            signum = -returncode
            entry.exit_code = 128 + signum
            how = f"killed by signal {_signal_name(signum)}"
        else:
            entry.exit_code = returncode
            how = f"exited with code {returncode}"
        entry.reason = f"stopped ({how})" if entry.stopping else how
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._pid_path(entry.spec.name).unlink, missing_ok=True)
        entry.exited.set()
        logger.info("process workload %s %s", entry.spec.name, entry.reason)
        if self.on_exit is not None:
            self.on_exit(entry.spec.name)

    async def _stop_entry(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None or entry.process is None or not entry.running:
            return
        entry.stopping = True
        pid = entry.process.pid
        _killpg(pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.stop_grace_s):
                await entry.exited.wait()
        except TimeoutError:
            logger.warning(
                "process workload %s ignored SIGTERM for %ss, sending SIGKILL",
                name,
                self.stop_grace_s,
            )
            _killpg(pid, signal.SIGKILL)
            await entry.exited.wait()

    def _prepare_dirs(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for pidfile in self.run_dir.glob("*.pid"):
            _kill_leftover(pidfile)

    def _write_pidfile(self, name: str, pid: int) -> None:
        start = _proc_start_time(pid)
        path = self._pid_path(name)
        tmp = path.with_suffix(".pid.tmp")
        tmp.write_text(f"{pid} {start or 0}\n")
        tmp.replace(path)

    def _delete_files(self, name: str) -> None:
        for file in log_files(self._log_path(name)):
            file.unlink(missing_ok=True)
        self._pid_path(name).unlink(missing_ok=True)


def _now() -> datetime:
    return datetime.now(UTC)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks (field 22 of /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _kill_leftover(pidfile: Path) -> None:
    """Kill the process group a previous agent left behind, if it is still the same."""
    try:
        pid_text, start_text = pidfile.read_text().split()
        pid, start = int(pid_text), int(start_text)
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    if start and _proc_start_time(pid) == start:
        logger.warning("killing process group %s left by a previous agent (%s)", pid, pidfile)
        _killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
