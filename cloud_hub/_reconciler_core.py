"""The reconciler's pure core: relay batches in; a store commit, acks and news out.

No I/O and no asyncio: :class:`ReconcilerCore` owns the hub's
:class:`~sync.replica.Replica` (device scopes fed by relays, ``desired/*`` and
``region/*`` scopes written here) and its :class:`~cloud_hub.ingest.BatchIngestor`.
The asyncio shell (:mod:`cloud_hub.reconciler`) moves bytes and awaits the
store; the bench drives this module directly.

Group commit: the shell opens an :class:`IngestGroup`, feeds it every ``BATCH``
that arrived together (:meth:`ReconcilerCore.ingest`), then
:meth:`ReconcilerCore.seal` turns it into one :class:`GroupOutcome`: a single
:class:`~cloud_hub.store.IngestCommit` (full state of every scope touched, new
events, their cursors, last-seen times), the ``BATCH_ACK`` of each batch, and
what to tell the fleet controller. The acks may only be published once the
commit is durable. If the commit fails, :meth:`ReconcilerCore.rollback` puts
the touched scopes and the cursors back as the store holds them, so the relays'
resends are ingested again rather than taken for duplicates.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cloud_hub.health import DeviceState, HealthTracker, UnreachableReason
from cloud_hub.ingest import BatchIngestor, BatchRefusedError, IngestResult, IngestStats
from cloud_hub.store import EventRecord, IngestCommit
from regional_relay.registry import registry_key, registry_scope, registry_value
from sync._exceptions import NovaCronError
from sync.crdt import LwwMap
from sync.envelope import DecodeLimits, packb, unpackb_strict
from sync.hlc import Clock, HybridLogicalClock
from sync.keys import KeyRing, Signer
from sync.replica import Replica
from sync.signed import signed_write, unwrap

__all__ = [
    "DEVICE_PREFIX",
    "GroupOutcome",
    "IngestGroup",
    "PresenceChange",
    "ReconcilerCore",
    "desired_scope",
    "event_body",
    "jsonable",
    "scope_from_bytes",
]

log = logging.getLogger(__name__)

DEVICE_PREFIX: Final = "device/"
DESIRED_PREFIX: Final = "desired/"
HUB_ID: Final = "hub"
# Stored scope states are the hub's own bytes, not wire input: only the
# container and size caps are raised (a device scope may hold many keys).
_STORED_LIMITS: Final = DecodeLimits(
    max_size=1 << 30, max_items=10_000_000, max_str_len=1 << 26, max_bin_len=1 << 26
)
_EVENT_LIMITS: Final = DecodeLimits(max_size=1 << 20)


def desired_scope(device: str) -> str:
    """The hub-signed scope of a device's desired workloads: ``desired/<id>``."""
    return f"{DESIRED_PREFIX}{device}"


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of a msgpack value: bytes become base64 text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


def event_body(item: Any) -> Any:
    """The JSON-ready body of one event item as an agent sends it.

    Agents send ``[kind, ts_ms, msgpack payload]`` (``None`` for a seq their
    journal dropped for quota). The payload is decoded strictly; one that does
    not decode is kept as base64 under ``raw``.
    """
    match item:
        case [str() as kind, int() as ts, bytes() as payload]:
            try:
                data = jsonable(unpackb_strict(payload, limits=_EVENT_LIMITS))
            except NovaCronError:
                return {"kind": kind, "ts_ms": ts, "raw": jsonable(payload)}
            return {"kind": kind, "ts_ms": ts, "data": data}
        case _:
            return jsonable(item)


