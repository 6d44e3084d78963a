"""In-memory stand-ins for the hub's dependencies, for tests and the simulator.

* :class:`InMemoryDesiredWriter` implements
  :class:`cloud_hub.controller.DesiredWriter`: it holds each device's desired
  workloads and records every write, so a test can assert what a device would
  run and that no workload runs twice.
* :class:`HealthFeed` drives a :class:`~cloud_hub.health.HealthTracker` the way
  a region's relay would (relay up, device online / offline), without MQTT.
* :class:`EventRecorder` is a ``publish`` callable that keeps the events.

All of them are deterministic and do no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloud_hub.health import HealthTracker
from regional_relay.presence import DevicePresence, PresenceReport

__all__ = ["DesiredWrite", "EventRecorder", "HealthFeed", "InMemoryDesiredWriter"]


@dataclass(frozen=True, slots=True)
class DesiredWrite:
    """One recorded :meth:`InMemoryDesiredWriter.set_desired` call."""

    device_id: str
    workload: str
    spec: Mapping[str, Any] | None


class InMemoryDesiredWriter:
    """A :class:`~cloud_hub.controller.DesiredWriter` that keeps desired state in memory.

    Attributes:
        writes: every call, in order.
        blocked: devices whose writes wait until :meth:`unblock` (to test that a
            stuck device or region does not hold up other work).
        fail: devices whose writes raise :class:`ConnectionError`.
    """

    def __init__(self) -> None:
        self.writes: list[DesiredWrite] = []
        self._desired: dict[str, dict[str, Mapping[str, Any]]] = {}
        self.blocked: set[str] = set()
        self.fail: set[str] = set()
        self._unblocked = asyncio.Event()

    async def set_desired(
        self, device_id: str, workload: str, spec: Mapping[str, Any] | None
    ) -> None:
        """Record the write and apply it to the device's desired workloads."""
        if device_id in self.fail:
            raise ConnectionError(f"write to {device_id} failed (test)")
        while device_id in self.blocked:
            self._unblocked.clear()
            await self._unblocked.wait()
        self.writes.append(DesiredWrite(device_id, workload, None if spec is None else dict(spec)))
        if spec is None:
            self._desired.get(device_id, {}).pop(workload, None)
        else:
            self._desired.setdefault(device_id, {})[workload] = dict(spec)

    def unblock(self, device_id: str) -> None:
        """Let writes to ``device_id`` through."""
        self.blocked.discard(device_id)
        self._unblocked.set()

    def desired(self, device_id: str) -> dict[str, Mapping[str, Any]]:
        """The device's desired workloads, by name."""
        return dict(self._desired.get(device_id, {}))

    def spec(self, device_id: str, workload: str) -> Mapping[str, Any] | None:
        """The desired spec of one workload on one device, or None."""
        return self._desired.get(device_id, {}).get(workload)

    def version(self, device_id: str, workload: str) -> str | None:
        """The desired version of one workload on one device, or None."""
        spec = self.spec(device_id, workload)
        return None if spec is None else str(spec["version"])

    def devices_running(self, workload: str) -> list[str]:
        """Devices whose desired state holds ``workload``, sorted."""
        return sorted(d for d, specs in self._desired.items() if workload in specs)

    def writes_to(self, device_id: str) -> list[DesiredWrite]:
        """The writes made to one device, in order."""
        return [w for w in self.writes if w.device_id == device_id]


class HealthFeed:
    """Feed a :class:`HealthTracker` as a relay would: one relay per region.

    Args:
        health: the tracker to feed.
    """

    def __init__(self, health: HealthTracker) -> None:
        self.health = health
        self._bd: dict[str, int] = {}
        self._at: dict[str, int] = {}

    def relay_up(self, region: str, now: int) -> None:
        """The region's relay is (still) up: a retained state and a heartbeat."""
        if region not in self._bd:
            self._bd[region] = 1
            self.health.relay_state(region, True, 1, now)
        self.health.relay_heartbeat(region, now)

    def device(self, region: str, device_id: str, online: bool, now: int) -> list[str]:
        """Report a device online or offline through the region's relay.

        Returns:
            The devices whose state changed (see :meth:`HealthTracker.relay_report`).
        """
        self.relay_up(region, now)
        at = max(now, self._at.get(region, 0) + 1)
        self._at[region] = at
        report = PresenceReport(
            epoch=self._bd[region],
            at_ms=at,
            hub_reachable=True,
            since=0,
            cursor=at,
            more=False,
            online=int(online),
            offline=int(not online),
            devices={
                device_id: DevicePresence(online=online, bd=1, last_seen_ms=now, since_ms=now)
            },
        )
        return self.health.relay_report(region, report, now)


@dataclass(slots=True)
class EventRecorder:
    """A ``publish(kind, data)`` callable that keeps every event.

    Attributes:
        events: (kind, data) in order.
    """

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, kind: str, data: Mapping[str, Any]) -> None:
        """Record one event."""
        self.events.append((kind, dict(data)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The data of every event of one kind."""
        return [d for k, d in self.events if k == kind]
