"""Supervisor: pure decisions, and a real process driver under supervision."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from pathlib import Path

import pytest

from edge_agent._supervisor_plan import BackoffPolicy, WorkloadRecord, decide
from edge_agent.config import SupervisorSettings
from edge_agent.drivers import ActualPhase, ActualState, ProcessDriver
from edge_agent.supervisor import RejectedSpec, Supervisor
from sync.models import HealthCheck, RestartPolicy, WorkloadSpec
from tests.agent.supervisor_fakes import Sink, View
from tests.helpers import wait_until

PY = sys.executable


def spec(
    name: str, code: str, *, version: str = "1", attempts: int = 3, **kw: object
) -> WorkloadSpec:
    return WorkloadSpec(
        name=name,
        driver="process",
        version=version,
        command=(PY, "-c", code),
        restart=RestartPolicy(
            max_attempts=attempts,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            **kw,
        ),
    )


def rec(sup: Supervisor, name: str) -> WorkloadRecord:
    found = sup.record(name)
    assert found is not None, name
    return found


SETTINGS = SupervisorSettings(reconcile_interval_s=0.05, max_restart_attempts=50)


# --- pure decisions --------------------------------------------------------


def _actual(
    phase: ActualPhase, *, exit_code: int | None = None, version: str | None = None
) -> ActualState:
    return ActualState(
        name="w", driver="process", phase=phase, exit_code=exit_code, version=version
    )


def test_crash_loop_ends_in_failed_after_n_attempts() -> None:
    s = spec("w", "raise SystemExit(3)", attempts=3)
    rec = WorkloadRecord(name="w", phase="running", version="1")
    backoff = BackoffPolicy(initial_s=1, max_s=8, jitter=0, rng=random.Random(1))
    now = 0.0
    phases = []
    for _ in range(3):
        d = decide(
            s,
            None,
            _actual("exited", exit_code=3),
            rec,
            now=now,
            backoff=backoff,
            max_attempts_cap=100,
        )
        rec.phase = d.phase
        phases.append(d.phase)
        if d.phase == "backoff":
            now = rec.next_start_at
            d = decide(
                s,
                None,
                _actual("exited", exit_code=3),
                rec,
                now=now,
                backoff=backoff,
                max_attempts_cap=100,
            )
            assert d.action == "apply"
            rec.phase = "running"
    assert phases == ["backoff", "backoff", "failed"]
    assert "gave up after 3 attempts" in rec.reason or "exited with code 3" in d.reason


def test_backoff_grows_exponentially_and_is_bounded() -> None:
    b = BackoffPolicy(initial_s=1, max_s=10, jitter=0)
    assert [b.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    jittered = BackoffPolicy(initial_s=4, max_s=10, jitter=0.5, rng=random.Random(7))
    assert all(2 <= jittered.delay(1) <= 6 for _ in range(100))


def test_restart_policies() -> None:
    rec = WorkloadRecord(name="w", phase="running", version="1")
    backoff = BackoffPolicy(jitter=0)
    never = spec("w", "", mode="never")
    assert (
        decide(
            never,
            None,
            _actual("exited", exit_code=1),
            rec,
            now=0,
            backoff=backoff,
            max_attempts_cap=9,
        ).phase
        == "exited"
    )
    rec = WorkloadRecord(name="w", phase="running", version="1")
    on_failure = spec("w", "", mode="on-failure")
    assert (
        decide(
            on_failure,
            None,
            _actual("exited", exit_code=0),
            rec,
            now=0,
            backoff=backoff,
            max_attempts_cap=9,
        ).phase
        == "exited"
    )
    rec = WorkloadRecord(name="w", phase="running", version="1")
    assert (
        decide(
            on_failure,
            None,
            _actual("exited", exit_code=2),
            rec,
            now=0,
            backoff=backoff,
            max_attempts_cap=9,
        ).phase
        == "backoff"
    )


def test_new_version_replaces_and_resets_history() -> None:
    rec = WorkloadRecord(name="w", phase="failed", version="1", attempts=5)
    d = decide(
        spec("w", "", version="2"),
        None,
        _actual("exited", version="1"),
        rec,
        now=0,
        backoff=BackoffPolicy(),
        max_attempts_cap=9,
    )
    assert d.action == "apply"
    assert rec.attempts == 0


def test_stop_override_wins() -> None:
    rec = WorkloadRecord(name="w", phase="running", version="1")
    d = decide(
        spec("w", ""),
        "stop",
        _actual("running", version="1"),
        rec,
        now=0,
        backoff=BackoffPolicy(),
        max_attempts_cap=9,
    )
    assert (d.action, d.phase) == ("stop", "stopped")


# --- with a real process driver -------------------------------------------


async def test_supervises_real_processes(tmp_path: Path) -> None:
    view, sink = View(), Sink()
    async with ProcessDriver("agent-t", tmp_path / "logs") as driver:
        sup = Supervisor({"process": driver}, view, sink, settings=SETTINGS, rng=random.Random(0))
        view.specs["good"] = spec("good", "import time; time.sleep(600)")
        view.specs["crashy"] = spec("crashy", "raise SystemExit(7)", attempts=3)
        view.specs["bad"] = RejectedSpec("bad", "invalid spec: command missing")
        task = asyncio.create_task(sup.run())
        try:
            await wait_until(
                lambda: sup.record("crashy") is not None and rec(sup, "crashy").phase == "failed"
            )
            crashy = sup.record("crashy")
            assert crashy is not None
            assert "gave up after 3 attempts" in crashy.reason
            assert "exited with code 7" in crashy.reason
            # The others are untouched by the crash loop and the rejection.
            good = await driver.inspect("good")
            assert good.phase == "running"
            assert rec(sup, "good").restarts == 0
            assert rec(sup, "bad").phase == "rejected"

            # Crash recovery: kill the good workload, the supervisor restarts it.
            pid = int(good.runtime_id)
            import os
            import signal

            os.kill(pid, signal.SIGKILL)
            await wait_until(
                lambda: rec(sup, "good").restarts >= 1 and rec(sup, "good").phase == "running"
            )
            assert (await driver.inspect("good")).runtime_id != str(pid)

            # Update: a new version replaces the running one.
            view.specs["good"] = spec("good", "import time; time.sleep(601)", version="2")
            sup.notify()
            await wait_until(lambda: driver._entries["good"].spec.version == "2")
            assert (await driver.inspect("good")).version == "2"

            # Stop override, then clearing it starts the workload again.
            view.over["good"] = "stop"
            sup.notify()
            await wait_until(lambda: rec(sup, "good").phase == "stopped")
            assert (await driver.inspect("good")).phase == "exited"
            del view.over["good"]
            sup.notify()
            await wait_until(lambda: rec(sup, "good").phase == "running")

            # Removal from desired state removes the workload.
            del view.specs["good"]
            sup.notify()
            await wait_until(lambda: sup.record("good") is None)
            assert (await driver.inspect("good")).phase == "missing"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert sink.phases("crashy")[-1] == "failed"
    assert "rejected" in sink.phases("bad")


async def test_transitions_the_journal_refused_are_reported_once_it_takes_writes(
    tmp_path: Path,
) -> None:
    """A full disk refuses the ``starting -> running`` record: the workload runs
    on, and its status is reported at the first pass after space comes back
    (else it would read ``starting`` for as long as it runs)."""
    view, sink = View(), Sink()
    sink.full = True
    async with ProcessDriver("agent-t", tmp_path / "logs") as driver:
        sup = Supervisor({"process": driver}, view, sink, settings=SETTINGS, rng=random.Random(0))
        view.specs["good"] = spec("good", "import time; time.sleep(600)")
        task = asyncio.create_task(sup.run())
        try:
            await wait_until(lambda: sup.record("good") is not None and sup.unrecorded >= 3)
            assert rec(sup, "good").phase == "running"
            assert (await driver.inspect("good")).phase == "running"
            assert sink.transitions == []
            sink.full = False
            await wait_until(lambda: sink.phases("good") == ["running"])
            unrecorded = sup.unrecorded
            await asyncio.sleep(0.3)  # several passes: recorded once, not again
            assert sink.phases("good") == ["running"]
            assert sup.unrecorded == unrecorded
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_failing_health_check_restarts_the_workload(tmp_path: Path) -> None:
    """A running process whose tcp health check fails is restarted (an attempt)."""
    from tests.fixtures_mqtt import free_port

    port = free_port()  # nothing listens there: every check fails
    view, sink = View(), Sink()
    view.specs["web"] = WorkloadSpec(
        name="web",
        driver="process",
        command=(PY, "-c", "import time; time.sleep(600)"),
        restart=RestartPolicy(max_attempts=2, backoff_initial_s=0.05, backoff_max_s=0.1),
        health=HealthCheck(
            kind="tcp", port=port, interval_s=0.05, timeout_s=1, failure_threshold=2
        ),
    )
    async with ProcessDriver("agent-h", tmp_path / "logs") as driver:
        sup = Supervisor({"process": driver}, view, sink, settings=SETTINGS, rng=random.Random(0))
        task = asyncio.create_task(sup.run())
        try:
            await wait_until(lambda: getattr(sup.record("web"), "phase", "") == "failed")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert "unhealthy: tcp check failed" in rec(sup, "web").reason
    assert rec(sup, "web").healthy is False
