"""Dots and version vectors with gap tracking.

A :class:`Dot` ``(origin, counter)`` names one mutation: the ``counter``-th event
made by replica ``origin`` (counters start at 1). A :class:`VersionVector` is the
set of dots a replica has seen, stored compactly per origin as a contiguous prefix
``1..max`` plus the set of counters seen out of order above it. Deltas may arrive
reordered, duplicated or after a loss, so the gaps matter: a replica can tell a
peer exactly which dots it lacks instead of asking for everything after ``max``.

Wire form (:meth:`VersionVector.to_wire`) is a plain ``dict`` that msgpack carries:
``{origin: max}`` when there is no gap, ``{origin: [max, [[lo, hi], ...]]}`` with
sorted, disjoint inclusive ranges above ``max + 1`` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple, Self

from sync._exceptions import CrdtError

__all__ = ["MAX_COUNTER_VALUE", "MAX_GAP_COUNTERS", "Dot", "VersionVector", "check_dot"]

MAX_COUNTER_VALUE = (1 << 63) - 1
"""Largest dot counter accepted from the wire."""
MAX_GAP_COUNTERS = 100_000
"""Most out-of-order counters :meth:`VersionVector.from_wire` accepts in total."""
_MAX_ORIGIN_LEN = 256


class Dot(NamedTuple):
    """One mutation: the ``counter``-th event (from 1) of replica ``origin``."""

    origin: str
    counter: int


def _ranges(counters: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for c in sorted(counters):
        if out and out[-1][1] + 1 == c:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


class VersionVector:
    """A set of dots, stored per origin as a contiguous prefix plus gaps.

    Mutable; :meth:`copy` before sharing. Equality is set equality.
    """

    __slots__ = ("_extra", "_gen", "_max")

    def __init__(self, maxes: Mapping[str, int] | None = None) -> None:
        """Create a vector holding, per origin, every counter ``1..maxes[origin]``."""
        self._max: dict[str, int] = {o: m for o, m in maxes.items() if m > 0} if maxes else {}
        self._extra: dict[str, set[int]] = {}
        self._gen = 0

    @property
    def generation(self) -> int:
        """A count of this object's changes: the same value means the same dots.

        It moves whenever a dot is added (dots are never removed), so a caller
        holding this very object can tell "unchanged since" without comparing
        the sets. Meaningless across two objects (a copy starts again at 0).
        """
        return self._gen

    # -- queries ---------------------------------------------------------------

    def contiguous(self, origin: str) -> int:
        """Highest counter ``n`` of ``origin`` such that ``1..n`` are all present."""
        return self._max.get(origin, 0)

    def highest(self, origin: str) -> int:
        """Highest counter of ``origin`` present (0 if none)."""
        extra = self._extra.get(origin)
        if extra:
            return max(extra)
        return self._max.get(origin, 0)

    def next_counter(self, origin: str) -> int:
        """The counter a new local event of ``origin`` should use."""
        return self.highest(origin) + 1

    def gaps(self, origin: str) -> list[tuple[int, int]]:
        """Missing inclusive ranges of ``origin`` below its highest counter."""
        extra = self._extra.get(origin)
        if not extra:
            return []
        out: list[tuple[int, int]] = []
        prev = self._max.get(origin, 0)
        for lo, hi in _ranges(extra):
            out.append((prev + 1, lo - 1))
            prev = hi
        return out

    def origins(self) -> list[str]:
        """Origins with at least one dot, sorted."""
        return sorted(set(self._max) | set(self._extra))

    def contains(self, origin: str, counter: int) -> bool:
        """Whether dot ``(origin, counter)`` is present."""
        if counter <= self._max.get(origin, 0):
            return True
        extra = self._extra.get(origin)
        return extra is not None and counter in extra

    def __contains__(self, dot: object) -> bool:
        if not isinstance(dot, tuple) or len(dot) != 2:
            return False
        origin, counter = dot
        if counter <= self._max.get(origin, 0):
            return True
        extra = self._extra.get(origin)
        return extra is not None and counter in extra

    def __iter__(self) -> Iterator[Dot]:
        """Iterate every dot (use with care on large vectors)."""
        for origin in self.origins():
            for c in range(1, self._max.get(origin, 0) + 1):
                yield Dot(origin, c)
            for c in sorted(self._extra.get(origin, ())):
                yield Dot(origin, c)

    def __len__(self) -> int:
        n = sum(self._max.values())
        if self._extra:
            n += sum(map(len, self._extra.values()))
        return n

    def __bool__(self) -> bool:
        return bool(self._max) or bool(self._extra)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VersionVector):
            return NotImplemented
        return self._max == other._max and self._extra == other._extra

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"VersionVector({self.to_wire()!r})"

    def dominates(self, other: VersionVector) -> bool:
        """Whether every dot of ``other`` is also in ``self``."""
        for origin, m in other._max.items():
            if m > self._max.get(origin, 0):
                # Counters above our prefix must all be among our extras.
                extra = self._extra.get(origin, set())
                start = self._max.get(origin, 0) + 1
                if m - start + 1 > len(extra):
                    return False
                if any(c not in extra for c in range(start, m + 1)):
                    return False
        for origin, extra in other._extra.items():
            m = self._max.get(origin, 0)
            mine = self._extra.get(origin, set())
            for c in extra:
                if c > m and c not in mine:
                    return False
        return True

    def missing_from(self, other: VersionVector) -> dict[str, list[tuple[int, int]]]:
        """Dots that ``other`` has and ``self`` lacks, as inclusive ranges per origin.

        A replica calls ``mine.missing_from(peer_claim)`` to ask a peer for exactly
        what it lacks.
        """
        out: dict[str, list[tuple[int, int]]] = {}
        for origin in other.origins():
            theirs = other._max.get(origin, 0)
            counters: set[int] = set(other._extra.get(origin, ()))
            mine_max = self._max.get(origin, 0)
            mine_extra = self._extra.get(origin, set())
            ranges: list[tuple[int, int]] = []
            # The contiguous part of ``other`` above our prefix, minus our extras.
            lo = mine_max + 1
            # Walk our extras inside [lo, theirs] to cut the range into pieces.
            if theirs >= lo:
                cuts = sorted(c for c in mine_extra if lo <= c <= theirs)
                start = lo
                for c in cuts:
                    if c > start:
                        ranges.append((start, c - 1))
                    start = c + 1
                if start <= theirs:
                    ranges.append((start, theirs))
            extra_missing = [c for c in counters if c > mine_max and c not in mine_extra]
            if extra_missing:
                ranges.extend((lo_, hi_) for lo_, hi_ in _ranges(extra_missing))
                ranges = _merge_ranges(ranges)
            if ranges:
                out[origin] = ranges
        return out

    # -- mutation ----------------------------------------------------------------

    def add(self, dot: tuple[str, int]) -> bool:
        """Add a dot; return whether it was new."""
        return self.add_counter(dot[0], dot[1])

    def add_counter(self, origin: str, counter: int) -> bool:
        """Add dot ``(origin, counter)``; return whether it was new."""
        m = self._max.get(origin, 0)
        if counter <= m:
            return False
        self._gen += 1  # (also when the dot is already among the extras: harmless)
        if counter == m + 1:
            extra = self._extra.get(origin)
            if extra:
                m = counter + 1
                while m in extra:
                    extra.discard(m)
                    m += 1
                self._max[origin] = m - 1
                if not extra:
                    del self._extra[origin]
            else:
                self._max[origin] = counter
            return True
        extra = self._extra.get(origin)
        if extra is None:
            self._extra[origin] = {counter}
            return True
        if counter in extra:
            return False
        extra.add(counter)
        return True

    def add_range(self, origin: str, lo: int, hi: int) -> None:
        """Add every counter ``lo..hi`` (inclusive) of ``origin``."""
        m = self._max.get(origin, 0)
        if hi <= m:
            return
        self._gen += 1
        if lo <= m + 1:
            self._max[origin] = m = hi
            extra = self._extra.get(origin)
            if extra:
                extra.difference_update([c for c in extra if c <= hi])
                m += 1
                while m in extra:
                    extra.discard(m)
                    m += 1
                self._max[origin] = m - 1
                if not extra:
                    del self._extra[origin]
            return
        self._extra.setdefault(origin, set()).update(range(lo, hi + 1))

    def merge(self, other: VersionVector) -> None:
        """In place: add every dot of ``other`` (set union)."""
        for origin, m in other._max.items():
            self.add_range(origin, 1, m)
        for origin, extra in other._extra.items():
            mine = self._max.get(origin, 0)
            for c in extra:
                if c > mine:
                    self.add_counter(origin, c)
                    mine = self._max.get(origin, 0)

    def union(self, other: VersionVector) -> VersionVector:
        """Return a new vector holding the dots of both."""
        out = self.copy()
        out.merge(other)
        return out

    def meet(self, other: VersionVector) -> VersionVector:
        """Return a new vector holding the dots present in both (set intersection).

        The meet of the vectors every replica of a scope acknowledged is the set of
        dots all of them have seen.
        """
        out = VersionVector()
        for origin in set(self._max) | set(self._extra):
            if origin not in other._max and origin not in other._extra:
                continue
            ma, mb = self._max.get(origin, 0), other._max.get(origin, 0)
            ea, eb = self._extra.get(origin, set()), other._extra.get(origin, set())
            lo = min(ma, mb)
            if lo:
                out._max[origin] = lo
            # Counters above the common prefix that both sides hold.
            both = {c for c in ea if c <= mb or c in eb} | {c for c in eb if c <= ma or c in ea}
            for c in both:
                out.add_counter(origin, c)
        return out

    def copy(self) -> VersionVector:
        """Return an independent copy."""
        out = VersionVector()
        out._max = dict(self._max)
        out._extra = {o: set(e) for o, e in self._extra.items()}
        return out

    def difference(self, other: VersionVector) -> VersionVector:
        """Return a new vector of the dots in ``self`` and not in ``other``."""
        out = VersionVector()
        for origin, ranges in other.missing_from(self).items():
            for lo, hi in ranges:
                out.add_range(origin, lo, hi)
        return out

    # -- wire ----------------------------------------------------------------------

    def to_wire(self) -> dict[str, int | list[object]]:
        """Return the compact, msgpack-friendly form (see the module docstring)."""
        out: dict[str, int | list[object]] = {}
        for origin in self.origins():
            m = self._max.get(origin, 0)
            extra = self._extra.get(origin)
            out[origin] = [m, _ranges(extra)] if extra else m
        return out

    @classmethod
    def from_wire(cls, data: object) -> Self:
        """Rebuild a vector from :meth:`to_wire` output, validating strictly.

        Raises:
            CrdtError: a wrong shape, a bad origin, a counter out of range,
                unsorted or overlapping ranges, or too many gap counters.
        """
        if type(data) is not dict:
            raise CrdtError("version vector must be a map")
        out = cls()
        budget = MAX_GAP_COUNTERS
        for origin, item in data.items():
            _check_origin(origin)
            if type(item) is int:
                _check_counter(item, zero_ok=True)
                if item:
                    out._max[origin] = item
                continue
            if type(item) is not list or len(item) != 2:
                raise CrdtError(f"bad version vector entry for {origin!r}")
            m, ranges = item
            if type(m) is not int or type(ranges) is not list or not ranges:
                raise CrdtError(f"bad version vector entry for {origin!r}")
            _check_counter(m, zero_ok=True)
            prev = m + 1  # the first gap counter must leave a hole above ``m``
            extra: set[int] = set()
            for r in ranges:
                if type(r) is not list or len(r) != 2:
                    raise CrdtError(f"bad version vector range for {origin!r}")
                lo, hi = r
                if type(lo) is not int or type(hi) is not int:
                    raise CrdtError(f"bad version vector range for {origin!r}")
                _check_counter(hi, zero_ok=False)
                if lo <= prev or hi < lo:
                    raise CrdtError(f"unsorted or overlapping ranges for {origin!r}")
                budget -= hi - lo + 1
                if budget < 0:
                    raise CrdtError("too many out-of-order counters in version vector")
                extra.update(range(lo, hi + 1))
                prev = hi + 1
            if m:
                out._max[origin] = m
            out._extra[origin] = extra
        return out


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _check_origin(origin: object) -> None:
    if type(origin) is not str or not 0 < len(origin) <= _MAX_ORIGIN_LEN:
        raise CrdtError(f"invalid origin id: {origin!r}")


def _check_counter(counter: int, *, zero_ok: bool) -> None:
    if not (0 if zero_ok else 1) <= counter <= MAX_COUNTER_VALUE:
        raise CrdtError(f"dot counter out of range: {counter}")


def check_dot(origin: object, counter: object) -> None:
    """Validate a dot received from the wire.

    Raises:
        CrdtError: bad origin or counter.
    """
    _check_origin(origin)
    if type(counter) is not int:
        raise CrdtError(f"dot counter must be an int: {counter!r}")
    _check_counter(counter, zero_ok=False)
