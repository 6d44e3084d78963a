"""Delta-state CRDTs: a last-writer-wins map with tombstones, a PN-counter and an
add-wins observed-remove set.

Each type follows the delta-state model (Almeida, Shoker and Baquero): a mutator
returns a *delta*, itself a small value of the same type, and ``join`` is the
lattice join, so it is commutative, associative and idempotent: duplicated,
reordered or replayed deltas change nothing. ``merge*`` methods are the in-place
forms of ``join``.

:class:`LwwMap` and :class:`ORSet` carry a *causal context*: the
:class:`~sync.dots.VersionVector` of every dot whose effect the state reflects.
Joins use it to tell "never seen" from "seen and since overwritten or removed";
that is what lets a replica drop tombstones once they are causally stable
without deleted keys coming back (see :meth:`LwwMap.collect_tombstones`).

The classes are plain, synchronous and free of I/O; wire forms are built from
``dict``/``list``/``str``/``int``/``bool``/``None`` only so msgpack can carry them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Self

from sync._exceptions import CrdtError
from sync.dots import Dot, VersionVector, check_dot
from sync.hlc import MAX_TIMESTAMP

__all__ = [
    "MAX_KEY_LEN",
    "LwwEntry",
    "LwwMap",
    "ORSet",
    "PNCounter",
    "causally_stable",
    "validate_entries",
]

MAX_KEY_LEN = 1024
"""Longest key (in characters) a :class:`LwwMap` accepts from the wire."""
_MAX_ORIGIN_LEN = 256

LwwEntry = tuple[int, str, int, bool, Any]
"""One LWW map entry: ``(ts, origin, counter, deleted, value)``.

