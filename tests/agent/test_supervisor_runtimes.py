"""The supervisor on every real runtime: a process, a Podman container, a libvirt domain.

Acceptance: each is started, stopped (local override) and started again, updated to a
new spec version, and restarted by the supervisor after it was killed from outside.
The runtimes are real (a private Podman service with the busybox image, libvirt's
``test:///default`` driver); only the desired state is an in-memory view.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from edge_agent._supervisor_plan import WorkloadRecord
from edge_agent.config import SupervisorSettings
from edge_agent.drivers import (
    ActualPhase,
    ActualState,
    DriverError,
    LibvirtDriver,
    PodmanDriver,
    ProcessDriver,
    WorkloadDriver,
)
from edge_agent.supervisor import Supervisor
from sync.models import RestartPolicy, WorkloadPhase, WorkloadSpec
from tests.agent.supervisor_fakes import Sink, View
from tests.fixtures_runtime import PodmanService
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

NAME = "rt-work"
# Hang guard for one step against a real runtime on a shared, busy machine.
WITHIN_S = 60.0
# The reconcile timer is what notices a workload killed from outside.
SETTINGS = SupervisorSettings(reconcile_interval_s=0.1, max_restart_attempts=50)
RESTART = RestartPolicy(mode="always", max_attempts=20, backoff_initial_s=0.05, backoff_max_s=0.2)


@dataclass(frozen=True)
class Runtime:
    """One real runtime under test.

    Attributes:
        driver: the driver, entered.
        spec: the workload spec at a given version.
        kill: kills the running workload from outside the supervisor and its driver's
            own API (a crash, an OOM kill, an admin's ``podman kill`` or ``virsh destroy``).
    """

    driver: WorkloadDriver
    spec: Callable[[str], WorkloadSpec]
    kill: Callable[[ActualState], Awaitable[None]]


# --- the three runtimes ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def process_runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    def make(version: str) -> WorkloadSpec:
        return WorkloadSpec(
            name=NAME,
            driver="process",
            version=version,
            command=(sys.executable, "-c", "import time; time.sleep(3600)"),
            restart=RESTART,
        )

    async def kill(seen: ActualState) -> None:
        os.kill(int(seen.runtime_id), signal.SIGKILL)

    async with ProcessDriver("agent-rt", tmp_path / "logs", stop_grace_s=5.0) as driver:
        yield Runtime(driver, make, kill)


@contextlib.asynccontextmanager
async def podman_runtime(service: PodmanService, owner: str) -> AsyncIterator[Runtime]:
    def make(version: str) -> WorkloadSpec:
        return WorkloadSpec(
            name=f"{NAME}-{owner}",  # container names are global to the service
            driver="podman",
            version=version,
            image=service.image,
            command=("sleep", "3600"),
            restart=RESTART,
        )

    async def kill(seen: ActualState) -> None:
        await asyncio.to_thread(service.cli, "kill", "--signal", "KILL", seen.runtime_id)

    # sleep runs as PID 1 and ignores SIGTERM: a short stop timeout keeps stops quick.
    async with PodmanDriver(owner, url=service.url, stop_timeout_s=1) as driver:
        yield Runtime(driver, make, kill)


@contextlib.asynccontextmanager
async def libvirt_runtime(uri: str) -> AsyncIterator[Runtime]:
    def make(version: str) -> WorkloadSpec:
        return WorkloadSpec(name=NAME, driver="libvirt", version=version, restart=RESTART)

    async with LibvirtDriver("agent-rt", uri=uri, domain_type="test") as driver:

        def destroy(name: str) -> None:
            # test:///default keeps its state per connection: reach the domain through
            # the driver's own connection, as another libvirt client would on a host.
            conn: Any = driver._conn
            assert conn is not None, "the driver has not connected yet"
            conn.lookupByName(name).destroy()

        async def kill(seen: ActualState) -> None:
            await driver._runner.run(destroy, seen.name)

        yield Runtime(driver, make, kill)


@pytest_asyncio.fixture(params=["process", "podman", "libvirt"])
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runtime]:
    kind: str = request.param
    match kind:
        case "process":
            ctx = process_runtime(tmp_path)
        case "podman":
            service: PodmanService = request.getfixturevalue("podman_service")
            owner: str = request.getfixturevalue("podman_owner")
            ctx = podman_runtime(service, owner)
        case _:
            ctx = libvirt_runtime(request.getfixturevalue("libvirt_uri"))
    async with ctx as rt:
        yield rt


# --- helpers ----------------------------------------------------------------------------


def record(sup: Supervisor, name: str) -> WorkloadRecord:
    found = sup.record(name)
    assert found is not None, f"the supervisor does not know {name}"
    return found


def phase_is(sup: Supervisor, name: str, phase: WorkloadPhase) -> Callable[[], bool]:
    def check() -> bool:
        found = sup.record(name)
        return found is not None and found.phase == phase

    return check


async def observe(driver: WorkloadDriver, name: str, phase: ActualPhase) -> ActualState:
    """Wait until the driver observes ``phase``; return that observation."""
    seen: list[ActualState] = []

    async def poll() -> bool:
        seen.append(await driver.inspect(name))
        return seen[-1].phase == phase

    async with asyncio.timeout(WITHIN_S):
        while not await poll():  # noqa: ASYNC110 - polling a real runtime
            await asyncio.sleep(0.05)
    return seen[-1]


@contextlib.asynccontextmanager
async def supervising(sup: Supervisor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sup.run(), name="supervisor")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the acceptance test ----------------------------------------------------------------


async def test_start_stop_update_and_crash_restart(runtime: Runtime) -> None:
    driver = runtime.driver
    first = runtime.spec("1")
    name = first.name
    view, sink = View(), Sink()
    sup = Supervisor({driver.name: driver}, view, sink, settings=SETTINGS, rng=random.Random(0))
    try:
        async with supervising(sup) as task:
            # Started.
            view.specs[name] = first
            sup.notify()
            await wait_until(phase_is(sup, name, "running"), within=WITHIN_S)
            started = await observe(driver, name, "running")
            assert started.version == "1"
            assert record(sup, name).restarts == 0

            # Stopped by a local override, started again when it is cleared.
            view.over[name] = "stop"
            sup.notify()
            await wait_until(phase_is(sup, name, "stopped"), within=WITHIN_S)
            stopped = await observe(driver, name, "exited")
            assert stopped.version == "1"
            del view.over[name]
            sup.notify()
            await wait_until(phase_is(sup, name, "running"), within=WITHIN_S)
            resumed = await observe(driver, name, "running")
            assert resumed.version == "1"
            assert record(sup, name).restarts == 0  # a cleared override is no crash

            # Updated: a new spec version replaces what runs.
            view.specs[name] = runtime.spec("2")
            sup.notify()
            await wait_until(
                lambda: record(sup, name).version == "2" and record(sup, name).phase == "running",
                within=WITHIN_S,
            )
            updated = await observe(driver, name, "running")
            assert updated.version == "2"
            assert updated.runtime_id != resumed.runtime_id  # replaced, not relabelled
            assert updated.started_at is not None

            # Crashed: killed from outside, restarted by the supervisor.
            await runtime.kill(updated)
            await wait_until(
                lambda: record(sup, name).restarts >= 1 and record(sup, name).phase == "running",
                within=WITHIN_S,
            )
            restarted = await observe(driver, name, "running")
            assert restarted.version == "2"
            assert restarted.started_at is not None
            assert restarted.started_at != updated.started_at
            assert "backoff" in sink.phases(name)  # the crash went through a backoff
            assert not task.done()

            # Removed from the desired state: the supervisor deletes it from the runtime.
            del view.specs[name]
            sup.notify()
            await wait_until(lambda: sup.record(name) is None, within=WITHIN_S)
            await observe(driver, name, "missing")
            assert await driver.list() == []
    finally:
        # Whatever failed above, leave nothing running on the runtime (without hiding
        # the failure behind a cleanup error).
        with contextlib.suppress(DriverError):
            await driver.remove(name)

    phases = sink.phases(name)
    assert phases[0] == "running"
    assert "stopped" in phases
    assert phases[-1] == "stopped"  # removal is reported as a last "stopped"
