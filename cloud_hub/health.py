"""Device health at the hub: online, offline or unreachable, and lost devices.

Pure and I/O-free, like :mod:`regional_relay.presence` whose output it reads: the
hub feeds it each relay's retained state (``nc/v1/hub/r/<region>/state``), the
relay's presence reports (:class:`~regional_relay.presence.PresenceReport`) and
any other traffic from the relay, and passes the time in (hub clock, ms).

States (see the presence module's docstring, "Reading a summary at the hub")
---------------------------------------------------------------------------

A device is

* ``unreachable`` when its region is: the relay's state is offline or was never
  seen, the relay has been silent for ``relay_timeout_ms`` (failure detector,
  below), or the relay's latest report says its uplink to the hub was down
  (``hub_reachable`` False: the report came late through the relay's outbox).
  The last known device state is kept and shown, but it is not current;
* ``offline`` when its region is reachable and the relay says the device's
  session is down (its Will or a clean shutdown was seen);
* ``online`` otherwise.

Only ``offline`` devices can be **lost** (:meth:`HealthTracker.lost_devices`):
a partitioned region is not a dead region, and re-placing the replicas of every
device behind a lost relay would duplicate workloads when it heals (OpenYurt
#260). The time a device has been offline is counted on the hub's clock from
when the hub first learned of the current offline spell, never from the relay's
``since_ms``: a relay clock that runs behind, or a summary delayed in an outbox,
must not make a device look lost early. Detection can only be late, by at most
the report delay. ``last_seen_ms`` is shown as the relay reported it (relay
clock).

Failure detector
----------------

A **simple timeout detector** on relays, not phi-accrual: a relay is suspected
once nothing (state, report or other traffic) was heard from it for
``relay_timeout_ms``. Relays report on a fixed period but through a durable
outbox, so after an outage they arrive in bursts; phi-accrual's inter-arrival
statistics would learn those bursts as normal jitter (or, after a quiet spell,
suspect a healthy relay too early), while an operator can reason about a fixed
timeout, and it is deterministic for the simulator. Devices need no detector of
their own here: their ``online`` flag already comes from one, the MQTT
keepalive that fires their Will at the regional broker.

Relay states follow the bdSeq rule (:func:`regional_relay.presence.supersedes`),
so a late Will of an old relay session never marks a live relay lost. Device
entries follow it too: an entry with a lower ``bd`` than the one held, or from
an older report of the same relay epoch, is ignored, so reports delivered out of
order never move a device backwards.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Final, Literal

from regional_relay.presence import DevicePresence, PresenceReport, supersedes

__all__ = [
    "DEFAULT_RELAY_TIMEOUT_MS",
    "DeviceHealth",
    "DeviceState",
    "HealthTracker",
    "RegionHealth",
    "RegionState",
    "UnreachableReason",
]

log = logging.getLogger(__name__)

DeviceState = Literal["online", "offline", "unreachable"]
RegionState = Literal["reachable", "unreachable"]
UnreachableReason = Literal[
    "", "relay-never-seen", "relay-offline", "relay-stale", "hub-unreachable"
]
"""Why a region is unreachable (``""`` when it is reachable)."""

DEFAULT_RELAY_TIMEOUT_MS: Final = 90_000
"""Three missed reports at the relay's default 30 s reporting period."""


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """The hub's view of one device.

    Attributes:
        device: the device id.
        region: the region whose relay last reported it.
        state: ``online``, ``offline`` or ``unreachable``.
        online: the relay's last known flag (also shown when unreachable).
        last_seen_ms: when the relay last heard from the device (relay clock,
            0 if never).
        offline_since_ms: when the hub learned of the current offline spell
            (hub clock), None while the relay says online.
        reason: for ``unreachable``, why the region is (see
            :data:`UnreachableReason`); else ``""``.
    """

    device: str
    region: str
    state: DeviceState
    online: bool
    last_seen_ms: int
    offline_since_ms: int | None
    reason: UnreachableReason


