"""A node's synced state: LWW scopes and bounded, sequenced event streams.

Shared by every :class:`~sync.protocol.SyncSession` of the node; kept apart
from the protocol so the state machine stays readable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

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


class _Inbox(dict[tuple[str, str], InboundStream]):
    """:attr:`Replica.inbox`: a plain dict that also indexes its keys by peer.

    A relay's inbox holds a stream of every device of its region, and each
    device session's HELLO needs only that device's: the index spares a scan
    of the whole inbox per HELLO. Every mutating dict method keeps it.
    """

    __slots__ = ("_by_peer",)

    def __init__(self) -> None:
        super().__init__()
        self._by_peer: dict[str, set[str]] = {}

    def of_peer(self, peer: str) -> list[tuple[str, InboundStream]]:
        """``(stream, inbound)`` of ``peer``, sorted by stream."""
        streams = self._by_peer.get(peer)
        if not streams:
            return []
        return [(st, dict.__getitem__(self, (peer, st))) for st in sorted(streams)]

    def _forget(self, key: tuple[str, str]) -> None:
        streams = self._by_peer.get(key[0])
        if streams is not None:
            streams.discard(key[1])
            if not streams:
                del self._by_peer[key[0]]

    def __setitem__(self, key: tuple[str, str], value: InboundStream) -> None:
        super().__setitem__(key, value)
        self._by_peer.setdefault(key[0], set()).add(key[1])

    def setdefault(self, key: tuple[str, str], default: InboundStream) -> InboundStream:
        value = self.get(key)
        if value is None and key not in self:
            self[key] = value = default
        return value  # type: ignore[return-value]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> Self:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __delitem__(self, key: tuple[str, str]) -> None:
        super().__delitem__(key)
        self._forget(key)

    def pop(self, key: tuple[str, str], *default: Any) -> Any:
        if key in self:
            value = super().pop(key)
            self._forget(key)
            return value
        return super().pop(key, *default)

    def popitem(self) -> tuple[tuple[str, str], InboundStream]:
        key, value = super().popitem()
        self._forget(key)
        return key, value

    def clear(self) -> None:
        super().clear()
        self._by_peer.clear()


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
        self.inbox = _Inbox()

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

    def inbound_of(self, peer: str) -> list[tuple[str, InboundStream]]:
        """``(stream, inbound)`` of every stream received from ``peer``, sorted by stream."""
        return self.inbox.of_peer(peer)

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
