"""The device state under a clock that went back (a dead RTC battery, an NTP
step) and a full disk: the journal still loads, the device's next write still
wins, and a write the journal refuses changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.journal import Journal, JournalWriteError
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


async def test_a_write_the_full_disk_refuses_changes_nothing(tmp_path: Path) -> None:
    """A local write (an override, a reported status) that the journal cannot make
    durable must not count in memory either: the device would act on it and sync
    it up, then forget it at its next start and reissue its dot for another write."""
    async with Journal.open(tmp_path / "journal.db", quota_bytes=1 << 24) as journal:
        replica = Replica(DEVICE, HybridLogicalClock(ManualClock(NOW)))
        state = DeviceState(replica, journal, DEVICE, None)
        await state.write_local("override/web", {"action": "stop"})
        before = (state.scope.to_wire(), await journal.read_state(state.scope_name))
        await journal.freeze_size(True)  # the disk is full
        with pytest.raises(JournalWriteError, match="full"):
            await state.write_local("override/web", {"action": "start" * 10_000})
        assert (state.scope.to_wire(), await journal.read_state(state.scope_name)) == before
        assert state.overrides() == {"web": "stop"}
        await journal.freeze_size(False)  # space again
        delta = await state.write_local("override/web", {"action": "start"})
        # The next dot, neither skipped nor reused.
        assert [(e[2], e[3]) for e in delta.entries_wire()] == [(DEVICE, 2)]
        assert state.overrides() == {"web": "start"}
