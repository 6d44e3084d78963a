"""Fault schedules, the seeded timeline and fleet assignment."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.faults import (
    DeviceRef,
    FaultSchedule,
    FaultTimeline,
    PartitionRegionFault,
    load_fault_schedule,
)
from simulator.fleet import (
    FleetSpec,
    assign_fleet,
    default_fleet_spec,
    load_fleet_spec,
    outage_means,
    split_counts,
)
from sync._exceptions import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "examples" / "faults"
FLEETS = ROOT / "examples" / "fleets"


def _fleet(n: int = 200, regions: int | None = None, seed: int = 7) -> list[DeviceRef]:
    return list(
        assign_fleet(
            load_fleet_spec(FLEETS / "default.yaml"), n, regions=regions, seed=seed
        ).devices
    )


def test_region_outage_example() -> None:
    schedule = load_fault_schedule(FAULTS / "region-outage.yaml")
    assert schedule.faults == (
        PartitionRegionFault(kind="partition_region", at=60, duration=60, region="region-00"),
    )
    timeline = FaultTimeline(schedule, _fleet(), seed=1)
    assert [(a.t, a.kind, a.region) for a in timeline] == [
        (60.0, "partition", "region-00"),
        (120.0, "heal", "region-00"),
    ]
    assert timeline.heal_times() == {0: 120.0}
    assert schedule.end_s == 120.0


def test_mixed_example_covers_every_kind_and_is_deterministic() -> None:
    schedule = load_fault_schedule(FAULTS / "mixed.yaml")
    kinds = {f.kind for f in schedule.faults}
    assert kinds == {
        "partition_region",
        "flap_devices",
        "kill_relay",
        "kill_hub",
        "kill_broker",
        "clock_skew",
        "fill_disk",
        "garbage",
    }
    devices = _fleet(500)
    means = outage_means({d.profile for d in devices})
    a = FaultTimeline(schedule, devices, seed=42, outage_means=means)
    b = FaultTimeline(schedule, list(reversed(devices)), seed=42, outage_means=means)
    c = FaultTimeline(schedule, devices, seed=43, outage_means=means)
    assert a.actions == b.actions
    assert a.actions != c.actions
    times = [x.t for x in a]
    assert times == sorted(times)
    # Every disruption of a device is undone by the end.
    for down, up in (
        ("link_down", "link_up"),
        ("skew_clock", "unskew_clock"),
        ("fill_disk", "free_disk"),
    ):
        assert sorted(x.device or "" for x in a if x.kind == down) == sorted(
            x.device or "" for x in a if x.kind == up
        )
    skews = [x for x in a if x.kind == "skew_clock"]
    assert len(skews) == 5 and all(x.value == -6 * 3_600_000 for x in skews)
    assert len([x for x in a if x.kind == "garbage"]) == 60
    flaps = [x for x in a if x.kind == "link_down"]
    assert flaps and all(x.region == "region-00" for x in flaps)
    assert all(20 <= x.t <= 320 for x in a if x.fault == 1)
    assert a.between(90, 91) == [x for x in a if 90 <= x.t < 91]


def test_flaps_can_follow_the_profile() -> None:
    schedule = FaultSchedule.model_validate(
        {
            "faults": [
                {
                    "kind": "flap_devices",
                    "at": 0,
                    "duration": 3600,
                    "devices": {"fraction": 1.0},
                    "use_profile": True,
                }
            ]
        }
    )
    devices = _fleet(30)
    profiles = sorted({d.profile for d in devices})
    means = {p: (60.0, 10.0) if p == profiles[0] else (1e9, 1.0) for p in profiles}
    timeline = FaultTimeline(schedule, devices, seed=1, outage_means=means)
    flapping = {x.device for x in timeline if x.kind == "link_down"}
    chosen = {d.device_id for d in devices if d.profile == profiles[0]}
    assert flapping == chosen
    downs = [x for x in timeline if x.kind == "link_down"]
    assert len(downs) > 20 * len(chosen)  # about one per 70 s over an hour


def test_flaps_alternate_per_device() -> None:
    schedule = FaultSchedule.model_validate(
        {
            "faults": [
                {
                    "kind": "flap_devices",
                    "at": 0,
                    "duration": 600,
                    "devices": {"count": 3},
                    "down_s": 5,
                    "up_s": 20,
                    "jitter": False,
                }
            ]
        }
    )
    timeline = FaultTimeline(schedule, _fleet(20), seed=3)
    by_device: dict[str, list[str]] = {}
    for x in timeline:
        by_device.setdefault(x.device or "", []).append(x.kind)
    assert len(by_device) == 3
    for seq in by_device.values():
        assert seq[0::2] == ["link_down"] * (len(seq) // 2)
        assert seq[1::2] == ["link_up"] * (len(seq) // 2)
        assert len(seq) >= 40  # 600 s / 25 s per cycle


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (
            "faults:\n  - kind: partition_region\n    at: 1\n    duration: 0\n    region: a\n",
            "faults[0].partition_region.duration",
        ),
        ("faults:\n  - kind: melt\n    at: 1\n    duration: 1\n", "faults[0]"),
        (
            "faults:\n  - kind: fill_disk\n    at: 1\n    duration: 1\n"
            "    devices: {count: 1, fraction: 0.5}\n",
            "faults[0].fill_disk.devices",
        ),
        (
            "faults:\n  - kind: kill_hub\n    at: 1\n    duration: 1\n    typo: 1\n",
            "faults[0].kill_hub.typo",
        ),
        (
            "faults:\n  - kind: clock_skew\n    at: 1\n    duration: 1\n    hours: 0\n"
            "    devices: {count: 1}\n",
            "faults[0].clock_skew",
        ),
    ],
)
def test_schedule_errors_name_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_fault_schedule(path)
    assert info.value.source == str(path)
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_schedule_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("faults: [\n")
    with pytest.raises(ConfigError, match="line"):
        load_fault_schedule(path)
    with pytest.raises(ConfigError, match="not found"):
        load_fault_schedule(tmp_path / "missing.yaml")


def test_timeline_rejects_unknown_region_and_empty_selection() -> None:
    schedule = FaultSchedule.model_validate(
        {"faults": [{"kind": "kill_relay", "at": 1, "duration": 1, "region": "mars"}]}
    )
    with pytest.raises(ConfigError) as info:
        FaultTimeline(schedule, _fleet(10), seed=0, source="x.yaml")
    assert info.value.field == "faults[0].region" and info.value.source == "x.yaml"
    schedule = FaultSchedule.model_validate(
        {
            "faults": [
                {
                    "kind": "fill_disk",
                    "at": 1,
                    "duration": 1,
                    "devices": {"count": 1, "profile": "nope"},
                }
            ]
        }
    )
    with pytest.raises(ConfigError, match="no device"):
        FaultTimeline(schedule, _fleet(10), seed=0)


def test_split_counts_is_exact() -> None:
    assert split_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert split_counts(7, [4, 2, 1]) == [4, 2, 1]
    assert split_counts(0, [1, 2]) == [0, 0]
    assert sum(split_counts(9973, [0.3, 0.1, 7, 2.5])) == 9973
    with pytest.raises(ValueError):
        split_counts(1, [])


def test_fleet_assignment_is_seeded_and_exact() -> None:
    spec = load_fleet_spec(FLEETS / "default.yaml")
    a = assign_fleet(spec, 1000, regions=10, seed=5)
    b = assign_fleet(spec, 1000, regions=10, seed=5)
    c = assign_fleet(spec, 1000, regions=10, seed=6)
    assert a == b
    assert a.devices != c.devices
    assert a.regions == ("region-00", "region-01", *(f"region-{i:02d}" for i in range(2, 10)))
    assert len({d.device_id for d in a.devices}) == 1000
    counts = a.profile_counts()
    assert all(sum(v.values()) == 100 for v in counts.values())
    # region-00's template: pi4 4/10 of 100 devices; region-02 repeats it.
    assert counts["region-00"]["raspberry-pi-4"] == 40
    assert counts["region-02"] == counts["region-00"]
    assert counts["region-01"]["x86-vsat-gateway"] == 10
    assert a.devices == tuple(sorted(a.devices, key=lambda d: d.device_id))
    one = assign_fleet(spec, 3, seed=0)
    assert one.regions == ("region-00", "region-01")


def test_fleet_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("regions:\n  - name: r\n    profiles: {no-such-board: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_fleet_spec(path)
    assert info.value.field == "regions[0].profiles.no-such-board"
    path.write_text("regions:\n  - name: r\n    profiles: {raspberry-pi-4: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_fleet_spec(path)
    assert info.value.field == "regions[0].profiles.raspberry-pi-4"
    path.write_text(
        "regions:\n  - {name: r, profiles: {raspberry-pi-4: 1}}\n"
        "  - {name: r, profiles: {raspberry-pi-4: 1}}\n"
    )
    with pytest.raises(ConfigError, match="unique"):
        load_fleet_spec(path)
    with pytest.raises(ConfigError) as info:
        assign_fleet(default_fleet_spec(), 0)
    assert info.value.field == "--devices"


def test_default_spec_uses_every_builtin_profile() -> None:
    spec = default_fleet_spec()
    assert isinstance(spec, FleetSpec)
    fleet = assign_fleet(spec, 80, seed=1)
    assert len({d.profile for d in fleet.devices}) == 8
