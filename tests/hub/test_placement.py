"""Placement: filters and their reasons, capacity, determinism, spread, lost replicas."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub._exceptions import HubError, PlacementError
from cloud_hub.manifests import Deployment, parse_manifest
from cloud_hub.placement import (
    REJECT_REASONS,
    Assignment,
    DeviceView,
    apply_placement,
    dedupe_replicas,
    place,
    rebalance,
    tiebreak,
)
from firmware_profiles import load_profile
from sync.models import Resources


def deployment(
    name: str = "dep",
    *,
    replicas: int | None = None,
    driver: str = "process",
    cpu: int = 100,
    mem: int = 64,
    **selector: Any,
) -> Deployment:
    """A deployment of a workload needing ``cpu`` / ``mem``, with a selector."""
    workload: dict[str, Any] = {
        "name": "w",
        "driver": driver,
        "resources": {"cpu_millis": cpu, "memory_mb": mem},
    }
    if driver == "process":
        workload["command"] = ["sleep", "1"]
    if driver == "podman":
        workload["image"] = "img"
    spec: dict[str, Any] = {"workload": workload, "selector": selector}
    if replicas is not None:
        spec["replicas"] = replicas
    doc = {
        "kind": "Deployment",
        "apiVersion": "novacron.io/v1",
        "metadata": {"name": name},
        "spec": spec,
    }
    return parse_manifest(json.dumps(doc))


def device(
    dev_id: str,
    *,
    region: str = "r1",
    profile: str = "p1",
    arch: str = "x86_64",
    drivers: Sequence[str] = ("process", "podman"),
    gpu: bool = False,
    cpu: int = 4000,
    mem: int = 4096,
    used_cpu: int = 0,
    used_mem: int = 0,
    labels: dict[str, str] | None = None,
    online: bool = True,
    reliability: float = 1.0,
) -> DeviceView:
    return DeviceView(
        id=dev_id,
        region=region,
        profile=profile,
        arch=arch,
        drivers=frozenset(drivers),
        gpu=gpu,
        cpu_millis=cpu,
        memory_mb=mem,
        allocated_cpu_millis=used_cpu,
        allocated_memory_mb=used_mem,
        labels=labels or {},
        online=online,
        reliability=reliability,
    )


# --- filters -----------------------------------------------------------------

FILTERS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("region", {"regions": ["r1"]}, {"region": "r2"}),
    ("profile", {"profiles": ["p1"]}, {"profile": "p2"}),
    ("arch", {"arch": ["x86_64"]}, {"arch": "aarch64"}),
    ("labels", {"labels": {"site": "a"}}, {"labels": {"site": "b"}}),
    ("labels", {"labels": {"site": "a"}}, {"labels": {}}),
    ("driver", {"drivers": ["process", "libvirt"]}, {"drivers": ("process",)}),
    ("driver", {}, {"drivers": ("podman",)}),  # the workload's own driver is required
    ("gpu", {"gpu": True}, {"gpu": False}),
    ("gpu", {"gpu": False}, {"gpu": True}),
    ("cpu", {}, {"used_cpu": 3950}),
    ("memory", {}, {"used_mem": 4050}),
]


@pytest.mark.parametrize(
    ("reason", "selector", "bad"), FILTERS, ids=[f"{f[0]}-{i}" for i, f in enumerate(FILTERS)]
)
@pytest.mark.parametrize("replicas", [None, 5])
def test_each_filter_rejects_with_its_reason(
    reason: str, selector: dict[str, Any], bad: dict[str, Any], replicas: int | None
) -> None:
    good_attrs: dict[str, Any] = {"labels": {"site": "a"}, "drivers": ("process", "libvirt")}
    if selector.get("gpu"):
        good_attrs["gpu"] = True
    dep = deployment(replicas=replicas, **selector)
    devices = [device("good", **good_attrs), device("bad", **{**good_attrs, **bad})]
    result = place(dep, devices)
    assert result.devices == ("good",)
    assert result.rejected == {"bad": reason}
    assert result.rejections == {reason: 1}
    assert result.feasible == 1


def test_first_failing_filter_is_the_reason() -> None:
    dep = deployment(regions=["r1"], arch=["x86_64"])
    result = place(dep, [device("d", region="r2", arch="aarch64", used_cpu=4000)])
    assert result.rejected == {"d": "region"}


def test_rejections_counted_in_filter_order() -> None:
    dep = deployment(regions=["r1"])
    devices = [device(f"m{i}", used_mem=4096) for i in range(3)] + [
        device(f"r{i}", region="r9") for i in range(2)
    ]
    result = place(dep, devices)
    assert result.devices == ()
    assert list(result.rejections.items()) == [("region", 2), ("memory", 3)]
    assert set(result.rejections) <= set(REJECT_REASONS)


def test_exact_fit_is_feasible() -> None:
    dep = deployment(cpu=1000, mem=1024)
    result = place(dep, [device("d", used_cpu=3000, used_mem=3072)])
    assert result.devices == ("d",)


def test_offline_devices_each_yes_replicas_no() -> None:
    devices = [device("on"), device("off", online=False)]
    assert set(place(deployment(), devices).devices) == {"on", "off"}
    replicas = place(deployment(replicas=2), devices)
    assert replicas.devices == ("on",)
    assert replicas.rejected == {"off": "offline"}
    assert replicas.shortfall == 1
    assert place(deployment(), devices, include_offline=False).rejected == {"off": "offline"}


def test_duplicate_device_id_is_an_error() -> None:
    with pytest.raises(PlacementError, match="twice") as info:
        place(deployment(), [device("d"), device("d")])
    assert isinstance(info.value, HubError)
    assert info.value.deployment == "dep"


def test_device_view_from_profile() -> None:
    profile = load_profile("raspberry-pi-4")
    view = DeviceView.from_profile(
        "gw-1",
        "eu",
        profile,
        labels={"site": "a"},
        allocated=Resources(cpu_millis=500, memory_mb=100),
    )
    assert view.cpu_millis == profile.cpu_cores * 1000
    assert view.memory_mb == profile.memory_mb
    assert view.free_cpu_millis == profile.cpu_cores * 1000 - 500
    assert view.free_memory_mb == profile.memory_mb - 100
    assert view.drivers == frozenset(profile.drivers)
    assert view.arch == profile.arch
    assert view.profile == "raspberry-pi-4"


# --- capacity ------------------------------------------------------------------

_step = st.tuples(
    st.integers(min_value=1, max_value=3000),  # cpu
    st.integers(min_value=1, max_value=3000),  # memory
    st.one_of(st.none(), st.integers(min_value=1, max_value=12)),  # replicas / each
)


@settings(max_examples=250)
@given(
    caps=st.lists(
        st.tuples(st.integers(500, 8000), st.integers(256, 8192), st.sampled_from("abc")),
        min_size=1,
        max_size=12,
    ),
    steps=st.lists(_step, min_size=1, max_size=12),
)
def test_never_over_commits_across_placements(
    caps: list[tuple[int, int, str]], steps: list[tuple[int, int, int | None]]
) -> None:
    fleet = [
        device(f"d{i}", cpu=cpu, mem=mem, region=region)
        for i, (cpu, mem, region) in enumerate(caps)
    ]
    for n, (cpu, mem, replicas) in enumerate(steps):
        placement = place(deployment(f"dep{n}", replicas=replicas, cpu=cpu, mem=mem), fleet)
        assert len(set(placement.devices)) == len(placement.devices)
        if replicas is not None:
            assert len(placement.devices) == min(replicas, placement.feasible)
        fleet = apply_placement(fleet, placement)
        for dev in fleet:
            assert dev.allocated_cpu_millis <= dev.cpu_millis
            assert dev.allocated_memory_mb <= dev.memory_mb


def test_kept_devices_skip_the_resource_check() -> None:
    # A full device already running the deployment keeps it; a new one does not get it.
    full = device("full", used_cpu=4000, used_mem=4096)
    result = place(deployment(replicas=1), [full, device("free")], current={"full"})
    assert result.devices == ("full",)
    assert result.kept == ("full",)
    assert result.added == ()
    assert apply_placement([full], result) == [full]


# --- determinism -----------------------------------------------------------------


def _random_fleet(seed: int, n: int = 300) -> list[DeviceView]:
    rng = random.Random(seed)
    return [
        device(
            f"gw-{i:04d}",
            region=f"r{rng.randrange(5)}",
            profile=f"p{rng.randrange(3)}",
            used_cpu=rng.randrange(0, 4000),
            used_mem=rng.randrange(0, 4096),
            reliability=rng.choice([0.9, 0.95, 1.0]),
            online=rng.random() > 0.05,
        )
        for i in range(n)
    ]


@settings(max_examples=50)
@given(seed=st.integers(0, 2**32 - 1), replicas=st.one_of(st.none(), st.integers(1, 400)))
def test_same_input_same_output_whatever_the_order(seed: int, replicas: int | None) -> None:
    fleet = _random_fleet(seed)
    dep = deployment(replicas=replicas, cpu=300, mem=256)
    first = place(dep, fleet)
    assert place(dep, fleet) == first
    shuffled = list(fleet)
    random.Random(seed + 1).shuffle(shuffled)
    again = place(dep, shuffled)
    assert again.devices == first.devices
    assert again.rejected == first.rejected
    assert again.rejections == first.rejections


def test_different_deployments_spread_differently_on_identical_devices() -> None:
    fleet = [device(f"gw-{i:03d}") for i in range(100)]
    picks = {place(deployment(f"dep-{k}", replicas=5), fleet).devices for k in range(5)}
    assert len(picks) == 5
    # The tie-breaker is a stable hash, not Python's per-process randomised one.
    assert tiebreak("dep", "gw-1") == tiebreak("dep", "gw-1")
    assert tiebreak("dep", "gw-1") != tiebreak("dep2", "gw-1")


# --- scores and spread -------------------------------------------------------------


def test_replicas_spread_across_regions() -> None:
    # Region r1 has the roomiest devices, yet every region gets its share.
    fleet = [device(f"a{i}", region="r1") for i in range(10)]
    fleet += [device(f"b{i}", region="r2", used_cpu=2000) for i in range(10)]
    fleet += [device(f"c{i}", region="r3", used_cpu=3000) for i in range(10)]
    by_region = {d.id: d.region for d in fleet}
    result = place(deployment(replicas=9), fleet)
    assert Counter(by_region[d] for d in result.devices) == {"r1": 3, "r2": 3, "r3": 3}
    result = place(deployment(replicas=7), fleet)
    counts = Counter(by_region[d] for d in result.devices)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert counts["r1"] == 3  # the extra replica goes to the best region


def test_spread_fills_other_regions_when_one_runs_out() -> None:
    fleet = [device("a0", region="r1")] + [device(f"b{i}", region="r2") for i in range(5)]
    result = place(deployment(replicas=4), fleet)
    assert "a0" in result.devices
    assert len(result.devices) == 4


def test_profiles_spread_within_a_region() -> None:
    fleet = [device(f"x{i}", profile="px") for i in range(5)]
    fleet += [device(f"y{i}", profile="py", used_cpu=400) for i in range(5)]
    result = place(deployment(replicas=4), fleet)
    profiles = Counter(d[0] for d in result.devices)
    assert profiles == {"x": 2, "y": 2}


def test_headroom_decides_between_equally_reliable_devices() -> None:
    fleet = [device("busy", used_cpu=3000), device("roomy"), device("fuller", used_mem=2000)]
    assert place(deployment(replicas=3), fleet).devices == ("roomy", "fuller", "busy")


def test_reliability_decides_between_equally_roomy_devices() -> None:
    fleet = [device("flaky", reliability=0.5), device("solid"), device("ok", reliability=0.9)]
    assert place(deployment(replicas=3), fleet).devices == ("solid", "ok", "flaky")


def test_each_order_samples_every_region_first() -> None:
    fleet = [device(f"{r}{i}", region=r) for r in ("a", "b", "c") for i in range(4)]
    result = place(deployment(), fleet)
    assert len(result.devices) == 12
    assert {d[0] for d in result.devices[:3]} == {"a", "b", "c"}


def test_kept_replicas_stay_and_new_ones_spread_around_them() -> None:
    fleet = [device(f"{r}{i}", region=r) for r in ("a", "b") for i in range(4)]
    result = place(deployment(replicas=3), fleet, current={"a1", "a2"})
    assert set(result.kept) == {"a1", "a2"}
    assert result.devices[:2] == result.kept
    assert result.added[0].startswith("b")
    # Scale down: only the best of the kept ones stay.
    down = place(deployment(replicas=1), fleet, current={"a1", "b2"})
    assert len(down.devices) == 1
    assert down.devices == down.kept


def test_shortfall() -> None:
    result = place(deployment(replicas=5), [device("a"), device("b")])
    assert result.wanted == 5
    assert result.shortfall == 3
    assert place(deployment(), [device("a")]).shortfall == 0


# --- lost replicas ---------------------------------------------------------------


def _assignments(devices: Sequence[str], generation: int = 1) -> list[Assignment]:
    return [Assignment(slot=i, device_id=d, generation=generation) for i, d in enumerate(devices)]


def test_rebalance_moves_only_replicas_lost_long_enough() -> None:
    fleet = [device(f"{r}{i}", region=r) for r in ("a", "b", "c") for i in range(3)]
    dep = deployment(replicas=3)
    first = place(dep, fleet)
    fleet = apply_placement(fleet, first)
    current = _assignments(first.devices)
    lost_long, lost_short = current[0].device_id, current[1].device_id
    result = rebalance(
        dep,
        fleet,
        current,
        {lost_long: 600.0, lost_short: 10.0},
        lost_after_s=300.0,
        generation=2,
    )
    assert len(result.moved) == 1
    old, new = result.moved[0]
    assert old == current[0]
    assert new.slot == 0
    assert new.generation == 2
    assert new.device_id not in {a.device_id for a in current}
    # The replacement stays in the lost device's region when it can (spread).
    assert new.device_id[0] == lost_long[0]
    assert result.stranded == ()
    assert [a.slot for a in result.assignments] == [0, 1, 2]
    assert current[1] in result.assignments
    assert set(result.placement.kept) == {current[1].device_id, current[2].device_id}


def test_rebalance_strands_when_nothing_fits() -> None:
    fleet = [device("a"), device("b", used_cpu=4000)]
    current = _assignments(["a"])
    result = rebalance(
        deployment(replicas=1), fleet, current, {"a": 999.0}, lost_after_s=60, generation=5
    )
    assert result.moved == ()
    assert result.stranded == (current[0],)
    assert result.assignments == (current[0],)
    assert result.placement.rejected["b"] == "cpu"


def test_rebalance_input_errors() -> None:
    with pytest.raises(PlacementError, match="only replicas"):
        rebalance(deployment(), [], [], {}, lost_after_s=1, generation=1)
    with pytest.raises(PlacementError, match="generation"):
        rebalance(
            deployment(replicas=1), [], _assignments(["a"], 3), {}, lost_after_s=1, generation=3
        )
    twice = [Assignment(0, "a", 1), Assignment(0, "b", 1)]
    with pytest.raises(PlacementError, match="slot"):
        rebalance(deployment(replicas=2), [], twice, {}, lost_after_s=1, generation=2)


def test_dedupe_keeps_the_newest_copy() -> None:
    original = Assignment(slot=0, device_id="x", generation=1)
    replacement = Assignment(slot=0, device_id="r", generation=2)
    other = Assignment(slot=1, device_id="y", generation=1)
    result = dedupe_replicas([replacement, original, other], "x")
    assert result.remove == (original,)
    assert set(result.keep) == {replacement, other}
    # Order of the input does not matter; duplicates in the input are harmless.
    assert dedupe_replicas([other, original, replacement, original], "x") == result


def test_dedupe_exactly_one_copy_per_slot_of_the_returned_device() -> None:
    copies = [
        Assignment(0, "x", 1),
        Assignment(0, "r1", 2),
        Assignment(0, "r2", 3),  # the replacement was itself lost and replaced
        Assignment(1, "r1", 1),  # a slot x never held is left alone
    ]
    result = dedupe_replicas(copies, "x")
    slot0 = [a for a in result.keep if a.slot == 0]
    assert slot0 == [Assignment(0, "r2", 3)]
    assert Assignment(1, "r1", 1) in result.keep
    assert sorted(result.keep + result.remove) == sorted(copies)


def test_dedupe_equal_generation_prefers_the_copy_that_stayed() -> None:
    result = dedupe_replicas([Assignment(0, "a", 4), Assignment(0, "z", 4)], "a")
    assert result.keep == (Assignment(0, "z", 4),)


def test_dedupe_nothing_to_do() -> None:
    copies = [Assignment(0, "a", 1)]
    assert dedupe_replicas(copies, "a").keep == tuple(copies)
    assert dedupe_replicas(copies, "b").remove == ()


def test_rebalance_then_return_leaves_one_copy_per_slot() -> None:
    fleet = [device(f"{r}{i}", region=r) for r in ("a", "b") for i in range(3)]
    dep = deployment(replicas=2)
    first = place(dep, fleet)
    fleet = apply_placement(fleet, first)
    current = _assignments(first.devices)
    lost = current[0].device_id
    moved = rebalance(dep, fleet, current, {lost: 1e9}, lost_after_s=300, generation=2)
    # The lost device comes back still running its old copy.
    result = dedupe_replicas([*moved.assignments, current[0]], lost)
    assert Counter(a.slot for a in result.keep) == {0: 1, 1: 1}
    assert result.remove == (current[0],)
