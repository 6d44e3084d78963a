"""Plain value types stored in and returned by the journal."""

from __future__ import annotations

from dataclasses import dataclass

from sync.dots import Dot

__all__ = [
    "KIND_DROPPED",
    "KIND_METRIC",
    "Delta",
    "Dot",
    "Event",
    "EventIn",
    "JournalStats",
    "StateEntry",
]

KIND_METRIC = "metric"
"""Event kind that quota pressure and queue overflow may drop (counted)."""

KIND_DROPPED = "dropped"
"""Event kind the journal appends to record a quota drop; reserved."""


@dataclass(frozen=True, slots=True)
class EventIn:
    """An event to append; the journal assigns its stream sequence number.

    Attributes:
        kind: ``"metric"``, ``"event"``, ``"log"``...; ``"dropped"`` is reserved.
        payload: opaque bytes (msgpack by convention).
        ts_ms: event time in milliseconds (HLC or wall clock); ``None`` means
            the wall clock when the append is submitted.
    """

    kind: str
    payload: bytes
    ts_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """An event read back from a stream."""

    stream: str
    seq: int
    kind: str
    payload: bytes
    ts_ms: int


@dataclass(frozen=True, slots=True)
class StateEntry:
    """The current value of one key of a CRDT scope.

    The journal stores what the caller merged; it does not arbitrate LWW itself
    (that is the sync core's job), so a put replaces the row for ``(scope, key)``.

    Attributes:
        scope: ``device/<id>``, ``region/<name>`` or ``fleet``.
        key: key within the scope, e.g. ``desired/<workload>``.
        value: encoded CRDT value.
        hlc: hybrid-logical-clock timestamp of the write (int64).
        origin: replica id that made the write.
        counter: that replica's dot counter for the write.
        tombstone: the key is deleted (kept until causally stable).
    """

    scope: str
    key: str
    value: bytes
    hlc: int
    origin: str
    counter: int
    tombstone: bool = False


@dataclass(frozen=True, slots=True)
class Delta:
    """An outbound delta, kept until upstream acknowledges its dot."""

    scope: str
    origin: str
    counter: int
    payload: bytes

    @property
    def dot(self) -> Dot:
        """The delta's dot ``(origin, counter)``."""
        return Dot(self.origin, self.counter)


@dataclass(frozen=True, slots=True)
class JournalStats:
    """A snapshot of the journal's counters (no I/O to obtain).

    Attributes:
        bd_seq: birth/death sequence number of this session.
        schema_version: number of applied schema migrations.
        transactions: write transactions committed since open.
        committed_writes: write calls committed since open.
        event_bytes: approximate bytes held by event rows.
        quota_bytes: event retention quota.
        dropped_metrics: metric events dropped for quota (persisted, lifetime).
        dropped_events: non-metric events dropped for quota (persisted, lifetime).
        refused_metrics: metric events refused on queue overflow (persisted, lifetime).
        pending_rows: rows submitted and not yet committed.
    """

    bd_seq: int
    schema_version: int
    transactions: int
    committed_writes: int
    event_bytes: int
    quota_bytes: int
    dropped_metrics: int
    dropped_events: int
    refused_metrics: int
    pending_rows: int
