"""The ``sim`` driver: an in-memory model of a workload runtime.

For the simulator and for unit tests of the supervisor: it follows the same contract
as the real drivers (idempotent apply, replace on a version change, ownership
conflicts, failed starts) without starting anything, and it is deterministic: time
comes from an injected clock and nothing happens on its own. Tests and the fault
schedule drive it with :meth:`SimDriver.crash`, :meth:`SimDriver.occupy`,
:meth:`SimDriver.fail_starts` and :attr:`SimDriver.available`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Self

from edge_agent.drivers._exceptions import (
    DriverUnavailableError,
    WorkloadConflictError,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from edge_agent.drivers.base import ActualState, DriverCapability, WorkloadHandle
from sync.models import WorkloadSpec


@dataclass(frozen=True, slots=True)
class _SimWorkload:
    spec: WorkloadSpec
    runtime_id: str
    state: ActualState


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SimDriver:
    """An in-memory workload runtime owned by one agent.

    Args:
        owner: the agent id (foreign workloads are those :meth:`occupy` adds).
        now: the clock for ``started_at`` / ``finished_at`` (the simulator's virtual
            clock in deterministic mode).
    """

    def __init__(self, owner: str, *, now: Callable[[], datetime] = _utc_now) -> None:
        self.owner = owner
        self.available = True
        self.applied = 0
        self._now = now
        self._workloads: dict[str, _SimWorkload] = {}
        self._foreign: set[str] = set()
        self._failing: dict[str, str] = {}
        self._failures: dict[str, ActualState] = {}
        self._next_id = 1

    @property
    def name(self) -> str:
        """The driver name, ``"sim"``."""
        return "sim"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release."""

    # -- fault injection -----------------------------------------------------------

    def crash(self, name: str, exit_code: int = 1, reason: str = "") -> None:
        """Make a running workload exit with ``exit_code``."""
        if name not in self._workloads:
            raise WorkloadNotFoundError("not found", driver=self.name, workload=name)
        self._set(
            name,
            phase="exited",
            exit_code=exit_code,
            reason=reason or f"exited with code {exit_code}",
            finished_at=self._now(),
        )

    def occupy(self, name: str) -> None:
        """Add a workload of that name that this agent does not own."""
        self._foreign.add(name)

    def fail_starts(self, name: str, reason: str | None) -> None:
        """Make every start of ``name`` fail with ``reason`` (None heals it)."""
        if reason is None:
            self._failing.pop(name, None)
        else:
            self._failing[name] = reason

    # -- the driver protocol -----------------------------------------------------

    async def probe(self) -> DriverCapability:
        """Available unless :attr:`available` was set to False."""
        if not self.available:
            return DriverCapability(available=False, reason="simulated runtime down")
        return DriverCapability(available=True, reason="simulated runtime")

    async def apply(self, spec: WorkloadSpec) -> WorkloadHandle:
        """Create and start ``spec``; replace one of another version."""
        self._check(spec.name)
        self.applied += 1
        current = self._workloads.get(spec.name)
        if current is not None and current.spec.version == spec.version:
            if current.state.phase != "running":
                self._start(spec.name)
            return self._handle(self._workloads[spec.name], created=False)
        runtime_id = f"sim-{self._next_id}"
        self._next_id += 1
        self._workloads[spec.name] = _SimWorkload(
            spec=spec,
            runtime_id=runtime_id,
            state=ActualState(
                name=spec.name,
                driver=self.name,
                phase="exited",
                version=spec.version,
                reason="created, not started",
                runtime_id=runtime_id,
            ),
        )
        self._start(spec.name)
        return self._handle(self._workloads[spec.name], created=True)

    async def stop(self, name: str) -> None:
        """Stop a running workload (exit code 143, as after SIGTERM)."""
        workload = self._require(name)
        if workload.state.phase == "running":
            self._set(
                name,
                phase="exited",
                exit_code=143,
                reason="stopped (killed by signal SIGTERM)",
                finished_at=self._now(),
            )

    async def start(self, name: str) -> None:
        """Start a stopped workload."""
        workload = self._require(name)
        if workload.state.phase != "running":
            self._start(name)

    async def remove(self, name: str) -> None:
        """Forget an owned workload; no-op when missing."""
        self._check(name)
        self._workloads.pop(name, None)
        self._failures.pop(name, None)

    async def inspect(self, name: str) -> ActualState:
        """Observe one workload."""
        if not self.available:
            raise DriverUnavailableError("simulated runtime down", driver=self.name)
        if name in self._foreign:
            return ActualState(
                name=name, driver=self.name, phase="conflict", reason="not owned by this agent"
            )
        if name in self._failures:
            return self._failures[name]
        workload = self._workloads.get(name)
        if workload is None:
            return ActualState(name=name, driver=self.name, phase="missing")
        return workload.state

    async def list(self) -> list[ActualState]:
        """Observe every owned workload, sorted by name."""
        if not self.available:
            raise DriverUnavailableError("simulated runtime down", driver=self.name)
        names = sorted(set(self._workloads) | set(self._failures))
        return [await self.inspect(name) for name in names]

    # -- internals -------------------------------------------------------------

    def _check(self, name: str) -> None:
        if not self.available:
            raise DriverUnavailableError("simulated runtime down", driver=self.name, workload=name)
        if name in self._foreign:
            raise WorkloadConflictError("not owned by this agent", driver=self.name, workload=name)

    def _require(self, name: str) -> _SimWorkload:
        self._check(name)
        workload = self._workloads.get(name)
        if workload is None:
            raise WorkloadNotFoundError("not found", driver=self.name, workload=name)
        return workload

    def _start(self, name: str) -> None:
        workload = self._workloads[name]
        if (reason := self._failing.get(name)) is not None:
            self._failures[name] = replace(
                workload.state, phase="failed", reason=reason, finished_at=self._now()
            )
            raise WorkloadStartError(reason, driver=self.name, workload=name)
        self._failures.pop(name, None)
        self._set(name, phase="running", exit_code=None, reason="", started_at=self._now())

    def _set(self, name: str, **changes: object) -> None:
        workload = self._workloads[name]
        state = replace(workload.state, **changes)  # type: ignore[arg-type]
        self._workloads[name] = replace(workload, state=state)

    def _handle(self, workload: _SimWorkload, *, created: bool) -> WorkloadHandle:
        return WorkloadHandle(
            name=workload.spec.name,
            driver=self.name,
            runtime_id=workload.runtime_id,
            version=workload.spec.version,
            created=created,
        )
