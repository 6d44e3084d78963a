"""The hub's ingest of relay batches: verify, merge, dedupe, and say what to ack.

Pure and synchronous (bytes in, a result out, time passed in): the hub's asyncio
shell receives ``BATCH`` messages from MQTT, hands them to
:meth:`BatchIngestor.ingest`, persists what the result says changed, and only
then publishes :meth:`BatchIngestor.ack`. Nothing here touches a store.

What a batch goes through (see :mod:`sync.relaying` for the wire form):

1. **The relay.** The batch must come from a known relay id and carry that
   relay's signature. Otherwise the whole batch is refused with
   :class:`BatchRefusedError` and nothing changes: an unverified relay id cannot
   even be acknowledged.
2. **Each device item** (``delta``, ``event``, ``metric``): the device must be
   enrolled (its key ring known here), the forwarded envelope must claim that
   device as ``src`` and carry its signature (the relay's word is not enough),
   and its body must be well formed for its type. ``DELTAS`` and ``SNAPSHOT``
   must be of the device's own scope ``device/<id>`` with every entry, context
   dot and horizon dot of origin ``<id>``: a device cannot write for another.
   Accepted deltas are merged into the hub's :class:`~sync.replica.Replica`; a
   dot already held is skipped, so duplicates change nothing.
3. **Events** keep per ``(device, stream)`` order. An ``EVENTS`` item that
   follows on from the next seq wanted (or overlaps it) is accepted, its new
   events reported in order; one entirely seen before is a duplicate and
   acknowledged; one that starts **after** the next seq wanted is *held*: not
   acknowledged, so the relay sends it again after the missing one. Unlike
   :class:`~sync.protocol.SyncSession`, the hub never skips ahead on the
   envelope's ``first`` field: a device releases events once its relay has
   stored them, so ``first`` past the hub's cursor is normal while an earlier
   batch is still in the relay's outbox, and skipping would lose it.
4. **Relay reports** (``presence``, ``agg``) are covered by the batch
   signature; they are decoded strictly and returned (presence also goes to the
   :class:`~cloud_hub.health.HealthTracker` when one is given).

**Rejected items are acknowledged.** An item that fails step 2 or 4 (unknown
device, bad device signature, ``src`` mismatch, a foreign scope or origin, a
malformed body, a kind that does not match the envelope) is dropped, counted by
reason in :attr:`IngestResult.rejected` and :attr:`BatchIngestor.stats`, logged
at WARNING, and acknowledged. The bytes are in the relay's durable outbox and
would fail the same way on every resend: not acknowledging them would make the
relay resend them forever and fill its outbox and in-flight window with them.
A device enrolled after its data was rejected as ``unknown_device`` recovers it
through anti-entropy (its next HELLO exchange with the relay re-sends deltas).

Cursors (the next event seq wanted per stream) are the only state beyond the
replica; :meth:`BatchIngestor.cursors` and :meth:`BatchIngestor.restore_cursors`
let a store persist them with the events they guard.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cloud_hub._exceptions import HubError
from cloud_hub.health import HealthTracker
from regional_relay.aggregate import Aggregate
from regional_relay.presence import PRESENCE_WIRE_VERSION, DevicePresence, PresenceReport
from sync._exceptions import NovaCronError, SignatureError
from sync.crdt import LwwMap, validate_entries
from sync.dots import VersionVector
from sync.envelope import (
    Envelope,
    decode_envelope_unverified,
    unpackb_strict,
    verify_envelope,
)
from sync.keys import KeyRing, Signer
from sync.protocol import DELTAS, EVENTS, SNAPSHOT
from sync.relaying import Batch, BatchItem, encode_batch_ack, verify_batch
from sync.replica import Replica
from sync.topics import validate_id

__all__ = [
    "BatchIngestor",
    "BatchRefusedError",
    "EventRun",
    "IngestError",
    "IngestResult",
    "IngestStats",
    "PresenceItem",
    "device_scope",
    "presence_from_wire",
]

log = logging.getLogger(__name__)

_MAX_NAME_LEN: Final = 256
_MAX_ITEMS: Final = 10_000
_MAX_PRESENCE_DEVICES: Final = 100_000
_MAX_BD: Final = 2**64
_DELTAS_KEYS: Final = frozenset(("s", "sc", "d", "c"))
_SNAPSHOT_KEYS: Final = frozenset(("s", "sc", "st"))
_EVENTS_KEYS: Final = frozenset(("s", "st", "from", "first", "items"))
_PRESENCE_KEYS: Final = frozenset(
    ("v", "epoch", "at", "hub_reachable", "since", "cursor", "more", "online", "offline", "devices")
)
_DEVICE_KINDS: Final = {"delta": (DELTAS, SNAPSHOT), "event": (EVENTS,), "metric": (EVENTS,)}


def device_scope(device: str) -> str:
    """The scope a device writes: ``device/<id>``."""
    return f"device/{device}"


class IngestError(HubError):
    """Input the ingest cannot accept.

    Attributes:
        reason: a short, stable reason (a metrics label).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class BatchRefusedError(IngestError):
    """A whole ``BATCH`` refused: unknown relay, bad relay signature, malformed.

    Nothing changed and nothing may be acknowledged.

    Attributes:
        relay: the relay id the batch claims (unverified; ``""`` if unreadable).
    """

    def __init__(self, message: str, *, reason: str, relay: str = "") -> None:
        self.relay = relay
        super().__init__(message, reason=reason)


