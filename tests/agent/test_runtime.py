"""Process-level settings of `novacron agent run` (edge_agent/_runtime.py).

The end-to-end test runs the real command in a subprocess, as the systemd
unit does, and checks what it is for: an agent with several process workloads
holds a fixed handful of threads, not one per child.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent._runtime import (
    DEFERRED_IMPORTS,
    IO_THREADS_BASE,
    PROCESS_ENVIRONMENT,
    PYDANTIC_PLUGIN_LOADER,
    _no_pydantic_plugins,
    child_watcher,
    io_executor,
    unit_environment,
)
from edge_agent.control import ControlError, request
from sync.keys import Signer
from sync.models import WorkloadSpec
from tests.agent.agent_harness import enroll_offline, make_config, seed_desired

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


def test_io_executor_is_sized_by_the_enabled_drivers() -> None:
    sizes = {}
    for drivers in (["process"], ["process", "podman"], ["podman", "libvirt", "process"]):
        executor = io_executor(drivers)
        sizes[len(drivers)] = executor._max_workers
        executor.shutdown()
    assert sizes == {1: IO_THREADS_BASE, 2: IO_THREADS_BASE + 4, 3: IO_THREADS_BASE + 6}


def _run_python(code: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_malloc_arena_limit_is_set_in_process_unless_the_environment_set_it() -> None:
    code = "from edge_agent._runtime import limit_malloc_arenas; print(limit_malloc_arenas())"
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    assert _run_python(code, base) == ("True" if glibc else "False")
    assert _run_python(code, base | PROCESS_ENVIRONMENT) == "False"


# What the deferred chains would load; none of it is in an agent's sys.modules.
_DEFERRED_CHAINS = ("urllib.request", "http.client", "importlib.metadata", "zipfile", "tempfile")

_AGENT_IMPORTS = f"""
import json, sys, types
from edge_agent._runtime import defer_unused_imports
deferred = defer_unused_imports()
import edge_agent.agent, edge_agent.config, edge_agent.link  # what `agent run` imports
from sync.models import WorkloadSpec
WorkloadSpec(name="w", driver="process", command=("true",))
loaded = [m for m in {_DEFERRED_CHAINS!r} if type(sys.modules.get(m)) is types.ModuleType]
print(json.dumps([deferred, loaded]))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE_", "PYDANTIC_"))}
    return env | extra


def test_the_agent_s_modules_load_without_the_chains_it_never_uses() -> None:
    env = _clean_env(**PROCESS_ENVIRONMENT)
    deferred, loaded = json.loads(_run_python(_AGENT_IMPORTS, env))
    assert deferred == [*DEFERRED_IMPORTS, PYDANTIC_PLUGIN_LOADER]
    assert loaded == []


def test_pydantic_plugins_load_as_usual_unless_the_environment_turns_them_off() -> None:
    deferred, loaded = json.loads(_run_python(_AGENT_IMPORTS, _clean_env()))
    assert deferred == list(DEFERRED_IMPORTS)
    assert "importlib.metadata" in loaded  # pydantic's loader ran and scanned for plugins
    assert "urllib.request" not in loaded


def test_the_stand_in_answers_as_pydantic_s_loader_does_with_plugins_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loader = importlib.import_module(PYDANTIC_PLUGIN_LOADER)
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "__all__")
    assert tuple(loader.get_plugins()) == _no_pydantic_plugins() == ()


@pytest.mark.skipif(not _pidfd_works(), reason="no pidfd_open on this kernel")
async def test_child_watcher_reaps_children_without_a_thread_each() -> None:
    loop = asyncio.get_running_loop()
    with child_watcher(loop) as pidfd:
        assert pidfd == (sys.version_info < (3, 12))
        before = threading.active_count()
        procs = [
            await asyncio.create_subprocess_exec("sh", "-c", f"exit {code}") for code in (0, 3, 7)
        ]
        during = threading.active_count()
        codes = [await p.wait() for p in procs]
    assert codes == [0, 3, 7]
    assert during == before


async def _prepare(tmp_path: Path, count: int) -> Path:
    """An enrolled, offline agent config with ``count`` sleeping workloads seeded."""
    config, _profile = make_config(tmp_path / "data")
    enroll_offline(config, hub := Signer.generate())
    specs = [
        WorkloadSpec(name=f"w{i}", driver="process", command=("sleep", "600")) for i in range(count)
    ]
    await seed_desired(config, specs, hub)
    path = tmp_path / "agent.yaml"
    data = {
        "device_id": config.device_id,
        "region": config.region,
        "data_dir": str(config.data_dir),
        "profile": config.profile,
        "relays": ["mqtt://127.0.0.1:9"],  # nothing listens: the agent runs offline
        "drivers": ["process"],
    }
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return path


@pytest.mark.skipif(not _pidfd_works(), reason="no pidfd_open on this kernel")
async def test_agent_run_holds_a_few_threads_whatever_its_workload_count(
    tmp_path: Path,
) -> None:
    count = 6
    config_path = await _prepare(tmp_path, count)
    socket_path = tmp_path / "data" / "agent.sock"
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "novacron", "agent", "run", "--config", str(config_path)),
            cwd=REPO,
            env=os.environ | unit_environment(tmp_path / "data"),  # as the systemd unit runs it
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        phases: list[str] = []
        while time.monotonic() < deadline and phases.count("running") < count:
            assert proc.returncode is None, log_path.read_text(errors="replace")
            try:
                rows = await asyncio.to_thread(request, socket_path, {"cmd": "workloads"})
                phases = [row["phase"] for row in rows]
            except (ControlError, OSError):
                pass
            await asyncio.sleep(0.2)
        assert phases.count("running") == count, phases
        # Main thread, the journal's writer and reader, the I/O executor: not
        # one more per child (Python 3.11's default watcher had one each).
        assert _threads(proc.pid) <= 3 + IO_THREADS_BASE
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            raise
    assert code == 0, log_path.read_text(errors="replace")
