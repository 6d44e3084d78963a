"""Hybrid logical clock (Kulkarni et al., 2014) packed into one 64-bit integer.

A timestamp is ``physical_ms << 16 | counter``: 48 bits of wall-clock milliseconds
since the Unix epoch (good until the year 10889) and a 16-bit logical counter.
Ordinary integer comparison orders timestamps, so they can be stored, compared and
sent as plain ints.

The clock never goes backwards, whatever the wall clock does, and it bounds the
trust put in remote clocks: a remote timestamp whose physical part is more than
``max_skew_ms`` ahead of local physical time either is rejected with
:class:`~sync._exceptions.ClockSkewError` (:meth:`HybridLogicalClock.update`) or
moves this clock only up to the bound (:meth:`HybridLogicalClock.observe`, which
the sync protocol uses); both are counted. Either way a gateway that boots with
its clock in 2040 cannot drag its peers' clocks, and with them their own writes,
into 2040. (Every scope has a single writer, see :mod:`sync.protocol`, so data
that carries a skewed writer's timestamps races only with that writer's own,
which its clock already orders.) A node's own history is another matter:
:meth:`HybridLogicalClock.adopt` takes its own timestamps back in full, skew or
not, so it never issues a timestamp below one it wrote before.

Counter overflow: when the 16-bit counter would pass 65535 within one millisecond,
the clock moves its physical part forward by one millisecond and restarts the
counter at zero. In the packed form this is simply ``ts + 1`` carrying into the
physical bits, so the clock stays strictly monotonic; it runs at most a few
milliseconds ahead of the wall clock under a burst of more than 65,536 events per
millisecond and falls back in step as soon as the wall clock catches up.
"""

from __future__ import annotations

import time
from typing import Protocol

from sync._exceptions import ClockSkewError, CrdtError

__all__ = [
    "COUNTER_BITS",
    "MAX_COUNTER",
    "MAX_PHYSICAL_MS",
    "MAX_TIMESTAMP",
    "Clock",
    "HybridLogicalClock",
    "SystemClock",
    "pack_ts",
    "unpack_ts",
]

COUNTER_BITS = 16
"""Bits of the logical counter in a packed timestamp."""
MAX_COUNTER = (1 << COUNTER_BITS) - 1
"""Largest logical counter value (65535)."""
MAX_PHYSICAL_MS = (1 << 48) - 1
"""Largest physical part, in milliseconds since the epoch."""
MAX_TIMESTAMP = (1 << 64) - 1
"""Largest packed timestamp."""


class Clock(Protocol):
    """Source of wall-clock time, injected so tests and the simulator control it."""

    def now_ms(self) -> int:
        """Return the current wall-clock time in milliseconds since the Unix epoch."""
        ...


class SystemClock:
    """The real wall clock (``time.time_ns``)."""

    def now_ms(self) -> int:
        """Return the system time in milliseconds since the Unix epoch."""
        return time.time_ns() // 1_000_000


def pack_ts(physical_ms: int, counter: int) -> int:
    """Pack a physical time and a logical counter into one timestamp.

    Args:
        physical_ms: milliseconds since the epoch, ``0 <= physical_ms < 2**48``.
        counter: logical counter, ``0 <= counter <= 65535``.

    Returns:
        ``physical_ms << 16 | counter``.

    Raises:
        CrdtError: a part is out of range.
    """
    if not 0 <= physical_ms <= MAX_PHYSICAL_MS:
        raise CrdtError(f"HLC physical part out of range: {physical_ms}")
    if not 0 <= counter <= MAX_COUNTER:
        raise CrdtError(f"HLC counter out of range: {counter}")
    return physical_ms << COUNTER_BITS | counter


def unpack_ts(ts: int) -> tuple[int, int]:
    """Split a packed timestamp into ``(physical_ms, counter)``.

    Raises:
        CrdtError: ``ts`` is not a 64-bit unsigned integer.
    """
    _check_ts(ts)
    return ts >> COUNTER_BITS, ts & MAX_COUNTER


def _check_ts(ts: object) -> None:
    if type(ts) is not int or not 0 <= ts <= MAX_TIMESTAMP:
        raise CrdtError(f"invalid HLC timestamp: {ts!r}")


