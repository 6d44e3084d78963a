"""The workload driver protocol and the value types it speaks.

A driver turns a :class:`~sync.models.WorkloadSpec` into something running on the
gateway (a supervised process, a Podman container, a libvirt domain) and reports
what is actually there. Drivers are deliberately small and stateless about policy:
restarts, backoff, health checks and overrides belong to the supervisor, which calls

* :meth:`WorkloadDriver.apply` when a workload is missing or its spec version changed
  (and to start an exited one again once its backoff has elapsed),
* :meth:`WorkloadDriver.stop` / :meth:`WorkloadDriver.start` for local overrides,
* :meth:`WorkloadDriver.remove` when a workload leaves the desired state,
* :meth:`WorkloadDriver.inspect` / :meth:`WorkloadDriver.list` to observe.

Ownership: a driver only ever touches workloads it created for its ``owner`` (the
agent id), marked with labels (Podman) or domain metadata (libvirt). Something of
the same name that it does not own is reported with phase ``"conflict"`` and left
alone.

Every driver is an async context manager; ``aclose()`` releases its connections and
(for the process driver) stops its children.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, ParamSpec, Protocol, Self, TypeVar, runtime_checkable

from sync.models import WorkloadPhase, WorkloadSpec, WorkloadStatus

ActualPhase = Literal["running", "exited", "missing", "failed", "conflict"]
"""What a driver observes:

* ``running``: the workload runs (a paused container or VM counts, see ``reason``).
* ``exited``: it exists but does not run; ``exit_code`` tells how it ended, when known.
* ``missing``: nothing of that name exists.
* ``failed``: it could not be created or started, or the runtime reports it dead;
  ``reason`` says why (e.g. ``"image not found: localhost/app:1"``).