@dataclass(frozen=True, slots=True)
class EventRun:
    """Consecutive new events of one stream: seqs ``start, start + 1, ...``."""

    start: int
    items: list[Any]

    @property
    def end(self) -> int:
        """The seq after the last event (the stream's next seq wanted)."""
        return self.start + len(self.items)


@dataclass(frozen=True, slots=True)
class PresenceItem:
    """A relay's presence report and its counters (``/metrics``-style figures)."""

    relay: str
    region: str
    report: PresenceReport
    counters: dict[str, Any]


@dataclass(slots=True)
class IngestResult:
    """What one verified batch did.

    Attributes:
        relay: the relay that signed the batch.
        region: the relay's region.
        epoch: the relay's epoch (bdSeq) in the batch.
        acked: outbox ids to acknowledge, in batch order: items accepted,
            duplicates, and rejected items (see the module docstring).
        held: outbox ids of ``EVENTS`` items that do not follow on yet; never
            acknowledged, so the relay sends them again.
        events: new events per ``(device, stream)``, in seq order.
        changed: keys whose value changed, per scope.
        merged_dots: per scope, the dots newly covered by the scope's causal
            context: those of merged entries and those only claimed by a
            batch's context (writes superseded before they were forwarded). A
            dot never appears twice over the life of an ingestor.
        rejected: dropped items by reason.
        presence: decoded presence reports.
        aggregates: decoded metric aggregates.
    """

    relay: str
    region: str
    epoch: int
    acked: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    events: dict[tuple[str, str], EventRun] = field(default_factory=dict)
    changed: dict[str, set[str]] = field(default_factory=dict)
    merged_dots: dict[str, VersionVector] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    presence: list[PresenceItem] = field(default_factory=list)
    aggregates: list[Aggregate] = field(default_factory=list)


@dataclass
class IngestStats:
    """Cumulative counters of an ingestor (for ``/metrics``)."""

    batches: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Whole batches refused, by reason."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Items dropped (and acknowledged), by reason."""
    held: int = 0
    duplicates: int = 0
    events: int = 0
    dots: int = 0
    clock_skew: int = 0
    """Accepted entries whose timestamp was too far ahead to move the hub's HLC."""


