"""The process driver against real subprocesses and real log files."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from edge_agent.drivers import (
    ProcessDriver,
    WorkloadDriver,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from edge_agent.drivers._logs import log_files
from edge_agent.drivers.process import _proc_start_time
from sync.models import WorkloadSpec

pytestmark = pytest.mark.asyncio


def spec(name: str, script: str, version: str = "1", **kw: object) -> WorkloadSpec:
    return WorkloadSpec.model_validate(
        {"name": name, "driver": "process", "version": version, "command": ["sh", "-c", script]}
        | kw
    )


async def wait_until(check: Callable[[], Awaitable[bool]], within_s: float = 30.0) -> None:
    """Poll ``check`` until true; the deadline only bounds a hang, it asserts nothing."""
    async with asyncio.timeout(within_s):
        while not await check():  # noqa: ASYNC110 - polling a real runtime
            await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """True when ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


async def test_is_a_workload_driver(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir) as driver:
        assert isinstance(driver, WorkloadDriver)
        assert driver.name == "process"
        assert (await driver.probe()).available


async def test_start_is_idempotent_and_logs_output(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir) as driver:
        handle = await driver.apply(spec("web", "echo hello; echo oops >&2; sleep 30"))
        assert handle.created
        again = await driver.apply(spec("web", "echo hello; echo oops >&2; sleep 30"))
        assert not again.created
        assert again.runtime_id == handle.runtime_id
        state = await driver.inspect("web")
        assert state.phase == "running"
        assert state.version == "1"
        assert state.started_at is not None
        assert state.runtime_id == handle.runtime_id

        async def logged() -> bool:
            return "oops" in await driver.logs("web")

        await wait_until(logged)
        assert "hello\n" in await driver.logs("web")


async def test_update_replaces_the_process(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir, stop_grace_s=5) as driver:
        first = await driver.apply(spec("svc", "sleep 30", version="1"))
        second = await driver.apply(spec("svc", "sleep 30", version="2"))
        assert second.created
        assert second.runtime_id != first.runtime_id
        assert not alive(int(first.runtime_id))
        state = await driver.inspect("svc")
        assert (state.phase, state.version) == ("running", "2")


async def test_crash_is_detected_with_exit_code(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir) as driver:
        await driver.apply(spec("crashy", "echo dying; exit 3"))

        async def exited() -> bool:
            return (await driver.inspect("crashy")).phase == "exited"

        await wait_until(exited)
        state = await driver.inspect("crashy")
        assert state.exit_code == 3
        assert state.reason == "exited with code 3"
        assert state.finished_at is not None
        status = state.to_status(restarts=2)
        assert (status.phase, status.restarts, status.version) == ("exited", 2, "1")
        # apply of the same version starts it again (the supervisor's restart path)
        handle = await driver.apply(spec("crashy", "echo dying; exit 3"))
        assert not handle.created


async def test_stop_then_start(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir) as driver:
        await driver.apply(spec("svc", "sleep 30"))
        await driver.stop("svc")
        state = await driver.inspect("svc")
        assert state.phase == "exited"
        assert state.exit_code == 128 + signal.SIGTERM
        assert state.reason == "stopped (killed by signal SIGTERM)"
        await driver.stop("svc")  # no-op when not running
        await driver.start("svc")
        assert (await driver.inspect("svc")).phase == "running"
        await driver.start("svc")  # no-op when running


async def test_sigterm_ignored_escalates_to_sigkill(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir, stop_grace_s=0.3) as driver:
        await driver.apply(spec("stubborn", "trap '' TERM; echo ready; sleep 30"))

        async def ready() -> bool:
            return "ready" in await driver.logs("stubborn")

        await wait_until(ready)
        await driver.stop("stubborn")
        state = await driver.inspect("stubborn")
        assert state.exit_code == 128 + signal.SIGKILL


