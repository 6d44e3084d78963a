"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from edge_agent._service import cancel_until_done

if TYPE_CHECKING:
    import aiomqtt

    from sync.protocol import SyncSession


async def wait_until(predicate: Callable[[], bool], *, within: float = 20.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within`` seconds.

    Polling is deliberate: the state watched lives in real processes, brokers
    and runtimes that offer no event to wait on. The bound is a hang guard, not
    a performance assertion.
    """
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def wait_until_async(
    predicate: Callable[[], Awaitable[bool]], *, within: float = 20.0
) -> None:
    """Like :func:`wait_until`, for a predicate that must await (e.g. a journal read)."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run a coroutine as a task for the block's duration, then cancel it.

    Cancelled with :func:`cancel_until_done`: an MQTT loop in a test can lose a
    single cancellation inside aiomqtt and would keep the test waiting forever
    (seen in CI as a 600 s timeout of a relay test).
    """
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        await cancel_until_done({task})
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure


async def serve_session(
    client: aiomqtt.Client,
    session: SyncSession,
    down: str,
    *,
    pending: list[bytes],
    handle: Callable[[bytes], list[bytes]],
    tick_s: float = 0.1,
) -> None:
    """Play the upstream end of ``session`` on ``client`` until cancelled.

    Sends the session's HELLO, then every ``tick_s`` what the caller appended
    to ``pending`` meanwhile (local updates; the list is emptied in place) and
    the session's timer output, and ``handle``'s replies to each message
    ``client`` receives; everything goes to ``down`` at QoS 1. The caller has
    subscribed ``client`` to the uplink.
    """

    async def send(out: list[bytes]) -> None:
        for data in out:
            await client.publish(down, data, qos=1)

    async def ticker() -> None:
        while True:
            out = pending[:]
            pending.clear()
            await send(out + session.tick())
            await asyncio.sleep(tick_s)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ticker())
        await send(session.start())
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            await send(handle(payload))
