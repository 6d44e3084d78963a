"""Fleet events for server-sent events: a publish/subscribe bus that never blocks.

Publishers (the enrollment service, the fleet controller, the reconciler) call
:meth:`EventBus.publish` from the event loop; it only appends to each
subscriber's bounded queue and wakes the subscriber, so a slow SSE client can
never hold up the hub. A subscriber whose queue is full loses its *oldest*
events (drop-oldest: what is still queued is the most recent picture of the
fleet); the losses are counted per subscriber and in total, and the subscriber
receives a ``dropped`` event (``{"count": N}``) before the events that
survived, so a client knows it missed some and can re-read the state.

Example::

    bus = EventBus(queue_size=256)
    with bus.subscribe() as sub:
        bus.publish("device.enrolled", {"id": "dev-1"})
        event = await sub.get(timeout=15.0)   # None on timeout
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cloud_hub._closing import Closing

__all__ = ["DEFAULT_QUEUE_SIZE", "DROPPED", "Event", "EventBus", "Subscription"]

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE: Final = 256
DROPPED: Final = "dropped"
"""Kind of the notice a subscriber gets after its queue overflowed."""


@dataclass(frozen=True, slots=True)
class Event:
    """One fleet event.

    Attributes:
        kind: what happened (``device.enrolled``, ``deployment.applied``, ...).
        data: JSON-ready details.
        seq: the bus's sequence number (1, 2, ...; 0 for a ``dropped`` notice).
    """

    kind: str
    data: Mapping[str, Any]
    seq: int = 0


class Subscription(Closing):
    """One subscriber's bounded queue; use :meth:`EventBus.subscribe`."""

    def __init__(self, bus: EventBus, queue_size: int) -> None:
        """Make an empty subscription of ``bus`` (not yet registered)."""
        self._bus = bus
        self._queue: deque[Event] = deque(maxlen=queue_size)
        self._wake = asyncio.Event()
        self._pending_dropped = 0
        self.dropped = 0
        """Events this subscriber lost to overflow, in total."""
        self.closed = False

    def _push(self, event: Event) -> None:
        if len(self._queue) == self._queue.maxlen:
            self._pending_dropped += 1
            self.dropped += 1
            self._bus.dropped_total += 1
        self._queue.append(event)  # a full deque drops its oldest item
        self._wake.set()

    def _close(self) -> None:
        self.closed = True
        self._wake.set()

    async def get(self, timeout: float | None = None) -> Event | None:  # noqa: ASYNC109
        """Return the next event, a ``dropped`` notice, or None.

        Args:
            timeout: seconds to wait for an event (None: until one comes).

        Returns:
            None when the timeout passed with nothing queued, or once the
            subscription (or the bus) is closed and the queue is drained.
        """
        while True:
            if self._pending_dropped:
                count, self._pending_dropped = self._pending_dropped, 0
                return Event(DROPPED, {"count": count})
            if self._queue:
                return self._queue.popleft()
            if self.closed:
                return None
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                return None

    def close(self) -> None:
        """Unsubscribe; a pending :meth:`get` returns what is queued, then None."""
        self._bus._unsubscribe(self)
        self._close()


class EventBus:
    """Fan-out of fleet events to subscribers, each with a bounded queue.

    Not thread-safe: publish and subscribe from the event loop's thread.

    Attributes:
        published_total: events published so far.
        dropped_total: events lost to full subscriber queues, over all subscribers.
    """

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, max_subscribers: int = 64) -> None:
        """Make a bus.

        Args:
            queue_size: events held per subscriber before the oldest are dropped.
            max_subscribers: subscribers at once; :meth:`subscribe` refuses more.

        Raises:
            ValueError: a size below 1.
        """
        if queue_size < 1 or max_subscribers < 1:
            raise ValueError("queue_size and max_subscribers must be at least 1")
        self._queue_size = queue_size
        self._max_subscribers = max_subscribers
        self._subscribers: list[Subscription] = []
        self._seq = itertools.count(1)
        self._closed = False
        self.published_total = 0
        self.dropped_total = 0

    @property
    def subscribers(self) -> int:
        """How many subscribers there are now."""
        return len(self._subscribers)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def publish(self, kind: str, data: Mapping[str, Any]) -> None:
        """Queue an event for every subscriber; never blocks, never raises for a full queue."""
        if self._closed:
            return
        event = Event(kind, dict(data), next(self._seq))
        self.published_total += 1
        for sub in self._subscribers:
            sub._push(event)
        logger.debug("event %s %s to %d subscribers", event.seq, kind, len(self._subscribers))

    def subscribe(self) -> Subscription:
        """Register a new subscriber (close it, or use it as a context manager).

        Raises:
            OverflowError: ``max_subscribers`` are subscribed already.
        """
        if len(self._subscribers) >= self._max_subscribers:
            raise OverflowError(f"too many event subscribers (at most {self._max_subscribers})")
        sub = Subscription(self, self._queue_size)
        if self._closed:
            sub._close()
        else:
            self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def close(self) -> None:
        """End every subscription (their streams end) and ignore later publishes."""
        self._closed = True
        subs, self._subscribers = self._subscribers, []
        for sub in subs:
            sub._close()
