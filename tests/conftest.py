"""Suite-wide configuration: hypothesis profiles and shared fixtures."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# A real Mosquitto broker the test can kill and restart.
from tests.fixtures_mqtt import mosquitto  # noqa: F401

# Real runtimes (Podman service, libvirt test driver) for the driver tests.
from tests.fixtures_runtime import libvirt_uri, podman_owner, podman_service  # noqa: F401

# "ci" keeps the example counts the tests ask for (>= 200 for properties) and
# drops the per-example deadline: the machine is shared and noisy.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# A test's event loop that hangs shows only ``selector.select`` in pytest-timeout's
# thread dump. Shortly before the timeout, print every asyncio task's stack too.
_TASK_DUMP_AFTER_S = float(os.environ.get("NOVACRON_TASK_DUMP_S", "540"))


@pytest.fixture(autouse=True)
def _dump_asyncio_tasks_before_timeout() -> Iterator[None]:
    done = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []
    original = asyncio.BaseEventLoop.run_forever

    def run_forever(self: asyncio.BaseEventLoop) -> None:
        loops.append(self)
        original(self)

    def dump() -> None:
        if done.wait(_TASK_DUMP_AFTER_S):
            return
        for loop in list(loops):
            if loop.is_running():
                loop.call_soon_threadsafe(_print_tasks, loop)

    asyncio.BaseEventLoop.run_forever = run_forever  # type: ignore[method-assign]
    watcher = threading.Thread(target=dump, name="asyncio-task-dump", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        asyncio.BaseEventLoop.run_forever = original  # type: ignore[method-assign]


def _print_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    lines = [f"+++ {len(tasks)} asyncio tasks still pending +++"]
    for task in tasks:
        lines.append(f"task {task.get_name()}:")
        lines += [f"    {line}" for line in _await_chain(task.get_coro())]
    text = "\n".join(lines) + "\n"
    # stderr is captured until the test ends; the file is there at once.
    out = sys.__stderr__ or sys.stderr
    out.write(text)
    out.flush()
    path = Path(tempfile.gettempdir()) / f"novacron-asyncio-tasks-{os.getpid()}.txt"
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


def _await_chain(coro: object) -> list[str]:
    """The frames of a suspended coroutine and of everything it awaits."""
    lines: list[str] = []
    while coro is not None and len(lines) < 40:
        frame = next(
            (f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(coro, a, None))),
            None,
        )
        if frame is not None:
            lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = next(
            (c for a in ("cr_await", "gi_yieldfrom", "ag_await") if (c := getattr(coro, a, None))),
            None,
        )
    if coro is not None:
        lines.append(repr(coro))
    return lines