class HybridLogicalClock:
    """A hybrid logical clock over an injected wall clock.

    Args:
        clock: the wall-clock source.
        max_skew_ms: how far ahead of local physical time a remote timestamp may be
            before :meth:`update` rejects it (default five minutes).
        last: the last timestamp issued, e.g. restored from a journal so that a
            restarted process never reissues an old timestamp.

    Attributes:
        skew_rejections: how many remote timestamps :meth:`update` rejected.
        skew_clamped: how many remote timestamps :meth:`observe` clamped.
    """

    __slots__ = ("_clock", "_last", "max_skew_ms", "skew_clamped", "skew_rejections")

    def __init__(self, clock: Clock, max_skew_ms: int = 300_000, last: int = 0) -> None:
        if max_skew_ms < 0:
            raise ValueError("max_skew_ms must be >= 0")
        _check_ts(last)
        self._clock = clock
        self.max_skew_ms = max_skew_ms
        self._last = last
        self.skew_rejections = 0
        self.skew_clamped = 0

    @property
    def last(self) -> int:
        """The most recent timestamp issued or observed (0 before the first)."""
        return self._last

    def _physical(self) -> int:
        ms = self._clock.now_ms()
        # A clock before the epoch or past 2**48 ms is clamped, not trusted blindly.
        return min(max(ms, 0), MAX_PHYSICAL_MS)

    def now(self) -> int:
        """Issue a timestamp for a local or send event.

        Returns:
            A timestamp strictly greater than every one issued or observed before.
        """
        wall = self._physical() << COUNTER_BITS
        last = self._last
        # ``last + 1`` carries a full counter into the physical part: see module doc.
        ts = wall if wall > last else last + 1
        self._last = ts
        return ts

    def update(self, remote_ts: int) -> int:
        """Observe a remote timestamp (receive event) and issue a new local one.

        Args:
            remote_ts: a packed timestamp received from a peer.

        Returns:
            A timestamp strictly greater than both ``remote_ts`` and every timestamp
            issued or observed before.

        Raises:
            ClockSkewError: the remote physical time is more than ``max_skew_ms``
                ahead of local physical time; the clock is left unchanged and
                :attr:`skew_rejections` is incremented.
            CrdtError: ``remote_ts`` is not a valid packed timestamp.
        """
        _check_ts(remote_ts)
        physical = self._physical()
        remote_ms = remote_ts >> COUNTER_BITS
        if remote_ms - physical > self.max_skew_ms:
            self.skew_rejections += 1
            raise ClockSkewError(remote_ms, physical, self.max_skew_ms)
        wall = physical << COUNTER_BITS
        last = max(self._last, remote_ts)
        ts = wall if wall > last else last + 1
        self._last = ts
        return ts

    def observe(self, remote_ts: int) -> bool:
        """Observe a remote timestamp, moving at most ``max_skew_ms`` ahead.

        Unlike :meth:`update`, a timestamp too far ahead is not refused: this
        clock moves up to the end of the bound (local physical time plus
        ``max_skew_ms``) instead, and :attr:`skew_clamped` is incremented. The
        data that carried it is still accepted by the caller.

        Returns:
            ``True`` if ``remote_ts`` was within the bound, ``False`` if clamped.

        Raises:
            CrdtError: ``remote_ts`` is not a valid packed timestamp.
        """
        _check_ts(remote_ts)
        physical = self._physical()
        bound = min(physical + self.max_skew_ms, MAX_PHYSICAL_MS) << COUNTER_BITS | MAX_COUNTER
        within = remote_ts <= bound
        if not within:
            self.skew_clamped += 1
            remote_ts = bound
        self._last = max(self._last, remote_ts)
        return within

    def adopt(self, own_ts: int) -> None:
        """Take back a timestamp this node issued itself (e.g. from its journal).

        No skew bound applies: the clock must stay above everything this node
        ever wrote, or its next write would lose to its own older ones.

        Raises:
            CrdtError: ``own_ts`` is not a valid packed timestamp.
        """
        _check_ts(own_ts)
        self._last = max(self._last, own_ts)