def scope_from_bytes(data: bytes) -> LwwMap:
    """Rebuild a stored scope state (msgpack of :meth:`LwwMap.to_wire`).

    Raises:
        sync._exceptions.NovaCronError: the bytes are not such a state.
    """
    return LwwMap.from_wire(unpackb_strict(data, limits=_STORED_LIMITS))


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A device whose health state changed (see :class:`cloud_hub.health.HealthTracker`).

    Attributes:
        device: the device id.
        state: its new state.
        last_seen_ms: when its relay last heard from it (relay clock), if ever.
    """

    device: str
    state: DeviceState
    last_seen_ms: int | None


@dataclass(slots=True)
class IngestGroup:
    """Batches ingested together, to commit in one transaction."""

    results: list[IngestResult] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    scopes: set[str] = field(default_factory=set)
    reported: dict[str, set[str]] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    cursors: set[tuple[str, str]] = field(default_factory=set)
    seen: dict[str, int] = field(default_factory=dict)
    presence: set[str] = field(default_factory=set)
    relay_counters: dict[str, dict[str, Any]] = field(default_factory=dict)
    deltas: int = 0

    def __len__(self) -> int:
        return len(self.results) + self.refused.total()


@dataclass(frozen=True, slots=True)
class GroupOutcome:
    """What a sealed :class:`IngestGroup` asks of the shell, in this order.

    Attributes:
        commit: persist it (one transaction); nothing else before it is durable.
        acks: then publish these ``(region, BATCH_ACK bytes)``.
        reported: then tell the controller: device -> changed key -> new value
            (None when deleted), JSON-ready.
        presence: devices in the group's presence reports, to diff for health
            changes (:meth:`ReconcilerCore.presence_changes`).
        batches: batches ingested (refused ones excluded).
        refused: batches refused, by reason (nothing to ack).
        deltas: dots newly merged (deltas, including superseded ones).
        events: new events.
        relay_counters: the latest counters each relay reported.
    """

    commit: IngestCommit
    acks: list[tuple[str, bytes]]
    reported: dict[str, dict[str, Any]]
    presence: set[str]
    batches: int
    refused: Counter[str]
    deltas: int
    events: int
    relay_counters: dict[str, dict[str, Any]]

    @property
    def empty(self) -> bool:
        """Nothing to commit (every batch refused, or only duplicates held)."""
        c = self.commit
        return not (c.scopes or c.events or c.cursors or c.seen)


class ReconcilerCore:
    """The hub's replica, ingest, signed writes and health diff; see the module doc.

    Args:
        signer: the hub key (acks, ``desired/*`` and ``region/*`` entries).
        relays: relay id -> ``(region, keys)`` trusted for its batches.
        clock: wall clock of the hub's HLC.
        health: fed presence reports by the ingestor; diffed for changes.
    """

    def __init__(
        self,
        signer: Signer,
        relays: Mapping[str, tuple[str, KeyRing]],
        *,
        clock: Clock,
        health: HealthTracker,
    ) -> None:
        self.signer = signer
        self.relays = dict(relays)
        self.health = health
        self.replica = Replica(HUB_ID, HybridLogicalClock(clock))
        self.device_keys: dict[str, KeyRing] = {}
        self.device_public_keys: dict[str, bytes] = {}
        self.device_regions: dict[str, str] = {}
        self.ingestor = self._new_ingestor({}, IngestStats())
        self._ack_seq = 0
        self._states: dict[str, DeviceState] = {}
        self._reasons: dict[str, UnreachableReason] = {}

    # -- setup -------------------------------------------------------------------------

    @property
    def regions(self) -> set[str]:
        """The regions of the trusted relays."""
        return {region for region, _ in self.relays.values()}

    def region_keys(self, region: str) -> KeyRing:
        """The keys of every relay of ``region`` (its hub session peer signs with them)."""
        ring = KeyRing()
        for reg, keys in self.relays.values():
            if reg == region:
                for kid in keys:
                    key = keys.get(kid)
                    if key is not None:
                        ring.add(key, kid)
        return ring

    def restore(self, scopes: Mapping[str, bytes], cursors: Mapping[tuple[str, str], int]) -> None:
        """Load stored scope states and cursors (at start).

        Raises:
            sync._exceptions.NovaCronError: a stored scope does not decode.
            ValueError: a stored cursor is invalid.
        """
        for name, data in scopes.items():
            self._put_scope(name, scope_from_bytes(data))
        self.ingestor.restore_cursors(cursors)

    def register_device(self, device: str, region: str, public_key: bytes) -> None:
        """Trust ``public_key`` for ``device``'s envelopes (enrollment, restart)."""
        ring = KeyRing()
        ring.add(public_key)
        self.device_keys[device] = ring
        self.device_public_keys[device] = public_key
        self.device_regions[device] = region
        self.ingestor.set_device_keys(device, ring)

    def forget_device(self, device: str) -> str | None:
        """Stop trusting ``device``; return the region it was in, if known."""
        self.device_keys.pop(device, None)
        self.device_public_keys.pop(device, None)
        self.ingestor.remove_device(device)
        self.health.forget(device)
        self._states.pop(device, None)
        return self.device_regions.pop(device, None)

    def devices_of(self, region: str) -> list[str]:
        """Registered devices of ``region``, sorted."""
        return sorted(d for d, r in self.device_regions.items() if r == region)

    # -- ingest ------------------------------------------------------------------------

    def ingest(self, group: IngestGroup, data: bytes, now_ms: int) -> None:
        """Ingest one ``BATCH`` into ``group`` (in memory; see :meth:`seal`)."""
        try:
            result = self.ingestor.ingest(data, now_ms)
        except BatchRefusedError as exc:
            group.refused[exc.reason] += 1
            return
        group.results.append(result)
        for scope in (*result.changed, *result.merged_dots):
            group.scopes.add(scope)
            device = scope.removeprefix(DEVICE_PREFIX)
            group.seen[device] = now_ms
        for scope, keys in result.changed.items():
            if scope.startswith(DEVICE_PREFIX):
                group.reported.setdefault(scope.removeprefix(DEVICE_PREFIX), set()).update(keys)
        group.deltas += sum(len(vv) for vv in result.merged_dots.values())
        for (device, stream), run in result.events.items():
            group.cursors.add((device, stream))
            group.seen[device] = now_ms
            group.events.extend(
                EventRecord(device, stream, seq, now_ms, event_body(item))
                for seq, item in enumerate(run.items, run.start)
            )
        for item in result.presence:
            group.relay_counters[item.relay] = item.counters
            for device, presence in item.report.devices.items():
                group.presence.add(device)
                if presence.last_seen_ms > group.seen.get(device, 0):
                    group.seen[device] = presence.last_seen_ms

    def seal(self, group: IngestGroup) -> GroupOutcome:
        """Turn a group into its commit, acks and notifications."""
        scopes = {s: packb(self.replica.scope(s).to_wire()) for s in sorted(group.scopes)}
        cursors = {key: self.ingestor.next_seq(*key) for key in sorted(group.cursors)}
        acks: list[tuple[str, bytes]] = []
        for result in group.results:
            if result.acked:
                self._ack_seq += 1
                ack = self.ingestor.ack(
                    result, self.signer, seq=self._ack_seq, ts=self.replica.hlc.now()
                )
                acks.append((result.region, ack))
        reported = {
            device: {k: jsonable(self.replica.scope(DEVICE_PREFIX + device).get(k)) for k in keys}
            for device, keys in sorted(group.reported.items())
        }
        return GroupOutcome(
            commit=IngestCommit(
                scopes=scopes, events=group.events, cursors=cursors, seen=dict(group.seen)
            ),
            acks=acks,
            reported=reported,
            presence=group.presence,
            batches=len(group.results),
            refused=group.refused,
            deltas=group.deltas,
            events=len(group.events),
            relay_counters=group.relay_counters,
        )

    def rollback(
        self, stored: Mapping[str, bytes | None], cursors: Mapping[tuple[str, str], int]
    ) -> None:
        """Undo a group whose commit failed: back to what the store holds.

        Args:
            stored: the store's state of each scope the group touched
                (``GroupOutcome.commit.scopes``; None when the store has none).
            cursors: the store's cursors (:meth:`cloud_hub.store.Store.load_cursors`).
        """
        for name, data in stored.items():
            self.reload_scope(name, data)
        self.ingestor = self._new_ingestor(cursors, self.ingestor.stats)

    def reload_scope(self, name: str, data: bytes | None) -> None:
        """Put back a scope as the store holds it (None: it holds none)."""
        if data is None:
            self.replica.scopes.pop(name, None)
        else:
            self._put_scope(name, scope_from_bytes(data))

    # -- the hub's signed writes ---------------------------------------------------------

    def write_desired(self, device: str, workload: str, spec: Any) -> tuple[str, LwwMap]:
        """Sign ``desired/<device>[workload] = spec`` (None: removal); return scope, delta."""
        scope = desired_scope(device)
        return scope, signed_write(self.replica, scope, workload, spec, self.signer)

    def write_registry(
        self, region: str, device: str, public_key: bytes | None
    ) -> tuple[str, LwwMap | None]:
        """Sign the registry entry of ``device`` in ``region`` (None: removal).

        Returns:
            The scope and the delta, or None when the entry says so already.
        """
        scope = registry_scope(region)
        key = registry_key(device)
        value = None if public_key is None else registry_value(public_key)
        state = self.replica.scope(scope)
        if key in state and unwrap(state.get(key)) == value:
            return scope, None
        if key not in state and value is None:
            return scope, None  # never registered there: nothing to remove
        return scope, signed_write(self.replica, scope, key, value, self.signer)

    def registry_devices(self, region: str) -> dict[str, Any]:
        """Registry entries of ``region``: device key -> payload (None: removed)."""
        state = self.replica.scope(registry_scope(region))
        return {k: unwrap(v) for k, v in state.items()}

    def scope_bytes(self, scope: str) -> bytes:
        """The full state of ``scope`` as the store keeps it."""
        return packb(self.replica.scope(scope).to_wire())

    # -- health ------------------------------------------------------------------------

    def presence_changes(self, now_ms: int, devices: Iterable[str] | None) -> list[PresenceChange]:
        """Devices whose health state differs from the last one reported.

        Args:
            now_ms: hub time.
            devices: the devices to look at; None for every device known.
        """
        if devices is None:
            healths = self.health.devices(now_ms)
        else:
            healths = [h for d in sorted(devices) if (h := self.health.device(d, now_ms))]
        out: list[PresenceChange] = []
        for h in healths:
            if self._states.get(h.device) != h.state:
                self._states[h.device] = h.state
                out.append(PresenceChange(h.device, h.state, h.last_seen_ms or None))
        return out

    def regions_changed(self, now_ms: int) -> bool:
        """Whether any region's reachability changed since the last call."""
        reasons = {r.region: r.reason for r in self.health.regions(now_ms)}
        changed = reasons != self._reasons
        self._reasons = reasons
        return changed

    # -- internals ---------------------------------------------------------------------

    def _new_ingestor(
        self, cursors: Mapping[tuple[str, str], int], stats: IngestStats
    ) -> BatchIngestor:
        ingestor = BatchIngestor(
            self.replica,
            relays=self.relays,
            device_keys=self.device_keys,
            cursors=cursors,
            health=self.health,
            hub_id=HUB_ID,
        )
        ingestor.stats = stats
        return ingestor

    def _put_scope(self, name: str, state: LwwMap) -> None:
        self.replica.scopes[name] = state
        if len(state) and not self.replica.observe_entries(state.entries_wire()):
            log.warning(
                "stored scope %s is more than %d ms ahead of the hub's clock",
                name,
                self.replica.hlc.max_skew_ms,
            )
