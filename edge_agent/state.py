"""The agent's synced state: one CRDT scope, durable in the journal.

The device's scope ``device/<id>`` holds, by key prefix:

* ``desired/<name>``  — workload specs written by the hub (hub-signed);
* ``override/<name>`` — local stop/start overrides, written here;
* ``reported/<name>`` — workload status, written here.

Every write to the in-memory :class:`~sync.crdt.LwwMap` is persisted before it
counts: local writes go to the journal as state plus an outbound delta (kept
until upstream acknowledges its dot); remote batches are persisted after they
are merged. On start the scope is rebuilt from the journal, so the supervisor
has its desired state at once, with no network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from edge_agent.journal import Delta, Journal, StateEntry
from edge_agent.supervisor import OverrideAction, RejectedSpec
from sync.crdt import LwwMap
from sync.envelope import packb, unpackb_strict
from sync.models import WorkloadSpec
from sync.protocol import Replica

log = logging.getLogger(__name__)

DESIRED = "desired/"
OVERRIDE = "override/"
REPORTED = "reported/"


def device_scope(device_id: str) -> str:
    """The scope name of a device."""
    return f"device/{device_id}"


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
    """The device scope, its persistence, and the views the supervisor reads.

    Args:
        replica: the node's replica (shared with the sync sessions).
        journal: where every change is made durable.
        device_id: this device's id (the scope is ``device/<id>``).
    """

    def __init__(self, replica: Replica, journal: Journal, device_id: str) -> None:
        self.replica = replica
        self.journal = journal
        self.scope_name = device_scope(device_id)
        self._desired_cache: dict[str, WorkloadSpec | RejectedSpec] | None = None

    @property
    def scope(self) -> LwwMap:
        """The in-memory map of the device scope."""
        return self.replica.scope(self.scope_name)

    async def load(self) -> int:
        """Rebuild the scope from the journal; return the number of keys."""
        rows = await self.journal.read_state(self.scope_name)
        wire = [
            [r.key, r.hlc, r.origin, r.counter, r.tombstone, unpackb_strict(r.value)] for r in rows
        ]
        self.scope.merge_batch(wire)
        if rows:
            # Never issue an HLC below what this replica already wrote.
            self.replica.hlc.update(max(r.hlc for r in rows))
        self._desired_cache = None
        return len(rows)

    async def write_local(self, key: str, value: Any | None) -> LwwMap:
        """Set (or with ``None`` delete) a key here; durable before returning."""
        if value is None:
            delta = self.replica.delete(self.scope_name, key)
        else:
            delta = self.replica.set(self.scope_name, key, value)
        wire = delta.entries_wire()
        await self.journal.put_state(
            [_entry_to_state(self.scope_name, w) for w in wire],
            deltas=[
                Delta(scope=self.scope_name, origin=w[2], counter=w[3], payload=packb(w))
                for w in wire
            ],
        )
        self._desired_cache = None
        return delta

    async def persist_remote(self, keys: Iterable[str] | None) -> None:
        """Persist the current entries of ``keys`` (all keys for ``None``)."""
        scope = self.scope
        if keys is None:
            wire = scope.entries_wire()
        else:
            wanted = set(keys)
            wire = [e for e in scope.entries_wire() if e[0] in wanted]
        if wire:
            await self.journal.put_state([_entry_to_state(self.scope_name, w) for w in wire])
        self._desired_cache = None

    def desired(self) -> Mapping[str, WorkloadSpec | RejectedSpec]:
        """Desired workloads parsed from ``desired/*`` keys (cached until a change)."""
        if self._desired_cache is not None:
            return self._desired_cache
        out: dict[str, WorkloadSpec | RejectedSpec] = {}
        for key, value in self.scope.items():
            if not key.startswith(DESIRED) or value is None:
                continue
            name = key[len(DESIRED) :]
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
