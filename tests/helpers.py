"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


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
