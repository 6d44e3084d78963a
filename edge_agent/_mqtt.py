"""aiomqtt's incoming message queue, bounded, with its overflow counted.

aiomqtt hands each received message to an ``asyncio.Queue`` (its ``queue_type``)
and, when that queue is full, drops the message with a log line and nothing
else: no count a daemon could report. The message was already acknowledged to
the broker (QoS 1), so what depends on it must come again by the protocol's own
resend (a device's unacknowledged DELTAS, a relay's unacknowledged BATCH).

:func:`counted_queue` makes the queue class a client uses: the same bound and
the same drop-newest policy, with every drop reported to a callback and logged
once per :data:`LOG_EVERY` drops instead of once each. Shared by the agent's
link, the relay and the hub's reconciler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

__all__ = ["LOG_EVERY", "counted_queue"]

log = logging.getLogger(__name__)

LOG_EVERY: Final = 1000
"""A warning for the first drop and then for every this many."""


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