``(origin, counter)`` is the dot of the write; a tombstone has ``deleted`` true
and ``value`` ``None``. Entries are ordered by ``(ts, origin, counter)``: the HLC
timestamp first, then the origin id to break ties, then the counter (two writes
with one dot are the same write).
"""


def _newer(a: LwwEntry, b: LwwEntry) -> bool:
    """Whether entry ``a`` wins over entry ``b``."""
    if a[0] != b[0]:
        return a[0] > b[0]
    return (a[1], a[2]) > (b[1], b[2])


def causally_stable(local: VersionVector, acked: Iterable[VersionVector]) -> VersionVector:
    """Compute the vector of dots whose tombstones ``local``'s replica may drop.

    A tombstone may go only once every replica of the scope has seen it *and* no
    write concurrent with it can still arrive at this replica (a late concurrent
    write with an older timestamp would otherwise bring the key back here while
    it stays deleted elsewhere). A write concurrent with the tombstone was made
    by some replica before it saw the tombstone, so it is in that replica's
    acknowledged vector; hence the rule: the result is the meet of ``acked`` when
    ``local`` dominates their union, and empty otherwise.

    Args:
        local: this replica's causal context for the scope.
        acked: the latest vector acknowledged by *every* replica of the scope
            (this one included or not; it does not matter).

    Returns:
        The vector to pass to :meth:`LwwMap.collect_tombstones` or
        :meth:`ORSet` style GC.
    """
    acked = list(acked)
    if not acked:
        return VersionVector()
    meet = acked[0].copy()
    union = acked[0].copy()
    for vv in acked[1:]:
        meet = meet.meet(vv)
        union.merge(vv)
    if not local.dominates(union):
        return VersionVector()
    return meet


def _check_key(key: object) -> None:
    if type(key) is not str or len(key) > MAX_KEY_LEN:
        raise CrdtError(f"invalid LWW map key: {key!r:.80}")


def _check_ts(ts: object) -> None:
    if type(ts) is not int or not 0 <= ts <= MAX_TIMESTAMP:
        raise CrdtError(f"invalid HLC timestamp: {ts!r}")


def validate_entries(items: object) -> list[list[Any]]:
    """Check wire-form LWW entries (see :meth:`LwwMap.entries_wire`) and return them.

    Cheap (no objects are built), so a batch can be checked as a whole before any
    of it is applied.

    Raises:
        CrdtError: ``items`` is not a list of well-formed entries.
    """
    if type(items) is not list:
        raise CrdtError("LWW entries must be a list")
    for item in items:
        if type(item) is not list or len(item) != 6:
            raise CrdtError("LWW entry must be a 6-item list")
        key, ts, origin, counter, deleted, value = item
        if (
            type(key) is not str
            or len(key) > MAX_KEY_LEN
            or type(ts) is not int
            or not 0 <= ts <= MAX_TIMESTAMP
            or type(origin) is not str
            or not 0 < len(origin) <= _MAX_ORIGIN_LEN
            or type(counter) is not int
            or not 0 < counter < 1 << 63
            or type(deleted) is not bool
            or (deleted and value is not None)
        ):
            raise CrdtError(f"invalid LWW entry: {item!r:.200}")
    return items


class LwwMap:
    """Map from string keys to last-writer-wins registers, with tombstones.

    A write carries an HLC timestamp and a dot; the entry with the greatest
    ``(ts, origin, counter)`` wins. Deleting writes a tombstone, so a delete is
    ordered against concurrent writes like any other write. Tombstones are
    dropped only by :meth:`collect_tombstones`, once causally stable.

    Attributes:
        context: dots whose effect this state reflects (the scope's version
            vector). Every entry's dot is in it.
        horizon: dots of which some tombstones may have been dropped. A peer
            whose vector does not dominate it cannot be brought up to date by
            deltas and needs the full state (a snapshot, merged with
            :meth:`merge_state`).
    """

    __slots__ = ("_entries", "context", "horizon")

    def __init__(self) -> None:
        self._entries: dict[str, LwwEntry] = {}
        self.context = VersionVector()
        self.horizon = VersionVector()

    # -- accessors -----------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """Return the live value of ``key``, or ``default`` if absent or deleted."""
        e = self._entries.get(key)
        if e is None or e[3]:
            return default
        return e[4]

    def __getitem__(self, key: str) -> Any:
        e = self._entries.get(key)
        if e is None or e[3]:
            raise KeyError(key)
        return e[4]

    def __contains__(self, key: object) -> bool:
        if type(key) is not str:
            return False
        e = self._entries.get(key)
        return e is not None and not e[3]

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if not e[3])

    def keys(self) -> list[str]:
        """Live keys, sorted."""
        return sorted(k for k, e in self._entries.items() if not e[3])

    def items(self) -> list[tuple[str, Any]]:
        """Live ``(key, value)`` pairs, sorted by key."""
        return sorted((k, e[4]) for k, e in self._entries.items() if not e[3])

    def to_dict(self) -> dict[str, Any]:
        """Live contents as a plain dict."""
        return {k: e[4] for k, e in self._entries.items() if not e[3]}

    def entry(self, key: str) -> LwwEntry | None:
        """The raw entry for ``key``, tombstones included."""
        return self._entries.get(key)

    def entries(self) -> Iterator[tuple[str, LwwEntry]]:
        """Every ``(key, entry)``, tombstones included, in no particular order."""
        return iter(self._entries.items())

    @property
    def tombstones(self) -> int:
        """How many tombstones the map holds."""
        return sum(1 for e in self._entries.values() if e[3])

    @property
    def max_ts(self) -> int:
        """Greatest timestamp of any entry (0 when empty)."""
        return max((e[0] for e in self._entries.values()), default=0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LwwMap):
            return NotImplemented
        return (
            self._entries == other._entries
            and self.context == other.context
            and self.horizon == other.horizon
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LwwMap({len(self)} live, {self.tombstones} tombstones)"

    # -- mutators -------------------------------------------------------------------

    def _write(self, key: str, ts: int, origin: str, deleted: bool, value: Any) -> LwwMap:
        delta = self.write_delta(key, value, ts=ts, origin=origin, deleted=deleted)
        # Same result as merge_state(delta) for a one-entry delta, without a scan.
        self._apply(delta.entries_wire(), None)
        return delta

    def write_delta(
        self, key: str, value: Any, *, ts: int, origin: str, deleted: bool = False
    ) -> LwwMap:
        """The delta :meth:`set` (or with ``deleted`` :meth:`delete`) would make, unapplied.

        For a writer that must make the write durable before it counts: persist
        the delta, then :meth:`apply_entries` its :meth:`entries_wire`. The dot is
        the next one of ``origin`` here, so the caller must not plan a second
        write of the same origin before this one is applied.
        """
        _check_key(key)
        _check_ts(ts)
        counter = self.context.next_counter(origin)
        check_dot(origin, counter)
        delta = LwwMap()
        delta._entries[key] = (ts, origin, counter, deleted, None if deleted else value)
        delta.context.add_counter(origin, counter)
        return delta

    def set(self, key: str, value: Any, *, ts: int, origin: str) -> LwwMap:
        """Write ``key = value`` as replica ``origin`` at HLC time ``ts``.

        The write gets the next dot of ``origin``. It loses to an existing entry
        with a greater ``(ts, origin, counter)``, exactly as it would on a peer.

        Returns:
            The delta to send to peers.
        """
        return self._write(key, ts, origin, False, value)

    def delete(self, key: str, *, ts: int, origin: str) -> LwwMap:
        """Delete ``key`` by writing a tombstone (see :meth:`set`).

        Returns:
            The delta to send to peers.
        """
        return self._write(key, ts, origin, True, None)

    # -- join -------------------------------------------------------------------------

    def copy(self) -> LwwMap:
        """Return an independent copy (entries are immutable tuples)."""
        out = LwwMap()
        out._entries = dict(self._entries)
        out.context = self.context.copy()
        out.horizon = self.horizon.copy()
        return out

    def join(self, other: LwwMap) -> LwwMap:
        """Return the lattice join of two states (neither is changed)."""
        out = self.copy()
        out.merge_state(other)
        return out

    def merge_state(self, other: LwwMap) -> None:
        """In place: join a full state, a snapshot or a delta into this one.

        The causal join: an entry survives if both sides hold it or the other
        side has not seen its dot; of the survivors for a key the newest wins. So
        an entry that the other side saw and has since dropped (an overwritten
        value whose tombstone was collected) does not come back.
        """
        mine = self._entries
        my_ctx = self.context
        their_ctx = other.context
        for key, e in other._entries.items():
            cur = mine.get(key)
            if cur == e:
                continue
            if (e[1], e[2]) in my_ctx:
                # Seen here already: the local entry dominates it, or it was
                # overwritten by a tombstone that has since been collected.
                continue
            if cur is None or (cur[1], cur[2]) in their_ctx or _newer(e, cur):
                mine[key] = e
        theirs = other._entries
        for key in [k for k, e in mine.items() if (e[1], e[2]) in their_ctx and k not in theirs]:
            del mine[key]
        my_ctx.merge(their_ctx)
        self.horizon.merge(other.horizon)

    def merge_delta(self, delta: LwwMap) -> int:
        """In place: apply a delta without the causal drop of :meth:`merge_state`.

        Cheaper, never removes a local entry, and correct whenever the sender did
        not need to send a snapshot. Returns the number of entries that changed.
        """
        return self._apply([[k, *e] for k, e in delta._entries.items()], delta.context)

    def merge_batch(self, wire_entries: object, context: object = None) -> int:
        """Fast path: apply a batch of wire-form entries (see :meth:`entries_wire`).

        The whole batch is validated before anything is applied, so a malformed
        batch changes nothing.

        Args:
            wire_entries: a list of ``[key, ts, origin, counter, deleted, value]``.
            context: optional wire-form :class:`VersionVector` of extra dots the
                batch covers (writes the sender saw and that are superseded by
                entries the receiver has or gets in this batch).

        Returns:
            The number of entries that changed.

        Raises:
            CrdtError: a malformed entry or context.
        """
        items = validate_entries(wire_entries)
        ctx = VersionVector.from_wire(context) if context is not None else None
        return self._apply(items, ctx)

    def apply_entries(self, entries: list[list[Any]], context: VersionVector | None) -> int:
        """Apply entries that already passed :func:`validate_entries`.

        Same effect as :meth:`merge_batch`, for callers that validated the batch
        (and maybe looked at it) first. Returns the number of entries changed.
        """
        return self._apply(entries, context)

    def _apply(self, items: list[list[Any]], ctx: VersionVector | None) -> int:
        entries = self._entries
        vv = self.context
        cmax = vv._max  # hot path: same package, skip the method call
        cextra = vv._extra
        add = vv.add_counter
        changed = 0
        for key, ts, origin, counter, deleted, value in items:
            if counter <= cmax.get(origin, 0):
                continue
            ex = cextra.get(origin)
            if ex is not None and counter in ex:
                continue
            add(origin, counter)
            cur = entries.get(key)
            if (
                cur is None
                or ts > cur[0]
                or (ts == cur[0] and (origin > cur[1] or (origin == cur[1] and counter > cur[2])))
            ):
                entries[key] = (ts, origin, counter, deleted, value)
                changed += 1
        if ctx is not None:
            vv.merge(ctx)
        return changed

    # -- sync helpers -------------------------------------------------------------------

    def entries_wire(self, missing_for: VersionVector | None = None) -> list[list[Any]]:
        """Entries in wire form, optionally only those whose dot ``missing_for`` lacks.

        Args:
            missing_for: a peer's claimed vector; ``None`` for every entry.

        Returns:
            A list of ``[key, ts, origin, counter, deleted, value]``, sorted by key
            so output is deterministic.
        """
        out: list[list[Any]] = []
        for key in sorted(self._entries):
            ts, origin, counter, deleted, value = self._entries[key]
            if missing_for is None or (origin, counter) not in missing_for:
                out.append([key, ts, origin, counter, deleted, value])
        return out

    def needs_snapshot(self, peer: VersionVector) -> bool:
        """Whether a peer that claims ``peer`` must get the full state.

        True when tombstones the peer never saw may have been collected here, so
        deltas alone could leave deleted keys alive at the peer.
        """
        return not peer.dominates(self.horizon)

    def collect_tombstones(self, stable: VersionVector) -> int:
        """Drop tombstones whose dot is causally stable.

        Args:
            stable: dots every replica of the scope has seen and after which no
                concurrent write can arrive; compute it with
                :func:`causally_stable` (the meet of the acknowledged vectors,
                guarded against in-flight concurrent writes).

        Returns:
            How many tombstones were dropped. Their dots stay in :attr:`context`
            and :attr:`horizon` grows, so a peer that has not seen them gets a
            snapshot instead of a delta merge.
        """
        doomed = [k for k, e in self._entries.items() if e[3] and (e[1], e[2]) in stable]
        for k in doomed:
            del self._entries[k]
        if doomed:
            self.horizon.merge(stable.meet(self.context))
        return len(doomed)

    # -- wire -----------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """Full state as ``{"e": entries, "c": context, "h": horizon}``."""
        return {"e": self.entries_wire(), "c": self.context.to_wire(), "h": self.horizon.to_wire()}

    @classmethod
    def from_wire(cls, data: object) -> Self:
        """Rebuild a state from :meth:`to_wire` output, validating strictly.

        Raises:
            CrdtError: a wrong shape, a duplicate key, or an entry whose dot is
                not in the context.
        """
        if type(data) is not dict or set(data) != {"e", "c", "h"}:
            raise CrdtError("LWW map must be a map with keys e, c, h")
        items = validate_entries(data["e"])
        out = cls()
        out.context = VersionVector.from_wire(data["c"])
        out.horizon = VersionVector.from_wire(data["h"])
        entries = out._entries
        for key, ts, origin, counter, deleted, value in items:
            if key in entries:
                raise CrdtError(f"duplicate LWW key {key!r:.80}")
            if (origin, counter) not in out.context:
                raise CrdtError("LWW entry dot missing from the causal context")
            entries[key] = (ts, origin, counter, deleted, value)
        return out


class PNCounter:
    """A counter that can go up and down: per-origin totals of increments and
    decrements, joined by pointwise maximum.
    """

    __slots__ = ("_n", "_p")

    def __init__(self) -> None:
        self._p: dict[str, int] = {}
        self._n: dict[str, int] = {}

    @property
    def value(self) -> int:
        """Sum of increments minus sum of decrements."""
        return sum(self._p.values()) - sum(self._n.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PNCounter):
            return NotImplemented
        return self._p == other._p and self._n == other._n

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PNCounter({self.value})"

    def _bump(self, side: dict[str, int], name: str, origin: str, amount: int) -> PNCounter:
        check_dot(origin, 1)
        if type(amount) is not int or amount < 0:
            raise CrdtError("counter amount must be a non-negative int")
        total = side.get(origin, 0) + amount
        delta = PNCounter()
        if total:  # zero totals are never stored, so equal counters compare equal
            side[origin] = total
            getattr(delta, name)[origin] = total
        return delta

    def increment(self, origin: str, amount: int = 1) -> PNCounter:
        """Add ``amount`` (>= 0) as replica ``origin``; return the delta."""
        return self._bump(self._p, "_p", origin, amount)

    def decrement(self, origin: str, amount: int = 1) -> PNCounter:
        """Subtract ``amount`` (>= 0) as replica ``origin``; return the delta."""
        return self._bump(self._n, "_n", origin, amount)

    def copy(self) -> PNCounter:
        """Return an independent copy."""
        out = PNCounter()
        out._p = dict(self._p)
        out._n = dict(self._n)
        return out

    def merge(self, other: PNCounter) -> None:
        """In place: pointwise maximum with ``other``."""
        for mine, theirs in ((self._p, other._p), (self._n, other._n)):
            for origin, v in theirs.items():
                if v > mine.get(origin, 0):
                    mine[origin] = v

    def join(self, other: PNCounter) -> PNCounter:
        """Return the join of two counters."""
        out = self.copy()
        out.merge(other)
        return out

    def to_wire(self) -> dict[str, dict[str, int]]:
        """``{"p": {origin: total}, "n": {origin: total}}``."""
        return {"p": dict(sorted(self._p.items())), "n": dict(sorted(self._n.items()))}

    @classmethod
    def from_wire(cls, data: object) -> Self:
        """Rebuild a counter from :meth:`to_wire` output, validating strictly.

        Raises:
            CrdtError: a wrong shape or a negative total.
        """
        if type(data) is not dict or set(data) != {"p", "n"}:
            raise CrdtError("PN-counter must be a map with keys p, n")
        out = cls()
        for name in ("p", "n"):
            side = data[name]
            if type(side) is not dict:
                raise CrdtError("PN-counter side must be a map")
            for origin, v in side.items():
                check_dot(origin, 1)
                if type(v) is not int or not 0 <= v < 1 << 63:
                    raise CrdtError(f"bad PN-counter total {v!r}")
                if v:
                    getattr(out, "_" + name)[origin] = v
        return out


ORElement = str | int
"""Elements an :class:`ORSet` can hold (hashable and msgpack-friendly)."""


class ORSet:
    """Add-wins observed-remove set with birth dots and a causal context.

    ``add`` tags the element with a new dot; ``remove`` removes only the dots it
    has observed, so an add concurrent with a remove wins.

    Attributes:
        context: dots whose effect this state reflects.
    """

    __slots__ = ("_entries", "context")

    def __init__(self) -> None:
        self._entries: dict[ORElement, frozenset[Dot]] = {}
        self.context = VersionVector()

    @property
    def elements(self) -> frozenset[ORElement]:
        """The elements currently in the set."""
        return frozenset(self._entries)

    def __contains__(self, element: object) -> bool:
        return element in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ORSet):
            return NotImplemented
        return self._entries == other._entries and self.context == other.context

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ORSet({sorted(self._entries, key=repr)!r})"

    def add(self, element: ORElement, *, origin: str) -> ORSet:
        """Add ``element`` as replica ``origin``; return the delta.

        The delta also covers the element's previous dots, which the new one
        replaces.
        """
        _check_element(element)
        dot = Dot(origin, self.context.next_counter(origin))
        check_dot(*dot)
        delta = ORSet()
        delta._entries[element] = frozenset((dot,))
        for d in self._entries.get(element, ()):
            delta.context.add(d)
        delta.context.add(dot)
        self.merge(delta)
        return delta

    def remove(self, element: ORElement) -> ORSet:
        """Remove the observed dots of ``element``; return the delta (maybe empty)."""
        delta = ORSet()
        for d in self._entries.get(element, ()):
            delta.context.add(d)
        self.merge(delta)
        return delta

    def copy(self) -> ORSet:
        """Return an independent copy."""
        out = ORSet()
        out._entries = dict(self._entries)
        out.context = self.context.copy()
        return out

    def merge(self, other: ORSet) -> None:
        """In place: causal join with ``other`` (a state or a delta)."""
        mine, theirs = self._entries, other._entries
        my_ctx, their_ctx = self.context, other.context
        for element in set(mine) | set(theirs):
            a = mine.get(element, frozenset())
            b = theirs.get(element, frozenset())
            keep = (
                (a & b)
                | frozenset(d for d in a if d not in their_ctx)
                | frozenset(d for d in b if d not in my_ctx)
            )
            if keep:
                mine[element] = keep
            else:
                mine.pop(element, None)
        my_ctx.merge(their_ctx)

    def join(self, other: ORSet) -> ORSet:
        """Return the causal join of two states."""
        out = self.copy()
        out.merge(other)
        return out

    def to_wire(self) -> dict[str, Any]:
        """``{"e": [[element, [[origin, counter], ...]], ...], "c": context}``."""
        items = [
            [el, [list(d) for d in sorted(dots)]]
            for el, dots in sorted(self._entries.items(), key=lambda kv: repr(kv[0]))
        ]
        return {"e": items, "c": self.context.to_wire()}

    @classmethod
    def from_wire(cls, data: object) -> Self:
        """Rebuild a set from :meth:`to_wire` output, validating strictly.

        Raises:
            CrdtError: a wrong shape, a duplicate element, or a dot missing from
                the context.
        """
        if type(data) is not dict or set(data) != {"e", "c"}:
            raise CrdtError("OR-set must be a map with keys e, c")
        out = cls()
        out.context = VersionVector.from_wire(data["c"])
        items = data["e"]
        if type(items) is not list:
            raise CrdtError("OR-set entries must be a list")
        for item in items:
            if type(item) is not list or len(item) != 2 or type(item[1]) is not list:
                raise CrdtError("OR-set entry must be [element, dots]")
            element, raw = item
            _check_element(element)
            if element in out._entries or not raw:
                raise CrdtError("duplicate or empty OR-set element")
            dots: set[Dot] = set()
            for d in raw:
                if type(d) is not list or len(d) != 2:
                    raise CrdtError("OR-set dot must be [origin, counter]")
                check_dot(d[0], d[1])
                dot = Dot(d[0], d[1])
                if dot not in out.context:
                    raise CrdtError("OR-set dot missing from the causal context")
                dots.add(dot)
            out._entries[element] = frozenset(dots)
        return out


def _check_element(element: object) -> None:
    if type(element) is str:
        if len(element) > MAX_KEY_LEN:
            raise CrdtError("OR-set element too long")
    elif type(element) is not int or not -(1 << 63) <= element < 1 << 64:
        raise CrdtError(f"OR-set elements must be str or int: {element!r:.80}")
