"""Two fixes around aiomqtt shared by the agent's link, the relay and the hub.

* :func:`connected`: ``async with client`` that never leaks the client's socket.
* :func:`counted_queue`: the incoming message queue, bounded, overflow counted.

**Connecting.** aiomqtt 2.5's ``Client.__aenter__`` does not clean up when it is
cancelled while it waits for the broker's CONNACK: paho's socket, already
connected, stays open until the garbage collector finds it (a ``ResourceWarning``
in the tests; in a daemon, a file descriptor held per connect cut short by a
timeout or a shutdown). :func:`connected` closes it whichever way the connection
ends.

**Incoming queue.** aiomqtt hands each received message to an ``asyncio.Queue`` (its ``queue_type``)
and, when that queue is full, drops the message with a log line and nothing
else: no count a daemon could report. The message was already acknowledged to
the broker (QoS 1), so what depends on it must come again by the protocol's own
resend (a device's unacknowledged DELTAS, a relay's unacknowledged BATCH).

:func:`counted_queue` makes the queue class a client uses: the same bound and
the same drop-newest policy, with every drop reported to a callback and logged
once per :data:`LOG_EVERY` drops instead of once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["LOG_EVERY", "connected", "counted_queue"]

log = logging.getLogger(__name__)

LOG_EVERY: Final = 1000
"""A warning for the first drop and then for every this many."""


@contextlib.asynccontextmanager
async def connected(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    """``async with client``, closing its socket however the connection ends.

    On a clean exit aiomqtt disconnects and paho closes the socket itself; this
    adds the close for a connect that fails or is cancelled half way, and for a
    disconnect cut short.
    """
    try:
        async with client:
            yield client
    finally:
        _close_socket(client)


def _close_socket(client: aiomqtt.Client) -> None:
    # aiomqtt keeps its paho client private and paho's close is private too: no
    # public call closes a socket whose CONNACK never came. paho's _sock_close
    # also tells aiomqtt (its socket-close callback) to stop watching the fd.
    paho = getattr(client, "_client", None)
    close = getattr(paho, "_sock_close", None)
    if close is not None:
        close()


def counted_queue(name: str, on_overflow: Callable[[], None]) -> type[asyncio.Queue[Any]]:
    """A queue class for ``aiomqtt.Client(queue_type=...)`` that counts its drops.

    Args:
        name: what the client is, for the log line (e.g. ``"relay uplink"``).
        on_overflow: called once per message dropped because the queue was full.

    Returns:
        An ``asyncio.Queue`` subclass; aiomqtt sizes it from
        ``max_queued_incoming_messages``.
    """

    class CountedQueue(asyncio.Queue[Any]):
        dropped = 0

        def put_nowait(self, item: Any) -> None:
            if self.maxsize > 0 and self.qsize() >= self.maxsize:
                CountedQueue.dropped += 1
                on_overflow()
                if CountedQueue.dropped % LOG_EVERY == 1:
                    log.warning(
                        "%s: incoming MQTT queue full (%d): dropped %d message(s) so far; "
                        "their senders resend what was not acknowledged",
                        name,
                        self.maxsize,
                        CountedQueue.dropped,
                    )
                return
            super().put_nowait(item)

    return CountedQueue
