"""In-memory stand-ins for tests and the deterministic simulator.

:class:`ManualClock` is a wall clock that moves only when told to (Trio's
``MockClock`` idea); :class:`LossyNetwork` is a seeded in-memory network that
loses, duplicates and reorders messages and can be partitioned. Both are
deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

__all__ = ["LossyNetwork", "ManualClock"]


class ManualClock:
    """A :class:`~sync.hlc.Clock` whose time is set by the test.

    Args:
        start_ms: initial time in milliseconds since the epoch.
    """

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.ms = start_ms

    def now_ms(self) -> int:
        """Return the current manual time."""
        return self.ms

    def advance(self, ms: int) -> None:
        """Move time by ``ms`` (negative values jump backwards, like a bad NTP step)."""
        self.ms += ms

    def set(self, ms: int) -> None:
        """Jump to an absolute time."""
        self.ms = ms


class LossyNetwork:
    """A seeded in-memory network between named peers.

    Messages are kept in one pool and :meth:`pop` takes a random one, so delivery
    order is arbitrary. On :meth:`send` a message may be lost (``loss``) or
    duplicated (``duplicate``); messages between partitioned peers are lost. The
    pool is bounded: past ``capacity`` a message is dropped and counted.

    Args:
        seed: seed of the private random generator.
        loss: probability that a sent message is lost.
        duplicate: probability that a sent message is delivered twice.
        capacity: most messages in flight.

    Attributes:
        sent, lost, duplicated, overflowed, delivered: counters.
    """

    def __init__(
        self,
        seed: int,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        capacity: int = 100_000,
    ) -> None:
        self._rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.capacity = capacity
        self._pool: list[tuple[str, str, bytes]] = []
        self._cut: set[frozenset[str]] = set()
        self.sent = 0
        self.lost = 0
        self.duplicated = 0
        self.overflowed = 0
        self.delivered = 0

    def __len__(self) -> int:
        return len(self._pool)

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        """Cut every link between a peer of ``side_a`` and a peer of ``side_b``.

        Messages already in flight across the cut are lost too.
        """
        b = list(side_b)
        for x in side_a:
            for y in b:
                if x != y:
                    self._cut.add(frozenset((x, y)))
        kept = [m for m in self._pool if frozenset((m[0], m[1])) not in self._cut]
        self.lost += len(self._pool) - len(kept)
        self._pool = kept

    def heal(self) -> None:
        """Remove every partition."""
        self._cut.clear()

    def connected(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` can currently talk."""
        return frozenset((a, b)) not in self._cut

    def send(self, src: str, dst: str, data: bytes) -> None:
        """Put a message in flight (maybe losing or duplicating it)."""
        self.sent += 1
        if not self.connected(src, dst) or self._rng.random() < self.loss:
            self.lost += 1
            return
        copies = 2 if self._rng.random() < self.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            if len(self._pool) >= self.capacity:
                self.overflowed += 1
                continue
            self._pool.append((src, dst, data))

    def send_all(self, src: str, dst: str, messages: Iterable[bytes]) -> None:
        """:meth:`send` each message in turn."""
        for m in messages:
            self.send(src, dst, m)

    def pop(self) -> tuple[str, str, bytes] | None:
        """Take a random in-flight message ``(src, dst, data)``, or ``None``."""
        if not self._pool:
            return None
        i = self._rng.randrange(len(self._pool))
        self._pool[i], self._pool[-1] = self._pool[-1], self._pool[i]
        self.delivered += 1
        return self._pool.pop()