* ``conflict``: something of that name exists that this agent does not own.
"""

OWNER_LABEL = "io.novacron.owner"
WORKLOAD_LABEL = "io.novacron.workload"
VERSION_LABEL = "io.novacron.version"
LIMITS_LABEL = "io.novacron.limits"

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class DriverCapability:
    """Whether a driver can be used on this gateway.

    Attributes:
        available: True when the runtime answered.
        reason: why it is unavailable, or a short description of the runtime.
    """

    available: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadHandle:
    """What :meth:`WorkloadDriver.apply` created or found.

    Attributes:
        name: the workload name.
        driver: the driver name.
        runtime_id: container id, domain UUID, or process id as a string.
        version: the spec version that runs.
        created: True when apply created (or replaced) it, False when it was already there.
    """

    name: str
    driver: str
    runtime_id: str
    version: str
    created: bool


@dataclass(frozen=True, slots=True)
class ActualState:
    """What a driver observes about one workload.

    Attributes:
        name: the workload name.
        driver: the driver name.
        phase: see :data:`ActualPhase`.
        version: spec version from the ownership marks, or None when unknown.
        exit_code: exit status once exited (128 + N for a process killed by signal N).
        reason: a human-readable explanation (failure cause, how it stopped).
        started_at: when it last started (UTC), when known.
        finished_at: when it last ended (UTC), when known.
        runtime_id: container id, domain UUID or process id, or ``""``.
    """

    name: str
    driver: str
    phase: ActualPhase
    version: str | None = None
    exit_code: int | None = None
    reason: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    runtime_id: str = ""

    def to_status(self, *, restarts: int = 0, healthy: bool | None = None) -> WorkloadStatus:
        """Map this observation onto the reported :class:`~sync.models.WorkloadStatus`.

        ``missing`` maps to ``pending`` (not created yet) and ``conflict`` to ``failed``
        with the reason; the supervisor refines phases it alone knows (``backoff``,
        ``stopped`` by an override, ``starting``).

        Args:
            restarts: restart count kept by the supervisor.
            healthy: last health-check verdict, if any.

        Returns:
            The status to report upstream.
        """
        phase: WorkloadPhase
        match self.phase:
            case "running":
                phase = "running"
            case "exited":
                phase = "exited"
            case "missing":
                phase = "pending"
            case "failed" | "conflict":
                phase = "failed"
        since = self.finished_at if self.phase != "running" else self.started_at
        since_ms = max(0, int(since.timestamp() * 1000)) if since is not None else 0
        return WorkloadStatus(
            name=self.name,
            version=self.version or "",
            phase=phase,
            healthy=healthy,
            restarts=restarts,
            reason=self.reason[:1024],
            since_ms=since_ms,
        )


@runtime_checkable
class WorkloadDriver(Protocol):
    """One workload runtime behind a small async interface.

    Implementations translate every runtime error into
    :class:`~edge_agent.drivers.DriverError` subclasses and never block the event loop.
    """

    @property
    def name(self) -> str:
        """The driver name, equal to ``WorkloadSpec.driver`` values it serves."""
        ...

    async def probe(self) -> DriverCapability:
        """Check whether the runtime is usable here; never raises."""
        ...

    async def apply(self, spec: WorkloadSpec) -> WorkloadHandle:
        """Make ``spec`` exist and run.

        Idempotent: a workload already at ``spec.version`` is left as it is when
        running and started when not; one at another version is replaced (stopped,
        removed, created again).

        Raises:
            WorkloadConflictError: the name is held by something not owned.
            WorkloadStartError: creating or starting failed (``inspect`` then reports
                ``failed`` with the reason).
            DriverUnavailableError: the runtime cannot be reached.
        """
        ...

    async def remove(self, name: str) -> None:
        """Stop (gracefully, then by force) and delete a workload; no-op when missing.

        Raises:
            WorkloadConflictError: the name is held by something not owned.
        """
        ...

    async def stop(self, name: str) -> None:
        """Stop a workload gracefully, then by force; no-op when not running.

        Raises:
            WorkloadNotFoundError: no owned workload of that name.
        """
        ...

    async def start(self, name: str) -> None:
        """Start an existing, stopped workload with its current spec; no-op when running.

        Raises:
            WorkloadNotFoundError: no owned workload of that name.
        """
        ...

    async def inspect(self, name: str) -> ActualState:
        """Observe one workload (``missing`` and ``conflict`` are phases, not errors)."""
        ...

    async def list(self) -> list[ActualState]:
        """Observe every workload this agent owns on this driver, sorted by name."""
        ...

    async def aclose(self) -> None:
        """Release connections and children; the driver is unusable afterwards."""
        ...


class BlockingRunner:
    """Runs blocking runtime calls in worker threads, at most ``limit`` at a time.

    podman-py and libvirt-python block; the event loop must not. The semaphore keeps a
    burst of reconciliations from filling the default executor.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._semaphore = asyncio.Semaphore(limit)

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Call ``fn(*args, **kwargs)`` in a worker thread and return its result."""
        async with self._semaphore:
            return await asyncio.to_thread(fn, *args, **kwargs)


def vcpus_for(cpu_millis: int) -> int:
    """Whole vCPUs for a CPU reservation in millicores, rounded up (at least 1)."""
    return max(1, math.ceil(cpu_millis / 1000))


@dataclass(frozen=True, slots=True)
class _Failure:
    version: str | None
    reason: str
    at: datetime


class DriverBase:
    """Shared by the drivers: ``async with driver:`` closes it, one lock per
    workload name serialises operations on that workload, and a workload the
    runtime refused to create or start is remembered (its reason, when) and
    reported ``failed`` by :meth:`_failed_state` and :meth:`_with_failures`
    until it is applied, started or removed."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._failures: dict[str, _Failure] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        """The driver name."""
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover - overridden
        """Release what the driver holds."""

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    def _note_failure(self, name: str, version: str | None, reason: str) -> None:
        """Remember that ``name`` could not be created or started, and why."""
        self._failures[name] = _Failure(version, reason, datetime.now(UTC))

    def _clear_failure(self, name: str) -> None:
        self._failures.pop(name, None)

    def _failed_state(self, name: str, seen: ActualState | None = None) -> ActualState | None:
        """``name`` as ``failed`` if a failure is remembered (``seen``: what the
        runtime shows of it, for its version, start time and id), else ``None``."""
        failure = self._failures.get(name)
        return None if failure is None else self._as_failed(name, failure, seen)

    def _with_failures(self, states: list[ActualState]) -> list[ActualState]:
        """What the runtime lists, plus the remembered failures it does not, by name."""
        by_name = {s.name: s for s in states}
        for name, failure in self._failures.items():
            if name not in by_name:
                by_name[name] = self._as_failed(name, failure, None)
        return [by_name[name] for name in sorted(by_name)]

    def _as_failed(self, name: str, failure: _Failure, seen: ActualState | None) -> ActualState:
        return ActualState(
            name=name,
            driver=self.name,
            phase="failed",
            version=failure.version or (seen.version if seen is not None else None),
            reason=failure.reason,
            started_at=seen.started_at if seen is not None else None,
            finished_at=failure.at,
            runtime_id=seen.runtime_id if seen is not None else "",
        )
