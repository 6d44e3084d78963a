"""The device state across a wall clock that went back (a dead RTC battery, an
NTP step): the journal still loads and the device's next write still wins."""

from __future__ import annotations

from pathlib import Path

from edge_agent.journal import Journal
from edge_agent.state import DeviceState, device_scope
from sync.hlc import HybridLogicalClock
from sync.protocol import Replica
from sync.testing import ManualClock

DEVICE = "gw-1"
NOW = 1_700_000_000_000
HOURS = 3_600_000


async def test_own_writes_from_hours_ahead_load_and_are_superseded(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    ahead = ManualClock(NOW + 3 * HOURS)
    async with Journal.open(path, quota_bytes=1 << 24) as journal:
        state = DeviceState(Replica(DEVICE, HybridLogicalClock(ahead)), journal, DEVICE, None)
        await state.write_local("override/web", {"action": "stop"})
        old_ts = state.scope.entry("override/web")[0]  # type: ignore[index]

    # Restarted with the clock three hours back: far past the five-minute skew
    # bound, which applies to peers, not to the device's own history.
    clock = ManualClock(NOW)
    async with Journal.open(path, quota_bytes=1 << 24) as journal:
        replica = Replica(DEVICE, HybridLogicalClock(clock))
        state = DeviceState(replica, journal, DEVICE, None)
        assert await state.load() == 1
        assert replica.hlc.last >= old_ts
        assert replica.hlc.skew_clamped == 0
        await state.write_local("override/web", None)  # the operator clears it
        entry = state.scope.entry("override/web")
        assert entry is not None and entry[0] > old_ts
        assert replica.scope(device_scope(DEVICE)).get("override/web") is None

    async with Journal.open(path, quota_bytes=1 << 24) as journal:
        state = DeviceState(Replica(DEVICE, HybridLogicalClock(clock)), journal, DEVICE, None)
        await state.load()
        assert state.scope.get("override/web") is None  # the clear is what was kept
