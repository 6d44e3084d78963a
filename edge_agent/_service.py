"""The shape shared by long-lived daemons (the agent, the relay): an async
context manager owning an exit stack and a task group of named tasks.

Shared with :mod:`regional_relay` and the simulator's ``FleetStack`` (which
uses only the exit stack). ``aclose()`` cancels the tasks first, then
unwinds what ``_start`` entered (drivers, stores), so stores flush last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from typing import Any, Final, Self

_RECANCEL_S: Final = 1.0
"""How long a cancelled task gets before it is cancelled again (see ``cancel_until_done``)."""


class Service:
    """Base of a daemon: subclasses implement :meth:`_start`."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel every task, then release what the service holds."""
        await self._stack.aclose()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _open_task_group(self) -> None:
        """Enter the task group; on close its tasks are cancelled before it exits."""
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.push_async_callback(self._cancel_tasks)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a named task in the service's group."""
        if self._tg is None:
            coro.close()
            raise RuntimeError("the service's task group is not open")
        task = self._tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel_tasks(self) -> None:
        # The tasks stay the group's to collect.
        await cancel_until_done({task for task in self._tasks if not task.done()})


async def cancel_until_done(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks``, and cancel again what still runs a second later, until all end.

    On Python 3.11 a cancellation racing with ``asyncio.wait_for`` inside a
    library (aiomqtt) can be lost (gh-86296): a single ``cancel()`` followed by
    an ``await`` would then wait for that task forever. Results and exceptions
    stay the caller's to collect.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_S)


def reraise_lost_cancel() -> None:
    """Raise the cancellation an aiomqtt call may have swallowed.

    aiomqtt waits for broker replies with ``asyncio.wait_for``, which on Python
    3.11 drops a cancellation that races with the reply (CPython gh-86296): the
    task would carry on as if never cancelled, and ``aclose()`` would wait for it
    forever. Call it after each such await in a task that never swallows a
    cancellation on purpose, so a pending one is always real. Not in a task
    that owns an ``asyncio.TaskGroup`` whose children may fail: on 3.11 a child
    failing while the group exits leaves the owner's cancellation count raised
    with no cancellation pending (the agent's link task is one; its children
    call this instead).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
