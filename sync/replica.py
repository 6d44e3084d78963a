"""A node's synced state: LWW scopes and bounded, sequenced event streams.

Shared by every :class:`~sync.protocol.SyncSession` of the node; kept apart
from the protocol so the state machine stays readable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sync.crdt import LwwMap
from sync.hlc import HybridLogicalClock

__all__ = ["EventStream", "InboundStream", "Replica"]


class EventStream:
    """An append-only, bounded outbound stream with per-stream sequence numbers.

    Items get seqs ``1, 2, ...``. They stay until :meth:`release` (the peer
    acknowledged them at the application level). When ``capacity`` is reached
    the oldest item is dropped and counted in :attr:`dropped`: never silently.

    Args:
        name: stream name.
        capacity: most items held.
    """

    def __init__(self, name: str, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.name = name
        self.capacity = capacity
        self._items: deque[Any] = deque()
        self.first_seq = 1
        self.dropped = 0

    @property
    def next_seq(self) -> int:
        """Seq the next appended item will get."""
        return self.first_seq + len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: Any) -> int:
        """Append an item (msgpack-friendly); return its seq."""
        if len(self._items) >= self.capacity:
            self._items.popleft()
            self.first_seq += 1
            self.dropped += 1
        self._items.append(item)
        return self.next_seq - 1

    def read(self, from_seq: int, limit: int) -> tuple[int, list[Any]]:
        """Return ``(seq of the first item, items)``, at most ``limit`` of them.

        Items released or dropped before ``from_seq`` are skipped: the result
        starts at ``max(from_seq, first_seq)``.
        """
        start = max(from_seq, self.first_seq)
        offset = start - self.first_seq
        end = min(len(self._items), offset + limit)
        return start, [self._items[i] for i in range(offset, end)]

    def release(self, upto_seq: int) -> None:
        """Forget every item with a seq below ``upto_seq``."""
        while self._items and self.first_seq < upto_seq:
            self._items.popleft()
            self.first_seq += 1


@dataclass
class InboundStream:
    """Events received from a peer's stream, in order, with the next seq wanted."""

    next_seq: int = 1
    items: list[Any] = field(default_factory=list)
    skipped: int = 0
    """Events the sender dropped (its quota) before we got them."""


class Replica:
    """The synced state of one node: LWW scopes and event streams.

    Args:
        replica_id: this node's origin id (the ``origin`` of its dots).
        hlc: the node's hybrid logical clock.
    """

    def __init__(self, replica_id: str, hlc: HybridLogicalClock) -> None:
        self.replica_id = replica_id
        self.hlc = hlc
        self.scopes: dict[str, LwwMap] = {}
        self.streams: dict[str, EventStream] = {}
        self.inbox: dict[tuple[str, str], InboundStream] = {}

    def scope(self, name: str) -> LwwMap:
        """The map of scope ``name``, created empty on first use."""
        m = self.scopes.get(name)
        if m is None:
            m = self.scopes[name] = LwwMap()
        return m

    def set(self, scope: str, key: str, value: Any) -> LwwMap:
        """Write ``key = value`` in ``scope`` now; return the delta."""
        return self.scope(scope).set(key, value, ts=self.hlc.now(), origin=self.replica_id)

    def delete(self, scope: str, key: str) -> LwwMap:
        """Delete ``key`` from ``scope`` now; return the delta."""
        return self.scope(scope).delete(key, ts=self.hlc.now(), origin=self.replica_id)

    def observe_entries(self, entries: list[list[Any]]) -> bool:
        """Move the clock past merged wire entries' timestamps.

        Entries this node wrote itself (its own history, e.g. handed back after
        its journal was lost) are adopted in full; anyone else's move the clock
        at most ``max_skew_ms`` ahead of local time
        (:meth:`~sync.hlc.HybridLogicalClock.observe`).

        Returns:
            ``False`` if a timestamp was clamped (too far ahead), else ``True``.
        """
        own = other = 0
        for e in entries:
            if e[2] == self.replica_id:
                own = max(own, e[1])
            else:
                other = max(other, e[1])
        if own:
            self.hlc.adopt(own)
        return self.hlc.observe(other) if other else True

    def stream(self, name: str, capacity: int = 10_000) -> EventStream:
        """The outbound stream ``name``, created on first use."""
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = EventStream(name, capacity)
        return s
