"""The agent's synced state: two CRDT scopes, durable in the journal.

* ``desired/<id>``: one key per workload, the spec the hub wants here. Only the
  hub writes it, and every entry carries the hub's own signature
  (:mod:`sync.signed`), checked on receipt and again when read, so no relay in
  between can add, change or remove a workload.
* ``device/<id>``: written here. ``override/<name>`` holds local stop/start
  overrides and ``reported/<name>`` the workload status.

Every write to the in-memory :class:`~sync.crdt.LwwMap` is persisted before it
counts: local writes go to the journal as state plus an outbound delta (kept
until upstream acknowledges its dot); remote batches are persisted after they
are merged. On start the scope is rebuilt from the journal, so the supervisor
has its desired state at once, with no network.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from edge_agent.journal import Delta, Journal, StateEntry
from edge_agent.supervisor import OverrideAction, RejectedSpec
from sync._exceptions import SignatureError
from sync.crdt import LwwMap
from sync.envelope import packb, unpackb_strict
from sync.keys import KeyRing
from sync.models import WorkloadSpec
from sync.protocol import Replica
from sync.signed import verify_entry

log = logging.getLogger(__name__)

OVERRIDE = "override/"
REPORTED = "reported/"


def device_scope(device_id: str) -> str:
    """The scope a device writes (overrides, reported status)."""
    return f"device/{device_id}"


def desired_scope(device_id: str) -> str:
    """The scope the hub writes for a device (signed desired workloads)."""
    return f"desired/{device_id}"


def is_signed_scope(scope: str) -> bool:
    """Whether entries of ``scope`` must carry the hub's signature."""
    return scope.startswith("desired/")


def _entry_to_state(scope: str, wire: list[Any]) -> StateEntry:
    key, ts, origin, counter, deleted, value = wire
    return StateEntry(
        scope=scope,
        key=key,
        value=packb(value),
        hlc=ts,
        origin=origin,
        counter=counter,
        tombstone=bool(deleted),
    )


class DeviceState:
    """The device's scopes, their persistence, and the views the supervisor reads.

    Args:
        replica: the node's replica (shared with the sync sessions).
        journal: where every change is made durable.
        device_id: this device's id.
        hub_keys: keys of the hub, which signs desired state (``None``: not
            enrolled, so nothing desired is trusted).
    """

    def __init__(
        self, replica: Replica, journal: Journal, device_id: str, hub_keys: KeyRing | None
    ) -> None:
        self.replica = replica
        self.journal = journal
        self.hub_keys = hub_keys
        self.scope_name = device_scope(device_id)
        self.desired_scope_name = desired_scope(device_id)
        self._desired_cache: dict[str, WorkloadSpec | RejectedSpec] | None = None
        self._write_lock = asyncio.Lock()

    @property
    def scope(self) -> LwwMap:
        """The in-memory map of the device scope."""
        return self.replica.scope(self.scope_name)

    @property
    def scopes(self) -> tuple[str, str]:
        """The two scopes synced upstream."""
        return (self.scope_name, self.desired_scope_name)

    async def load(self) -> int:
        """Rebuild both scopes from the journal; return the number of keys."""
        total = 0
        for name in self.scopes:
            rows = await self.journal.read_state(name)
            wire = [
                [r.key, r.hlc, r.origin, r.counter, r.tombstone, unpackb_strict(r.value)]
                for r in rows
            ]
            self.replica.scope(name).merge_batch(wire)
            # Never issue an HLC below what this device wrote before, even if its
            # clock went back since; the hub's entries move it only within the
            # skew bound (a start never fails on a clock).
            self.replica.observe_entries(wire)
            total += len(rows)
        self._desired_cache = None
        return total

    async def write_local(self, key: str, value: Any | None) -> LwwMap:
        """Set (or with ``None`` delete) a key here; durable before it counts.

        The write is journaled first and only then applied to the in-memory
        scope: when the journal refuses it (a full disk), nothing changed, so
        the device never acts on, or syncs up, a write it would forget at its
        next start (and then reissue under the same dot). Local writes are
        serialized, since each takes the next dot of this device.

        Raises:
            JournalError: the write could not be made durable; nothing changed.
        """
        async with self._write_lock:
            delta = self.scope.write_delta(
                key,
                value,
                ts=self.replica.hlc.now(),
                origin=self.replica.replica_id,
                deleted=value is None,
            )
            wire = delta.entries_wire()
            await self.journal.put_state(
                [_entry_to_state(self.scope_name, w) for w in wire],
                deltas=[
                    Delta(scope=self.scope_name, origin=w[2], counter=w[3], payload=packb(w))
                    for w in wire
                ],
            )
            self.scope.apply_entries(wire, None)
        self._desired_cache = None
        return delta

    async def persist_remote(self, scope_name: str, keys: Iterable[str] | None) -> None:
        """Persist the current entries of ``keys`` of a scope (all for ``None``)."""
        scope = self.replica.scope(scope_name)
        if keys is None:
            wire = scope.entries_wire()
        else:
            wanted = set(keys)
            wire = [e for e in scope.entries_wire() if e[0] in wanted]
        if wire:
            await self.journal.put_state([_entry_to_state(scope_name, w) for w in wire])
        self._desired_cache = None

    def desired(self) -> Mapping[str, WorkloadSpec | RejectedSpec]:
        """Desired workloads parsed from ``desired/*`` keys (cached until a change)."""
        if self._desired_cache is not None:
            return self._desired_cache
        out: dict[str, WorkloadSpec | RejectedSpec] = {}
        scope_name = self.desired_scope_name
        for wire in self.replica.scope(scope_name).entries_wire():
            name = wire[0]
            if self.hub_keys is None:
                out[name] = RejectedSpec(name, "not enrolled: no hub key to verify desired state")
                continue
            try:
                value = verify_entry(self.hub_keys, scope_name, wire)
            except SignatureError as exc:
                out[name] = RejectedSpec(name, f"desired state not signed by the hub: {exc}")
                continue
            if value is None:  # removed by the hub
                continue
            try:
                spec = WorkloadSpec.model_validate(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "spec"
                out[name] = RejectedSpec(name, f"invalid spec: {where}: {first['msg']}")
                continue
            if spec.name != name:
                out[name] = RejectedSpec(name, f"spec name {spec.name!r} does not match key")
                continue
            out[name] = spec
        self._desired_cache = out
        return out

    def overrides(self) -> Mapping[str, OverrideAction]:
        """Local overrides in force (``override/<name>`` = ``{"action": ...}``)."""
        out: dict[str, OverrideAction] = {}
        for key, value in self.scope.items():
            if key.startswith(OVERRIDE) and isinstance(value, dict):
                action = value.get("action")
                if action in ("stop", "start"):
                    out[key[len(OVERRIDE) :]] = action
        return out
