"""The fleet as placement sees it: devices, their free capacity and presence.

:class:`FleetReader` reads the store (every device, every assignment) and turns
it into :class:`~cloud_hub.placement.DeviceView` records for
:func:`~cloud_hub.placement.place`: capacity from the device's firmware profile
(loaded once per name, off the event loop), minus the resources of every
deployment already placed on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence

from cloud_hub._controller_plan import ControllerStats, device_views
from cloud_hub.health import HealthTracker
from cloud_hub.manifests import Deployment
from cloud_hub.placement import DeviceView
from cloud_hub.store import MAX_PAGE_LIMIT, DeviceQuery, DeviceRecord, Store
from firmware_profiles import FirmwareProfile
from sync._exceptions import NovaCronError

__all__ = ["FleetReader", "ResourcesOf", "online_flags"]

log = logging.getLogger(__name__)

ResourcesOf = Callable[[str, Deployment], Awaitable[tuple[int, int] | None]]
"""(deployment name, the deployment being placed) -> (cpu millis, memory MB)
each of its copies reserves, or None when it is unknown."""


def online_flags(
    records: Sequence[DeviceRecord], holders: Collection[str], health: HealthTracker, now: int
) -> dict[str, bool]:
    """Whether each device counts as online for placement.

    Devices already holding the deployment count as online, so a short outage
    never moves a replica at a re-apply (lost devices are the controller's
    tick's business). Others: the health view if it knows the device, else
    the stored status (``unknown`` counts as online: a device just enrolled).
    """
    held = set(holders)
    out: dict[str, bool] = {}
    for rec in records:
        if rec.id in held:
            out[rec.id] = True
            continue
        view = health.device(rec.id, now)
        if view is not None:
            out[rec.id] = view.state == "online"
        else:
            out[rec.id] = rec.status in ("online", "unknown")
    return out


class FleetReader:
    """Builds placement views of the fleet from the store.

    Args:
        store: the hub store.
        health: the hub's health view.
        profile_loader: firmware profile by name (blocking; run in a thread).
        stats: where devices with an unknown profile are counted.
    """

    def __init__(
        self,
        store: Store,
        health: HealthTracker,
        profile_loader: Callable[[str], FirmwareProfile],
        stats: ControllerStats,
    ) -> None:
        self.store = store
        self.health = health
        self._loader = profile_loader
        self._stats = stats
        self._profiles: dict[str, FirmwareProfile | None] = {}

    async def views(
        self,
        deployment: Deployment,
        holders: Sequence[str],
        now: int,
        resources_of: ResourcesOf,
        *,
        only: DeviceRecord | None = None,
    ) -> list[DeviceView]:
        """Placement views of the fleet (or of the device ``only``).

        Args:
            deployment: the deployment being placed.
            holders: devices it is placed on now.
            now: hub time in ms.
            resources_of: what each placed deployment reserves per copy.
            only: view this one device instead of the whole fleet.
        """
        if only is not None:
            records: list[DeviceRecord] = [only]
            assignments = await self.store.list_assignments(device_id=only.id)
        else:
            records = await self._all_devices()
            assignments = await self.store.list_assignments()
        allocated: dict[str, tuple[int, int]] = {}
        cache: dict[str, tuple[int, int] | None] = {}
        for a in assignments:
            if a.deployment not in cache:
                cache[a.deployment] = await resources_of(a.deployment, deployment)
            res = cache[a.deployment]
            if res is not None:
                cpu, mem = allocated.get(a.device_id, (0, 0))
                allocated[a.device_id] = (cpu + res[0], mem + res[1])
        profiles: dict[str, FirmwareProfile] = {}
        for rec in records:
            if rec.profile not in profiles:
                profile = await self._profile(rec.profile)
                if profile is not None:
                    profiles[rec.profile] = profile
        self._stats.unknown_profiles += sum(1 for r in records if r.profile not in profiles)
        online = online_flags(records, holders, self.health, now)
        return device_views(records, profiles, allocated, online)

    async def _profile(self, name: str) -> FirmwareProfile | None:
        if name not in self._profiles:
            try:
                profile: FirmwareProfile | None = await asyncio.to_thread(self._loader, name)
            except NovaCronError as exc:
                log.warning("firmware profile %s cannot be loaded: %s", name, exc)
                profile = None
            self._profiles[name] = profile
        return self._profiles[name]

    async def _all_devices(self) -> list[DeviceRecord]:
        out: list[DeviceRecord] = []
        cursor: str | None = None
        while True:
            page = await self.store.list_devices(DeviceQuery(cursor=cursor, limit=MAX_PAGE_LIMIT))
            out.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                return out