class _ItemRejectedError(Exception):
    """Internal: an item to drop, with its reason."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def _int(what: str, v: object, lo: int = 0, hi: int = 1 << 63) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise _ItemRejectedError("malformed", f"{what} must be an int in [{lo}, {hi})")
    return v


def _name(what: str, v: object) -> str:
    if type(v) is not str or not 0 < len(v) <= _MAX_NAME_LEN:
        raise _ItemRejectedError("malformed", f"invalid {what}")
    return v


def _body(raw: object, keys: frozenset[str]) -> dict[str, Any]:
    if type(raw) is not dict or raw.keys() != keys:
        raise _ItemRejectedError("malformed", f"body must be a map with keys {sorted(keys)}")
    _name("session id", raw["s"])
    return raw


def _presence_int(what: str, v: object, lo: int = 0, hi: int = 1 << 63) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise IngestError(f"presence {what} must be an int in [{lo}, {hi})", reason="malformed")
    return v


def presence_from_wire(obj: object) -> PresenceReport:
    """Strictly rebuild a :class:`PresenceReport` from its wire form.

    The inverse of :meth:`PresenceReport.to_wire`: exactly its keys, version
    :data:`~regional_relay.presence.PRESENCE_WIRE_VERSION`, non-negative ints,
    bools that are bools, valid device ids, at most 100,000 devices, and device
    entries ``[online 0/1, bd >= -1, last_seen_ms, since_ms]``.

    Raises:
        IngestError: with reason ``malformed`` for anything else.
    """
    if type(obj) is not dict or obj.keys() != _PRESENCE_KEYS:
        raise IngestError(
            f"presence must be a map with keys {sorted(_PRESENCE_KEYS)}", reason="malformed"
        )
    if obj["v"] != PRESENCE_WIRE_VERSION or type(obj["v"]) is not int:
        raise IngestError(f"presence wire version {obj['v']!r:.20} unsupported", reason="malformed")
    if type(obj["hub_reachable"]) is not bool or type(obj["more"]) is not bool:
        raise IngestError("presence hub_reachable and more must be bools", reason="malformed")
    raw = obj["devices"]
    if type(raw) is not dict or len(raw) > _MAX_PRESENCE_DEVICES:
        raise IngestError("presence devices must be a map of at most 100,000", reason="malformed")
    devices: dict[str, DevicePresence] = {}
    for name, entry in raw.items():
        try:
            device = validate_id(name, what="device") if type(name) is str else None
        except NovaCronError:
            device = None
        if device is None or type(entry) is not list or len(entry) != 4:
            raise IngestError(f"presence entry {name!r:.80} malformed", reason="malformed")
        online = _presence_int("online", entry[0], 0, 2)
        bd = _presence_int("bd", entry[1], -1, _MAX_BD)
        seen = _presence_int("last_seen_ms", entry[2])
        since = _presence_int("since_ms", entry[3])
        devices[device] = DevicePresence(bool(online), bd, seen, since)
    return PresenceReport(
        epoch=_presence_int("epoch", obj["epoch"], 0, _MAX_BD),
        at_ms=_presence_int("at", obj["at"]),
        hub_reachable=obj["hub_reachable"],
        since=_presence_int("since", obj["since"]),
        cursor=_presence_int("cursor", obj["cursor"]),
        more=obj["more"],
        online=_presence_int("online", obj["online"]),
        offline=_presence_int("offline", obj["offline"]),
        devices=devices,
    )


@dataclass(frozen=True, slots=True)
class _Relay:
    region: str
    keys: KeyRing


class BatchIngestor:
    """The hub's view fed by relay batches; see the module docstring.

    Args:
        replica: the hub's replica; device scopes ``device/<id>`` are merged here.
        relays: relay id -> ``(region, keys)`` trusted for its batches.
        device_keys: device id -> key ring of the device's signing keys.
        cursors: next event seq wanted per ``(device, stream)`` (default 1),
            e.g. from :meth:`cursors` persisted earlier.
        health: fed the presence reports and the relays' liveness.
        hub_id: ``src`` of the acknowledgements.
    """

    def __init__(
        self,
        replica: Replica,
        *,
        relays: Mapping[str, tuple[str, KeyRing]] | None = None,
        device_keys: Mapping[str, KeyRing] | None = None,
        cursors: Mapping[tuple[str, str], int] | None = None,
        health: HealthTracker | None = None,
        hub_id: str = "hub",
    ) -> None:
        self.replica = replica
        self.health = health
        self.hub_id = hub_id
        self.stats = IngestStats()
        self._relays: dict[str, _Relay] = {}
        self._device_keys: dict[str, KeyRing] = dict(device_keys or {})
        self._next: dict[tuple[str, str], int] = {}
        for relay, (region, keys) in (relays or {}).items():
            self.add_relay(relay, region, keys)
        if cursors:
            self.restore_cursors(cursors)

    # -- configuration ---------------------------------------------------------------------

    def add_relay(self, relay: str, region: str, keys: KeyRing) -> None:
        """Trust ``keys`` for batches of relay ``relay`` in ``region`` (replaces)."""
        self._relays[relay] = _Relay(region, keys)

    def remove_relay(self, relay: str) -> None:
        """Stop trusting relay ``relay``: its batches are refused from now on."""
        self._relays.pop(relay, None)

    def set_device_keys(self, device: str, keys: KeyRing) -> None:
        """Trust ``keys`` for envelopes of ``device`` (enrollment, key rotation)."""
        self._device_keys[device] = keys

    def remove_device(self, device: str) -> None:
        """Forget a device's keys: its items are rejected as ``unknown_device``."""
        self._device_keys.pop(device, None)

    # -- cursors ---------------------------------------------------------------------------

    def cursors(self) -> dict[tuple[str, str], int]:
        """Next event seq wanted per ``(device, stream)``, for a store to persist."""
        return dict(self._next)

    def next_seq(self, device: str, stream: str) -> int:
        """Next event seq wanted from ``device``'s ``stream`` (1 if none seen)."""
        return self._next.get((device, stream), 1)

    def restore_cursors(self, cursors: Mapping[tuple[str, str], int]) -> None:
        """Load cursors from :meth:`cursors`; each only moves forward.

        Raises:
            ValueError: a key is not a ``(device, stream)`` pair of str, or a
                cursor is not an int >= 1.
        """
        for key, seq in cursors.items():
            if (
                type(key) is not tuple
                or len(key) != 2
                or not all(type(k) is str for k in key)
                or type(seq) is not int
                or seq < 1
            ):
                raise ValueError(f"invalid cursor {key!r:.80}: {seq!r:.20}")
        for key, seq in cursors.items():
            self._next[key] = max(seq, self._next.get(key, 1))

    # -- ingest ----------------------------------------------------------------------------

    def ingest(self, data: bytes, now_ms: int) -> IngestResult:
        """Verify and ingest one ``BATCH``; see the module docstring.

        Args:
            data: the batch's wire bytes.
            now_ms: hub time in ms (for the health tracker).

        Returns:
            What to acknowledge, persist and publish.

        Raises:
            BatchRefusedError: the whole batch is refused; nothing changed.
        """
        try:
            env = decode_envelope_unverified(data)
        except NovaCronError as exc:
            raise self._refuse("malformed_batch", "", str(exc)) from exc
        return self.ingest_envelope(env, now_ms)

    def ingest_envelope(self, env: Envelope, now_ms: int) -> IngestResult:
        """:meth:`ingest` of a batch the caller already decoded, unverified.

        For a caller that peeked at the envelope to route it
        (:func:`~sync.envelope.decode_envelope_unverified`): nothing of it is
        trusted; the relay's signature is checked here as in :meth:`ingest`.

        Raises:
            BatchRefusedError: the whole batch is refused; nothing changed.
        """
        batch = self._verify(env)
        relay = self._relays[batch.relay]
        result = IngestResult(batch.relay, relay.region, batch.epoch)
        self.stats.batches += 1
        if self.health is not None:
            self.health.relay_heartbeat(relay.region, now_ms)
        for item in batch.items:
            try:
                held = self._item(item, result, now_ms)
            except _ItemRejectedError as exc:
                result.rejected[exc.reason] += 1
                self.stats.rejected[exc.reason] += 1
                log.warning(
                    "dropped %s item %s of %s from relay %s (%s): %s",
                    item.kind,
                    item.id,
                    item.device,
                    batch.relay,
                    exc.reason,
                    exc,
                )
                held = False
            if held:
                result.held.append(item.id)
            else:
                result.acked.append(item.id)
        return result

    def ack(self, result: IngestResult, hub_signer: Signer, seq: int, ts: int) -> bytes:
        """Build the ``BATCH_ACK`` for ``result`` (send it once the result is stored)."""
        return encode_batch_ack(
            hub_signer, src=self.hub_id, seq=seq, ts=ts, relay=result.relay, ids=result.acked
        )

    # -- internals -------------------------------------------------------------------------

    def _refuse(self, reason: str, relay: str, message: str) -> BatchRefusedError:
        self.stats.refused[reason] += 1
        log.warning("refused batch from relay %r (%s): %s", relay, reason, message)
        return BatchRefusedError(message, reason=reason, relay=relay)

    def _verify(self, peek: Envelope) -> Batch:
        relay = self._relays.get(peek.src)
        if relay is None:
            raise self._refuse("unknown_relay", peek.src, "no keys for this relay")
        try:
            return verify_batch(peek, relay.keys)
        except SignatureError as exc:
            raise self._refuse("bad_relay_signature", peek.src, str(exc)) from exc
        except NovaCronError as exc:
            raise self._refuse("malformed_batch", peek.src, str(exc)) from exc

    def _item(self, item: BatchItem, result: IngestResult, now_ms: int) -> bool:
        """Ingest one item; return True when it is held (not acknowledged)."""
        if item.kind == "presence":
            self._presence(item, result, now_ms)
            return False
        if item.kind == "agg":
            try:
                agg = Aggregate.from_wire(unpackb_strict(item.payload))
            except NovaCronError as exc:
                raise _ItemRejectedError("malformed_aggregate", str(exc)) from exc
            if agg.device != item.device:
                raise _ItemRejectedError("malformed_aggregate", "aggregate of another device")
            result.aggregates.append(agg)
            return False
        device = item.device
        keys = self._device_keys.get(device)
        if keys is None:
            raise _ItemRejectedError("unknown_device", "device not enrolled")
        try:
            env = decode_envelope_unverified(item.payload)
        except NovaCronError as exc:
            raise _ItemRejectedError("malformed", str(exc)) from exc
        # The checks of sync.relaying.open_device_envelope, apart so that each
        # failure is counted under its own reason.
        if env.src != device:
            raise _ItemRejectedError("src_mismatch", f"envelope from {env.src!r:.80}")
        try:
            verify_envelope(env, keys)
        except SignatureError as exc:
            raise _ItemRejectedError("bad_device_signature", str(exc)) from exc
        if env.type not in _DEVICE_KINDS[item.kind]:
            raise _ItemRejectedError("wrong_kind", f"{env.type!r:.20} forwarded as {item.kind}")
        try:
            body = env.decode_body()
        except NovaCronError as exc:
            raise _ItemRejectedError("malformed", str(exc)) from exc
        if env.type == EVENTS:
            return self._events(device, body, result)
        if env.type == DELTAS:
            self._deltas(device, body, result)
        else:
            self._snapshot(device, body, result)
        return False

    def _presence(self, item: BatchItem, result: IngestResult, now_ms: int) -> None:
        if item.device != result.relay:
            raise _ItemRejectedError("malformed_presence", "presence of another relay")
        try:
            obj = unpackb_strict(item.payload)
            if type(obj) is not dict or obj.keys() != {"presence", "counters"}:
                raise IngestError("not a map with keys counters, presence", reason="malformed")
            report = presence_from_wire(obj["presence"])
        except NovaCronError as exc:
            raise _ItemRejectedError("malformed_presence", str(exc)) from exc
        counters = obj["counters"]
        if type(counters) is not dict or not all(type(k) is str for k in counters):
            raise _ItemRejectedError("malformed_presence", "counters must be a map of str keys")
        result.presence.append(PresenceItem(result.relay, result.region, report, counters))
        if self.health is not None:
            self.health.relay_report(result.region, report, now_ms)

    def _events(self, device: str, raw: object, result: IngestResult) -> bool:
        body = _body(raw, _EVENTS_KEYS)
        stream = _name("stream", body["st"])
        start = _int("from", body["from"], 1)
        _int("first", body["first"], 1, start + 1)
        items = body["items"]
        if type(items) is not list or len(items) > _MAX_ITEMS:
            raise _ItemRejectedError("malformed", "EVENTS items must be a list of at most 10,000")
        key = (device, stream)
        wanted = self._next.get(key, 1)
        if start > wanted:
            self.stats.held += 1
            log.debug("events %s..%s of %s held: want %s", start, start + len(items), key, wanted)
            return True
        skip = wanted - start
        if skip >= len(items):
            self.stats.duplicates += 1
            return False
        fresh = items[skip:]
        run = result.events.get(key)
        if run is None:
            result.events[key] = EventRun(wanted, fresh)
        else:
            run.items.extend(fresh)  # runs stay contiguous: start == the old cursor
        self._next[key] = wanted + len(fresh)
        self.stats.events += len(fresh)
        return False

    def _checked_scope(self, device: str, raw: object) -> str:
        scope = _name("scope", raw)
        if scope != device_scope(device):
            raise _ItemRejectedError("foreign_scope", f"scope {scope!r:.80} is not the device's")
        return scope

    @staticmethod
    def _check_origins(device: str, entries: list[list[Any]], *vectors: VersionVector) -> None:
        for e in entries:
            if e[2] != device:
                raise _ItemRejectedError("foreign_origin", "an entry or dot of another origin")
        for vv in vectors:
            if any(origin != device for origin in vv.origins()):
                raise _ItemRejectedError("foreign_origin", "an entry or dot of another origin")

    def _deltas(self, device: str, raw: object, result: IngestResult) -> None:
        body = _body(raw, _DELTAS_KEYS)
        scope = self._checked_scope(device, body["sc"])
        try:
            entries = validate_entries(body["d"])
            ctx = None if body["c"] is None else VersionVector.from_wire(body["c"])
        except NovaCronError as exc:
            raise _ItemRejectedError("malformed", str(exc)) from exc
        if len(entries) > _MAX_ITEMS:
            raise _ItemRejectedError("malformed", "DELTAS batch too large")
        self._check_origins(device, entries, *(() if ctx is None else (ctx,)))
        state = self.replica.scope(scope)
        before = {e[0]: state.entry(e[0]) for e in entries}
        if ctx is None:
            # Without a context the new dots are those of entries not seen yet:
            # the same as _record_dots's difference, without copying the vector.
            fresh = VersionVector()
            for e in entries:
                if not state.context.contains(e[2], e[3]):
                    fresh.add_counter(e[2], e[3])
            state.apply_entries(entries, None)
            if fresh:
                result.merged_dots.setdefault(scope, VersionVector()).merge(fresh)
                self.stats.dots += len(fresh)
        else:
            seen = state.context.copy()
            state.apply_entries(entries, ctx)
            self._record_dots(scope, state, seen, result)
        self._record_changes(scope, state, before, result)
        self._observe(entries)

    def _snapshot(self, device: str, raw: object, result: IngestResult) -> None:
        body = _body(raw, _SNAPSHOT_KEYS)
        scope = self._checked_scope(device, body["sc"])
        try:
            snap = LwwMap.from_wire(body["st"])
        except NovaCronError as exc:
            raise _ItemRejectedError("malformed", str(exc)) from exc
        entries: list[list[Any]] = body["st"]["e"]  # validated by from_wire
        self._check_origins(device, entries, snap.context, snap.horizon)
        state = self.replica.scope(scope)
        own = VersionVector()
        for e in entries:
            own.add_counter(e[2], e[3])
        seen = state.context.copy()
        if snap.context == own:
            # A chunk claiming only its entries' dots drops nothing: a delta merge.
            before = {e[0]: state.entry(e[0]) for e in entries}
            state.apply_entries(entries, None)
            state.horizon.merge(snap.horizon)
        else:
            # A causal join may also drop entries: compare every key held
            # before or after (snapshots are rare; deltas take the cheap path).
            before = dict(state.entries())
            state.merge_state(snap)
            before.update({k: None for k, _ in state.entries() if k not in before})
        self._record_dots(scope, state, seen, result)
        self._record_changes(scope, state, before, result)
        self._observe(entries)

    def _record_dots(
        self, scope: str, state: LwwMap, before: VersionVector, result: IngestResult
    ) -> None:
        # Ranges, never a list of dots: a context may claim a huge range.
        fresh = state.context.difference(before)
        if fresh:
            result.merged_dots.setdefault(scope, VersionVector()).merge(fresh)
            self.stats.dots += len(fresh)

    @staticmethod
    def _record_changes(
        scope: str, state: LwwMap, before: Mapping[str, Any], result: IngestResult
    ) -> None:
        changed = {k for k, old in before.items() if state.entry(k) != old}
        if changed:
            result.changed.setdefault(scope, set()).update(changed)

    def _observe(self, entries: list[list[Any]]) -> None:
        # Data is final once signed and merged, whatever the hub's clock says
        # (each scope has one writer, see sync.protocol); only keep the hub's
        # HLC from moving by an absurd amount.
        if entries and not self.replica.observe_entries(entries):
            self.stats.clock_skew += 1
            n = self.stats.clock_skew
            # A device with a bad clock sends many such batches: log the first
            # and then every thousandth (the count is in /metrics).
            (log.warning if n == 1 or n % 1000 == 0 else log.debug)(
                "device timestamps more than %d ms ahead of the hub's clock: merged, "
                "the hub's clock held at the bound (%d batches so far)",
                self.replica.hlc.max_skew_ms,
                n,
            )