@dataclass(frozen=True, slots=True)
class RegionHealth:
    """The hub's view of one region's relay.

    Attributes:
        region: the region.
        state: ``reachable`` or ``unreachable``.
        reason: why it is unreachable, ``""`` when reachable.
        relay_online: the relay's retained state says online.
        relay_bd: bdSeq of the relay state held (-1 if never seen).
        last_heard_ms: when the hub last heard from the relay (hub clock), None
            if never.
        hub_reachable: the latest report's flag (True before any report).
        devices: devices last reported in this region.
    """

    region: str
    state: RegionState
    reason: UnreachableReason
    relay_online: bool
    relay_bd: int
    last_heard_ms: int | None
    hub_reachable: bool
    devices: int


@dataclass(slots=True)
class _Relay:
    online: bool = False
    bd: int = -1
    last_heard_ms: int | None = None
    report_key: tuple[int, int] = (-1, -1)
    """(epoch, at_ms) of the newest report applied."""
    hub_reachable: bool = True
    devices: int = 0


@dataclass(slots=True)
class _Device:
    region: str
    presence: DevicePresence
    report_key: tuple[int, int]
    offline_since_ms: int | None


class HealthTracker:
    """Health of every device and region relay known to the hub.

    Args:
        relay_timeout_ms: silence after which a relay is suspected and its
            region is unreachable.

    Raises:
        ValueError: ``relay_timeout_ms`` is not positive.
    """

    def __init__(self, *, relay_timeout_ms: int = DEFAULT_RELAY_TIMEOUT_MS) -> None:
        if relay_timeout_ms < 1:
            raise ValueError("relay_timeout_ms must be positive")
        self.relay_timeout_ms = relay_timeout_ms
        self._relays: dict[str, _Relay] = {}
        self._devices: dict[str, _Device] = {}
        self.stale_relay_states = 0
        """Relay state messages ignored for a lower bd (late Wills)."""
        self.stale_entries = 0
        """Device entries ignored as older than the one held."""

    # -- inputs ------------------------------------------------------------------------

    def relay_state(self, region: str, online: bool, bd: int, now: int) -> bool:
        """Apply a relay's retained state message (``{"online", "bd", "relay"}``).

        Args:
            region: the relay's region (from the topic).
            online: the relay says it is up (False: its Will).
            bd: the relay's bdSeq.
            now: hub time in ms.

        Returns:
            True if applied, False if ignored as belonging to an older session.
        """
        relay = self._relays.setdefault(region, _Relay())
        if not supersedes(relay.bd, bd):
            self.stale_relay_states += 1
            log.debug("stale relay state of %s ignored (bd %s < %s)", region, bd, relay.bd)
            return False
        if online != relay.online:
            log.info("relay of region %s %s (bd %s)", region, "up" if online else "down", bd)
        relay.online, relay.bd = online, bd
        if online:
            self._heard(relay, now)
        return True

    def relay_heartbeat(self, region: str, now: int) -> None:
        """Record other traffic from a region's relay (proof it is alive).

        Args:
            region: the relay's region.
            now: hub time in ms.
        """
        self._heard(self._relays.setdefault(region, _Relay()), now)

    def relay_report(self, region: str, report: PresenceReport, now: int) -> list[str]:
        """Apply a relay's presence summary or delta.

        Args:
            region: the relay's region.
            report: the decoded report.
            now: hub time in ms.

        Returns:
            The devices whose online flag or session changed, in report order.
        """
        relay = self._relays.setdefault(region, _Relay())
        self._heard(relay, now)
        key = (report.epoch, report.at_ms)
        if key >= relay.report_key:
            relay.report_key = key
            relay.hub_reachable = report.hub_reachable
        changed: list[str] = []
        for device, presence in report.devices.items():
            if self._apply(region, device, presence, key, now):
                changed.append(device)
        return changed

    def forget(self, device: str) -> None:
        """Stop tracking a device (e.g. it was deleted from the fleet)."""
        entry = self._devices.pop(device, None)
        if entry is not None:
            self._relays[entry.region].devices -= 1

    # -- queries -----------------------------------------------------------------------

    def device(self, device: str, now: int) -> DeviceHealth | None:
        """Return the health of ``device`` at ``now``, or None if never reported."""
        entry = self._devices.get(device)
        if entry is None:
            return None
        return self._health(device, entry, self._region_reason(entry.region, now))

    def devices(self, now: int) -> list[DeviceHealth]:
        """Return the health of every known device, sorted by id."""
        reasons = {region: self._region_reason(region, now) for region in self._relays}
        return [
            self._health(name, self._devices[name], reasons[self._devices[name].region])
            for name in sorted(self._devices)
        ]

    def region(self, region: str, now: int) -> RegionHealth | None:
        """Return the health of a region's relay, or None if never heard of."""
        relay = self._relays.get(region)
        if relay is None:
            return None
        reason = self._region_reason(region, now)
        return RegionHealth(
            region=region,
            state="unreachable" if reason else "reachable",
            reason=reason,
            relay_online=relay.online,
            relay_bd=relay.bd,
            last_heard_ms=relay.last_heard_ms,
            hub_reachable=relay.hub_reachable,
            devices=relay.devices,
        )

    def regions(self, now: int) -> list[RegionHealth]:
        """Return the health of every known region, sorted by name."""
        return [h for r in sorted(self._relays) if (h := self.region(r, now)) is not None]

    def counts(self, now: int) -> dict[DeviceState, int]:
        """Return the number of devices in each state (for ``/metrics``)."""
        counter = Counter(h.state for h in self.devices(now))
        return {state: counter[state] for state in ("online", "offline", "unreachable")}

    def lost_devices(self, now: int, lost_after_ms: int) -> list[str]:
        """Return the devices offline (not unreachable) for ``lost_after_ms`` or more.

        The hub re-places the ``replicas`` workloads of these devices, and only
        of these: devices of an unreachable region are never listed.

        Args:
            now: hub time in ms.
            lost_after_ms: how long a device must have been offline.

        Returns:
            The lost devices' ids, sorted.

        Raises:
            ValueError: ``lost_after_ms`` is negative.
        """
        if lost_after_ms < 0:
            raise ValueError("lost_after_ms must not be negative")
        reasons = {region: self._region_reason(region, now) for region in self._relays}
        return [
            name
            for name in sorted(self._devices)
            if (entry := self._devices[name]).offline_since_ms is not None
            and not reasons[entry.region]
            and now - entry.offline_since_ms >= lost_after_ms
        ]

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _heard(relay: _Relay, now: int) -> None:
        if relay.last_heard_ms is None or now > relay.last_heard_ms:
            relay.last_heard_ms = now

    def _region_reason(self, region: str, now: int) -> UnreachableReason:
        relay = self._relays.get(region)
        if relay is None or relay.bd < 0:
            return "relay-never-seen"
        if not relay.online:
            return "relay-offline"
        if relay.last_heard_ms is None or now - relay.last_heard_ms >= self.relay_timeout_ms:
            return "relay-stale"
        if not relay.hub_reachable:
            return "hub-unreachable"
        return ""

    @staticmethod
    def _health(device: str, entry: _Device, reason: UnreachableReason) -> DeviceHealth:
        online = entry.presence.online
        state: DeviceState = "unreachable" if reason else "online" if online else "offline"
        return DeviceHealth(
            device=device,
            region=entry.region,
            state=state,
            online=online,
            last_seen_ms=entry.presence.last_seen_ms,
            offline_since_ms=entry.offline_since_ms,
            reason=reason,
        )

    def _apply(
        self,
        region: str,
        device: str,
        presence: DevicePresence,
        key: tuple[int, int],
        now: int,
    ) -> bool:
        entry = self._devices.get(device)
        if entry is None:
            self._devices[device] = _Device(region, presence, key, None if presence.online else now)
            self._relays[region].devices += 1
            return True
        old = entry.presence
        if entry.region == region and (
            not supersedes(old.bd, presence.bd) or key < entry.report_key
        ):
            self.stale_entries += 1
            return False
        if entry.region != region:
            self._relays[entry.region].devices -= 1
            self._relays[region].devices += 1
            entry.region = region
        changed = (old.online, old.bd) != (presence.online, presence.bd)
        if presence.online:
            entry.offline_since_ms = None
        elif changed or entry.offline_since_ms is None:
            # A new offline spell (or a new session that died): count from now.
            entry.offline_since_ms = now
        entry.presence = presence
        entry.report_key = key
        return changed
