"""The workload supervisor: reconcile desired workloads against what runs.

A pass (:meth:`Supervisor.reconcile`) reads the desired specs and local
overrides, observes every driver, and for each workload carries out the one
action the pure :func:`~edge_agent._supervisor_plan.decide` picks. Passes run
on every change (:meth:`Supervisor.notify`), on a timer, and when a backoff
expires. Each phase change is handed to a :class:`SupervisorSink`, which the
agent turns into a journal event and a ``reported/<name>`` state delta.

One workload's failure never touches another: driver errors are caught per
workload and become that workload's state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from edge_agent._exceptions import AgentError
from edge_agent._supervisor_plan import BackoffPolicy, Decision, WorkloadRecord, decide
from edge_agent.config import SupervisorSettings
from edge_agent.drivers import ActualState, DriverError, WorkloadDriver
from edge_agent.health import run_health_check
from sync.models import WorkloadPhase, WorkloadSpec, WorkloadStatus

log = logging.getLogger(__name__)

OverrideAction = Literal["stop", "start"]


@dataclass(frozen=True, slots=True)
class RejectedSpec:
    """A desired workload whose spec could not be accepted, and why."""

    name: str
    reason: str


class DesiredView(Protocol):
    """Where the supervisor reads what should run."""

    def desired(self) -> Mapping[str, WorkloadSpec | RejectedSpec]:
        """Desired workloads by name."""
        ...

    def overrides(self) -> Mapping[str, OverrideAction]:
        """Local overrides in force, by workload name."""
        ...


class SupervisorSink(Protocol):
    """Receives every phase transition of every workload."""

    async def on_transition(self, status: WorkloadStatus, previous: WorkloadPhase | None) -> None:
        """Record a transition (journal event plus reported state)."""
        ...


class Supervisor:
    """Keeps desired workloads running on their drivers.

    Args:
        drivers: available drivers by name (``process``, ``podman``, ...).
        view: the desired state and overrides.
        sink: where transitions go.
        settings: reconcile interval, backoff defaults, attempt ceiling.
        rng: random source for backoff jitter (seeded in the simulator).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        drivers: Mapping[str, WorkloadDriver],
        view: DesiredView,
        sink: SupervisorSink,
        *,
        settings: SupervisorSettings,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._drivers = dict(drivers)
        self._view = view
        self._sink = sink
        self._settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._records: dict[str, WorkloadRecord] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._unrecorded: set[str] = set()
        self.passes = 0
        self.unrecorded = 0
        """Transitions the sink refused (counted; each workload's status is
        reported again at the next pass until one is recorded)."""

    def notify(self) -> None:
        """Ask for a reconcile pass as soon as possible (desired state changed)."""
        self._wake.set()

    def statuses(self) -> list[WorkloadStatus]:
        """The current status of every known workload, sorted by name."""
        return [self._status(r) for _, r in sorted(self._records.items())]

    def record(self, name: str) -> WorkloadRecord | None:
        """The supervisor's record of one workload, if known."""
        return self._records.get(name)

    async def run(self) -> None:
        """Reconcile now, then on every change, timer tick or backoff expiry."""
        while True:
            await self.reconcile()
            timeout = self._settings.reconcile_interval_s
            now = self._clock()
            for rec in self._records.values():
                if rec.phase == "backoff":
                    timeout = min(timeout, max(0.0, rec.next_start_at - now))
                if rec.phase == "running" and rec.next_health_at:
                    timeout = min(timeout, max(0.0, rec.next_health_at - now))
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout + 0.01):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def reconcile(self) -> None:
        """One full pass over every desired and every owned workload."""
        async with self._lock:
            self.passes += 1
            desired = dict(self._view.desired())
            overrides = dict(self._view.overrides())
            owned: dict[str, tuple[str, ActualState]] = {}
            for driver_name, driver in self._drivers.items():
                try:
                    for seen in await driver.list():
                        owned[seen.name] = (driver_name, seen)
                except DriverError as exc:
                    log.warning("cannot list %s workloads: %s", driver_name, exc)
            async with asyncio.TaskGroup() as tg:
                for name, (driver_name, _actual) in owned.items():
                    wanted = desired.get(name)
                    if not isinstance(wanted, WorkloadSpec) or wanted.driver != driver_name:
                        tg.create_task(self._remove(driver_name, name), name=f"remove:{name}")
                for name, wanted in desired.items():
                    found = owned.get(name)
                    actual = (
                        found[1] if found and found[0] == getattr(wanted, "driver", "") else None
                    )
                    tg.create_task(
                        self._one(name, wanted, overrides.get(name), actual),
                        name=f"reconcile:{name}",
                    )
            for name in list(self._records):
                if name not in desired:
                    rec = self._records.pop(name)
                    log.info("workload %s removed from desired state", name)
                    await self._emit(rec, rec.phase, "stopped", "removed: no longer desired")
            await self._report_unrecorded()

    async def _remove(self, driver_name: str, name: str) -> None:
        try:
            await self._drivers[driver_name].remove(name)
            log.info("removed workload %s from %s", name, driver_name)
        except DriverError as exc:
            log.warning("cannot remove workload %s: %s", name, exc)

    async def _one(
        self,
        name: str,
        wanted: WorkloadSpec | RejectedSpec,
        override: OverrideAction | None,
        actual: ActualState | None,
    ) -> None:
        rec = self._records.setdefault(name, WorkloadRecord(name=name))
        before, before_version = rec.phase, rec.version
        try:
            decision = await self._decide(rec, wanted, override, actual)
        except Exception as exc:  # a bug in one workload must not stop the others
            log.exception("supervising workload %s failed", name)
            decision = Decision("none", "failed", f"internal error: {exc}")
        # A replaced workload (running -> running at a new version) is a transition
        # too: the reported status must carry the version now running.
        new_version = rec.version != before_version
        if decision.phase != before or decision.reason != rec.reason or new_version:
            rec.reason = decision.reason
            if decision.phase != before or new_version:
                await self._emit(rec, before, decision.phase, decision.reason)
            rec.phase = decision.phase

    async def _decide(
        self,
        rec: WorkloadRecord,
        wanted: WorkloadSpec | RejectedSpec,
        override: OverrideAction | None,
        actual: ActualState | None,
    ) -> Decision:
        if isinstance(wanted, RejectedSpec):
            return Decision("none", "rejected", wanted.reason)
        driver = self._drivers.get(wanted.driver)
        if driver is None:
            return Decision("none", "rejected", f"driver {wanted.driver!r} is not enabled here")
        observed = actual if actual is not None else await driver.inspect(wanted.name)
        if override == "start" and rec.phase == "failed":
            # A local start override is an operator saying "try again".
            rec.phase, rec.attempts = "pending", 0
        decision = self._plan(wanted, override, observed, rec)
        try:
            match decision.action:
                case "apply":
                    if rec.phase == "backoff":
                        rec.restarts += 1
                    rec.phase = "starting"
                    await driver.apply(wanted)
                    rec.running_since = None
                    rec.next_health_at = self._clock() + (
                        wanted.health.interval_s if wanted.health else 0.0
                    )
                    rec.health_failures, rec.healthy = 0, None
                    return Decision("none", "running", decision.reason)
                case "stop":
                    await driver.stop(wanted.name)
                case "start":
                    await driver.start(wanted.name)
                case "remove":
                    await driver.remove(wanted.name)
                case "none":
                    pass
        except DriverError as exc:
            log.warning("workload %s: %s failed: %s", wanted.name, decision.action, exc)
            failed = ActualState(
                name=wanted.name, driver=wanted.driver, phase="failed", reason=str(exc)
            )
            rec.phase = "starting"
            return self._plan(wanted, override, failed, rec)
        if decision.phase == "running" and wanted.health is not None:
            return await self._check_health(driver, wanted, rec, decision)
        return decision

    def _plan(
        self,
        spec: WorkloadSpec,
        override: OverrideAction | None,
        actual: ActualState,
        rec: WorkloadRecord,
    ) -> Decision:
        s = self._settings
        backoff = BackoffPolicy(
            initial_s=spec.restart.backoff_initial_s,
            max_s=spec.restart.backoff_max_s,
            jitter=s.backoff_jitter,
            rng=self._rng,
        )
        return decide(
            spec,
            override,
            actual,
            rec,
            now=self._clock(),
            backoff=backoff,
            max_attempts_cap=s.max_restart_attempts,
        )

    async def _check_health(
        self, driver: WorkloadDriver, spec: WorkloadSpec, rec: WorkloadRecord, ok: Decision
    ) -> Decision:
        assert spec.health is not None
        now = self._clock()
        if now < rec.next_health_at:
            return ok
        rec.next_health_at = now + spec.health.interval_s
        healthy, detail = await run_health_check(spec.health)
        rec.healthy = healthy
        if healthy:
            rec.health_failures = 0
            return ok
        rec.health_failures += 1
        if rec.health_failures < spec.health.failure_threshold:
            return ok
        log.warning("workload %s unhealthy (%s): restarting", spec.name, detail)
        try:
            await driver.stop(spec.name)
        except DriverError as exc:
            log.warning("cannot stop unhealthy workload %s: %s", spec.name, exc)
        rec.health_failures = 0
        unhealthy = ActualState(
            name=spec.name, driver=spec.driver, phase="failed", reason=f"unhealthy: {detail}"
        )
        return self._plan(spec, None, unhealthy, rec)

    def _status(
        self, rec: WorkloadRecord, phase: WorkloadPhase | None = None, reason: str | None = None
    ) -> WorkloadStatus:
        return WorkloadStatus(
            name=rec.name,
            version=rec.version or "0",
            phase=phase or rec.phase,
            healthy=rec.healthy,
            restarts=rec.restarts,
            reason=(rec.reason if reason is None else reason)[:1024],
            since_ms=int(time.time() * 1000),
        )

    async def _emit(
        self, rec: WorkloadRecord, before: WorkloadPhase, after: WorkloadPhase, reason: str
    ) -> None:
        log.info("workload %s: %s -> %s %s", rec.name, before, after, reason)
        try:
            await self._sink.on_transition(self._status(rec, after, reason), before)
        except Exception as exc:  # count it, keep supervising, report it again later
            self.unrecorded += 1
            if not isinstance(exc, AgentError):  # not the journal refusing: a bug
                log.exception("cannot record transition of %s", rec.name)
            elif rec.name not in self._unrecorded:  # a full disk: once per workload
                log.warning(
                    "workload %s: transition to %s not recorded (%s); reported again once "
                    "the journal takes writes",
                    rec.name,
                    after,
                    exc,
                )
            self._unrecorded.add(rec.name)
        else:
            self._unrecorded.discard(rec.name)

    async def _report_unrecorded(self) -> None:
        """Report again the status of workloads whose last transition was not recorded.

        Without this a workload that went on running after its ``starting ->
        running`` failed to reach the journal would be reported as starting for
        as long as it runs.
        """
        for name in sorted(self._unrecorded):
            rec = self._records.get(name)
            if rec is None:
                self._unrecorded.discard(name)
                continue
            await self._emit(rec, rec.phase, rec.phase, rec.reason)