async def test_remove_kills_the_process_group_and_forgets(logs_dir: Path, tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    async with ProcessDriver("a1", logs_dir) as driver:
        await driver.apply(spec("tree", f"sleep 300 & echo $! > {child_pid_file}; wait"))

        async def child_started() -> bool:
            return child_pid_file.exists() and child_pid_file.read_text().strip() != ""

        await wait_until(child_started)
        grandchild = int(child_pid_file.read_text())
        assert alive(grandchild)
        await driver.remove("tree")

        async def grandchild_gone() -> bool:
            return not alive(grandchild)

        await wait_until(grandchild_gone)
        assert (await driver.inspect("tree")).phase == "missing"
        assert log_files(logs_dir / "tree.log") == []
        with pytest.raises(WorkloadNotFoundError):
            await driver.logs("tree")
        await driver.remove("tree")  # no-op when missing


async def test_list_and_unknown_names(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir) as driver:
        await driver.apply(spec("b-svc", "sleep 30"))
        await driver.apply(spec("a-svc", "sleep 30", version="7"))
        states = await driver.list()
        assert [(s.name, s.phase, s.version) for s in states] == [
            ("a-svc", "running", "7"),
            ("b-svc", "running", "1"),
        ]
        with pytest.raises(WorkloadNotFoundError):
            await driver.stop("nope")
        with pytest.raises(WorkloadNotFoundError):
            await driver.start("nope")
        assert (await driver.inspect("nope")).phase == "missing"


async def test_env_and_working_dir(logs_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    async with ProcessDriver("a1", logs_dir) as driver:
        await driver.apply(
            spec("envy", 'echo "foo=$FOO"; pwd', env={"FOO": "bar"}, working_dir=str(workdir))
        )

        async def done() -> bool:
            return (await driver.inspect("envy")).phase == "exited"

        await wait_until(done)
        output = await driver.logs("envy")
        assert "foo=bar\n" in output
        assert f"{workdir}\n" in output
        assert (await driver.inspect("envy")).exit_code == 0


async def test_unexecutable_command_fails_clearly(logs_dir: Path) -> None:
    bad = WorkloadSpec(name="bad", driver="process", command=("/nonexistent/binary",))
    async with ProcessDriver("a1", logs_dir) as driver:
        with pytest.raises(WorkloadStartError, match="cannot execute"):
            await driver.apply(bad)
        state = await driver.inspect("bad")
        assert state.phase == "failed"
        assert "/nonexistent/binary" in state.reason
        assert state.to_status().phase == "failed"
        with pytest.raises(WorkloadStartError, match="/nonexistent/dir"):
            await driver.apply(spec("nodir", "true", working_dir="/nonexistent/dir"))


async def test_log_rotation_is_bounded(logs_dir: Path) -> None:
    script = 'i=0; while [ $i -lt 3000 ]; do echo "line-$i"; i=$((i+1)); done'
    async with ProcessDriver("a1", logs_dir, log_max_bytes=4096, log_backups=2) as driver:
        await driver.apply(spec("chatty", script))

        async def done() -> bool:
            return (await driver.inspect("chatty")).phase == "exited"

        await wait_until(done)
        files = log_files(logs_dir / "chatty.log")
        assert len(files) == 3
        assert all(f.stat().st_size <= 4096 for f in files)
        assert await driver.logs("chatty", tail=2) == "line-2998\nline-2999\n"
        kept = (await driver.logs("chatty")).splitlines()
        # contiguous lines, the newest last, oldest rotated away
        assert kept[-1] == "line-2999"
        first = int(kept[1].removeprefix("line-"))
        assert kept[1:] == [f"line-{i}" for i in range(first, 3000)]
        assert first > 0


async def test_aclose_stops_children(logs_dir: Path) -> None:
    async with ProcessDriver("a1", logs_dir) as driver:
        handle = await driver.apply(spec("svc", "sleep 30"))
    assert not alive(int(handle.runtime_id))


def write_pidfile(path: Path, pid: int, start: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {start}\n")


async def test_leftover_process_group_is_killed_on_start(logs_dir: Path) -> None:
    orphan = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
    try:
        pidfile = logs_dir / "old.pid"
        await asyncio.to_thread(write_pidfile, pidfile, orphan.pid, _proc_start_time(orphan.pid))
        async with ProcessDriver("a1", logs_dir):
            pass
        async with asyncio.timeout(30):
            assert await orphan.wait() == -signal.SIGKILL
        assert not await asyncio.to_thread(pidfile.exists)
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()


async def test_stale_pidfile_of_another_process_is_ignored(logs_dir: Path) -> None:
    bystander = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
    try:
        # same pid, another start time: the pid was reused, leave that process alone
        await asyncio.to_thread(write_pidfile, logs_dir / "old.pid", bystander.pid, 1)
        async with ProcessDriver("a1", logs_dir):
            pass
        assert alive(bystander.pid)
    finally:
        bystander.kill()
        await bystander.wait()
