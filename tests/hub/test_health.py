"""Device health: online / offline / unreachable, relay failure detector, lost devices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub.health import DeviceHealth, HealthTracker
from regional_relay.presence import DevicePresence, PresenceReport

S = 1_000
MIN = 60 * S
TIMEOUT = 90 * S
LOST_AFTER = 10 * MIN


class FakeClock:
    """Hub time, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


def report(
    at: int,
    devices: dict[str, tuple[bool, int]],
    *,
    epoch: int = 1,
    hub_reachable: bool = True,
) -> PresenceReport:
    """A relay report; ``devices`` maps id -> (online, bd), last seen at ``at``."""
    return PresenceReport(
        epoch=epoch,
        at_ms=at,
        hub_reachable=hub_reachable,
        since=0,
        cursor=1,
        more=False,
        online=sum(online for online, _ in devices.values()),
        offline=sum(not online for online, _ in devices.values()),
        devices={
            name: DevicePresence(online, bd, at if online else 0, at)
            for name, (online, bd) in devices.items()
        },
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(clock: FakeClock) -> HealthTracker:
    t = HealthTracker(relay_timeout_ms=TIMEOUT)
    t.relay_state("eu", True, 1, clock.now)
    t.relay_report("eu", report(clock.now, {"gw-1": (True, 1), "gw-2": (True, 1)}), clock.now)
    return t


def state(t: HealthTracker, device: str, now: int) -> str:
    health = t.device(device, now)
    assert health is not None
    return health.state


def heartbeat(t: HealthTracker, clock: FakeClock, ms: int, region: str = "eu") -> int:
    """Advance the clock in steps, the relay staying alive all along."""
    while ms > 0:
        step = min(ms, 30 * S)
        clock.advance(step)
        t.relay_heartbeat(region, clock.now)
        ms -= step
    return clock.now


def test_online_with_last_seen(tracker: HealthTracker, clock: FakeClock) -> None:
    health = tracker.device("gw-1", clock.now)
    assert health == DeviceHealth(
        device="gw-1",
        region="eu",
        state="online",
        online=True,
        last_seen_ms=clock.now,
        offline_since_ms=None,
        reason="",
    )
    assert tracker.device("nobody", clock.now) is None
    assert tracker.counts(clock.now) == {"online": 2, "offline": 0, "unreachable": 0}
    region = tracker.region("eu", clock.now)
    assert region is not None
    assert (region.state, region.devices, region.relay_bd) == ("reachable", 2, 1)


def test_device_death_is_offline_then_lost(tracker: HealthTracker, clock: FakeClock) -> None:
    died = clock.advance(S)
    changed = tracker.relay_report("eu", report(died, {"gw-1": (False, 1)}), died)
    assert changed == ["gw-1"]
    assert state(tracker, "gw-1", died) == "offline"
    assert state(tracker, "gw-2", died) == "online"
    health = tracker.device("gw-1", died)
    assert health is not None
    assert health.offline_since_ms == died
    heartbeat(tracker, clock, LOST_AFTER - 1)
    assert tracker.lost_devices(clock.now, LOST_AFTER) == []
    heartbeat(tracker, clock, 1)
    assert tracker.lost_devices(clock.now, LOST_AFTER) == ["gw-1"]
    # The same death reported again does not restart the spell.
    tracker.relay_report("eu", report(clock.now, {"gw-1": (False, 1)}), clock.now)
    assert tracker.lost_devices(clock.now, LOST_AFTER) == ["gw-1"]
    # It comes back (new session): online, no longer lost.
    back = clock.advance(S)
    assert tracker.relay_report("eu", report(back, {"gw-1": (True, 2)}), back) == ["gw-1"]
    assert state(tracker, "gw-1", back) == "online"
    assert tracker.lost_devices(back, LOST_AFTER) == []


def test_partition_relay_down_is_unreachable_not_lost(
    tracker: HealthTracker, clock: FakeClock
) -> None:
    clock.advance(S)
    tracker.relay_state("eu", False, 1, clock.now)  # the relay's Will
    for device in ("gw-1", "gw-2"):
        health = tracker.device(device, clock.now)
        assert health is not None
        assert health.state == "unreachable"
        assert health.reason == "relay-offline"
        assert health.online  # last known flag still shown
    clock.advance(10 * LOST_AFTER)
    assert tracker.lost_devices(clock.now, LOST_AFTER) == []
    assert tracker.counts(clock.now)["unreachable"] == 2
    # Heal: a new relay session; devices are online again, nothing was lost.
    tracker.relay_state("eu", True, 2, clock.now)
    assert state(tracker, "gw-1", clock.now) == "online"


def test_partition_hides_a_device_already_offline(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.relay_report("eu", report(clock.now, {"gw-1": (False, 1)}), clock.now)
    clock.advance(LOST_AFTER // 2)
    tracker.relay_state("eu", False, 1, clock.now)
    clock.advance(LOST_AFTER)
    assert state(tracker, "gw-1", clock.now) == "unreachable"
    assert tracker.lost_devices(clock.now, LOST_AFTER) == []


def test_silent_relay_is_suspected_by_timeout(tracker: HealthTracker, clock: FakeClock) -> None:
    start = clock.now
    assert state(tracker, "gw-1", start + TIMEOUT - 1) == "online"
    assert state(tracker, "gw-1", start + TIMEOUT) == "unreachable"
    region = tracker.region("eu", start + TIMEOUT)
    assert region is not None
    assert (region.state, region.reason) == ("unreachable", "relay-stale")
    # Any traffic from the relay clears the suspicion.
    tracker.relay_heartbeat("eu", start + TIMEOUT + 1)
    assert state(tracker, "gw-1", start + TIMEOUT + 1) == "online"


def test_stale_region_devices_are_never_lost(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.relay_report("eu", report(clock.now, {"gw-1": (False, 1)}), clock.now)
    assert tracker.lost_devices(clock.now + LOST_AFTER + TIMEOUT, LOST_AFTER) == []


def test_report_with_hub_unreachable_marks_region_unreachable(
    tracker: HealthTracker, clock: FakeClock
) -> None:
    late = report(clock.now + S, {"gw-1": (False, 1)}, hub_reachable=False)
    tracker.relay_report("eu", late, clock.advance(5 * S))
    health = tracker.device("gw-1", clock.now)
    assert health is not None
    assert (health.state, health.reason, health.online) == ("unreachable", "hub-unreachable", False)
    # The relay's next report, sent with its uplink back, restores the view.
    tracker.relay_report("eu", report(clock.now, {}), clock.advance(S))
    assert state(tracker, "gw-1", clock.now) == "offline"


def test_relay_never_seen_is_unreachable(clock: FakeClock) -> None:
    t = HealthTracker()
    t.relay_report("us", report(clock.now, {"gw-9": (True, 1)}), clock.now)
    health = t.device("gw-9", clock.now)
    assert health is not None
    assert (health.state, health.reason) == ("unreachable", "relay-never-seen")


def test_late_relay_will_is_ignored(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.relay_state("eu", True, 5, clock.advance(S))
    assert not tracker.relay_state("eu", False, 4, clock.advance(S))  # old session's Will
    assert tracker.stale_relay_states == 1
    assert state(tracker, "gw-1", clock.now) == "online"


def test_out_of_order_reports_never_move_a_device_backwards(
    tracker: HealthTracker, clock: FakeClock
) -> None:
    old_at = clock.now + S
    new_at = clock.now + 2 * S
    tracker.relay_report("eu", report(new_at, {"gw-1": (False, 1)}), clock.advance(3 * S))
    # An older report of the same epoch, delivered late, is ignored...
    tracker.relay_report("eu", report(old_at, {"gw-1": (True, 1)}), clock.advance(S))
    assert state(tracker, "gw-1", clock.now) == "offline"
    # ...and so is an entry of an older session, even in a newer report.
    tracker.relay_report("eu", report(new_at + S, {"gw-2": (False, 3)}), clock.now)
    tracker.relay_report("eu", report(new_at + 2 * S, {"gw-2": (True, 2)}), clock.now)
    assert state(tracker, "gw-2", clock.now) == "offline"
    assert tracker.stale_entries == 2


def test_device_moving_region_and_forget(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.relay_state("us", True, 1, clock.now)
    tracker.relay_report("us", report(clock.now, {"gw-1": (True, 1)}, epoch=7), clock.now)
    health = tracker.device("gw-1", clock.now)
    assert health is not None
    assert health.region == "us"
    assert [(r.region, r.devices) for r in tracker.regions(clock.now)] == [("eu", 1), ("us", 1)]
    tracker.forget("gw-1")
    tracker.forget("gw-1")
    assert tracker.device("gw-1", clock.now) is None
    assert [r.devices for r in tracker.regions(clock.now)] == [1, 0]


def test_devices_listing_is_sorted_and_bounds_validated(tracker: HealthTracker) -> None:
    assert [h.device for h in tracker.devices(0)] == ["gw-1", "gw-2"]
    assert tracker.region("mars", 0) is None
    with pytest.raises(ValueError, match="lost_after_ms"):
        tracker.lost_devices(0, -1)
    with pytest.raises(ValueError, match="relay_timeout_ms"):
        HealthTracker(relay_timeout_ms=0)


step = st.tuples(
    st.integers(0, 3 * MIN),
    st.sampled_from(["relay-up", "relay-down", "beat", "report", "stale-report"]),
    st.integers(0, 3),  # device index
    st.booleans(),  # online
    st.integers(0, 3),  # bd
)


@given(steps=st.lists(step, max_size=40))
@settings(max_examples=200, deadline=None)
def test_lost_devices_are_offline_in_a_reachable_region(
    steps: list[tuple[int, str, int, bool, int]],
) -> None:
    """Whatever happens, lost implies offline now in a reachable region, for long enough."""
    now = 0
    relay_bd = 0
    t = HealthTracker(relay_timeout_ms=TIMEOUT)
    for dt, kind, index, online, bd in steps:
        now += dt
        device = f"gw-{index}"
        match kind:
            case "relay-up":
                relay_bd += 1
                t.relay_state("eu", True, relay_bd, now)
            case "relay-down":
                t.relay_state("eu", False, relay_bd, now)
            case "beat":
                t.relay_heartbeat("eu", now)
            case "report":
                t.relay_report("eu", report(now, {device: (online, bd)}), now)
            case _:
                t.relay_report("eu", report(now, {device: (online, bd)}, hub_reachable=False), now)
        healths = {h.device: h for h in t.devices(now)}
        assert sum(t.counts(now).values()) == len(healths)
        for name in t.lost_devices(now, LOST_AFTER):
            health = healths[name]
            assert health.state == "offline"
            assert health.offline_since_ms is not None
            assert now - health.offline_since_ms >= LOST_AFTER
        for health in healths.values():
            if health.state == "unreachable":
                assert health.reason
                assert health.device not in t.lost_devices(now, 0)
