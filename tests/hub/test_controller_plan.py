"""The fleet controller's pure decisions (cloud_hub._controller_plan)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_hub._controller_plan import (
    DeploymentState,
    add_targets,
    assign_slots,
    device_views,
    new_rollout,
    parse_report,
    retarget,
    rollout_summary,
    stable_version,
    wave_sizes,
    workload_spec,
)
from cloud_hub._exceptions import RolloutDecodeError
from cloud_hub.manifests import Deployment
from cloud_hub.placement import Assignment, dedupe_replicas
from cloud_hub.rollout import Rollout
from cloud_hub.store import DeviceRecord
from firmware_profiles import load_profile


def manifest(
    *,
    name: str = "web",
    waves: list[dict[str, Any]] | None = None,
    replicas: int | None = None,
    budget: float = 0,
    on_failure: str = "pause",
    threshold: float = 1.0,
) -> Deployment:
    spec: dict[str, Any] = {
        "workload": {"name": name, "driver": "process", "command": ["sleep", "1"]},
        "rollout": {
            "waves": waves or [{"percent": 100}],
            "failure_budget": budget,
            "on_failure": on_failure,
            "success_threshold": threshold,
            "wave_timeout_s": 60,
            "offline_deadline_s": 30,
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return Deployment.model_validate(
        {
            "kind": "Deployment",
            "apiVersion": "novacron.io/v1",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def ids(n: int) -> list[str]:
    return [f"gw-{i:02d}" for i in range(n)]


def test_wave_sizes_turn_cumulative_waves_into_sizes() -> None:
    dep = manifest(waves=[{"percent": 10}, {"count": 5}, {"percent": 50}, {"percent": 100}])
    assert wave_sizes(dep, 20) == [2, 3, 5, 10]
    assert wave_sizes(dep, 3) == [1, 2]  # empty waves are dropped
    assert wave_sizes(dep, 0) == []


@given(
    n=st.integers(0, 300),
    percents=st.lists(st.integers(1, 99), max_size=4, unique=True).map(sorted),
)
def test_wave_sizes_cover_every_target(n: int, percents: list[int]) -> None:
    dep = manifest(waves=[*({"percent": p} for p in percents), {"percent": 100}])
    sizes = wave_sizes(dep, n)
    assert sum(sizes) == n
    assert all(s > 0 for s in sizes)


def test_new_rollout_takes_the_manifest_strategy() -> None:
    dep = manifest(waves=[{"count": 1}, {"percent": 100}], budget=0.5, on_failure="rollback")
    rollout = new_rollout(dep, "3", ids(4), "2")
    assert rollout.waves == (1, 3)
    assert rollout.failure_budget == 2
    assert rollout.on_failure == "rollback"
    assert rollout.wave_timeout_ms == 60_000
    assert rollout.offline_deadline_ms == 30_000
    assert rollout.previous_version == "2"
    assert new_rollout(dep, "3", ids(4), "3").previous_version is None


def test_stable_version_is_the_last_completed_one() -> None:
    dep = manifest()
    assert stable_version(None) is None
    first = new_rollout(dep, "1", ids(1), None)
    first.start(0)
    assert stable_version(first) is None  # in progress, nothing before it
    first.report("gw-00", "1", True, "running", 1)
    assert stable_version(first) == "1"
    second = new_rollout(dep, "2", ids(1), "1")
    second.start(2)
    assert stable_version(second) == "1"  # superseding an unfinished one returns to 1
    second.undo(3)
    assert stable_version(second) == "1"


def test_assign_slots_keeps_slots_and_fills_the_lowest_free() -> None:
    slots = [Assignment(0, "a", 1), Assignment(1, "b", 1), Assignment(2, "c", 2)]
    out = assign_slots(slots, ["c", "a", "d"], 3)
    assert out == [Assignment(0, "a", 1), Assignment(1, "d", 3), Assignment(2, "c", 2)]
    # Shrinking: a kept device beyond the new count moves to a free slot, newly.
    assert assign_slots(slots, ["c"], 4) == [Assignment(0, "c", 4)]


def test_add_targets_joins_the_last_wave() -> None:
    dep = manifest(waves=[{"count": 1}, {"percent": 100}])
    rollout = new_rollout(dep, "2", ids(3), "1")
    rollout.start(0)
    rollout.take_actions()
    extended, version = add_targets(rollout, ["new"])
    assert version is None  # the last wave has not started: it waits for it
    assert extended.waves == (1, 3)
    assert extended.outcome("new") == "pending"
    extended.report("gw-00", "2", True, "running", 1)
    assert {a.device for a in extended.take_actions()} == {"gw-01", "gw-02", "new"}
    later, version = add_targets(extended, ["newer"])
    assert version == "2"
    assert later.desired("newer") == "2"
    with pytest.raises(ValueError, match="new and distinct"):
        add_targets(later, ["gw-00"])


def test_add_targets_after_rollback_sends_the_previous_version() -> None:
    dep = manifest()
    rollout = new_rollout(dep, "2", ids(2), "1")
    rollout.start(0)
    rollout.undo(1)
    _, version = add_targets(rollout, ["new"])
    assert version == "1"


def test_add_targets_needs_a_target() -> None:
    rollout = new_rollout(manifest(), "1", [], None)
    with pytest.raises(ValueError, match="without targets"):
        add_targets(rollout, ["a"])


def test_retarget_moves_a_wave_slot_to_the_replacement() -> None:
    dep = manifest(waves=[{"count": 1}, {"percent": 100}])
    rollout = new_rollout(dep, "2", ids(3), "1")
    rollout.start(0)
    rollout.device_presence("gw-00", False, 0)
    moved = retarget(rollout, "gw-00", "gw-09")
    assert moved.targets == ("gw-09", "gw-01", "gw-02")
    assert moved.desired("gw-09") == "2"
    assert moved.desired("gw-00") is None
    assert moved.outcome("gw-09") == "pending"
    moved.report("gw-09", "2", True, "running", 5)
    assert moved.status().current_wave == 1  # the replacement closed the first wave
    with pytest.raises(ValueError, match="cannot retarget"):
        retarget(moved, "gw-00", "gw-05")


def test_state_round_trips_and_rollout_readers_ignore_the_extra_key() -> None:
    dep = manifest(replicas=2)
    rollout = new_rollout(dep, "1", ["a", "b"], None)
    rollout.start(0)
    state = DeploymentState(
        name="web",
        workload="web",
        mode="replicas",
        record_version=1,
        rollout=rollout,
        slots=[Assignment(0, "a", 1), Assignment(1, "b", 1)],
        displaced=[Assignment(1, "z", 0)],
        generation=1,
    )
    state.absorb()
    assert state.outbox == [("a", "1"), ("b", "1")]
    data = json.loads(json.dumps(state.to_state()))
    back = DeploymentState.from_state(data)
    assert back.to_state() == state.to_state()
    assert back.is_target("a")
    assert Rollout.from_dict(data).to_dict() == rollout.to_dict()
    bad = {**data, "controller": {**data["controller"], "mode": "some"}}
    with pytest.raises(RolloutDecodeError):
        DeploymentState.from_state(bad)
    with pytest.raises(RolloutDecodeError):
        DeploymentState.from_state({k: v for k, v in data.items() if k != "controller"})


def test_want_writes_only_changes_unless_forced() -> None:
    state = DeploymentState("web", "web", "each", 1, new_rollout(manifest(), "1", ["a"], None))
    state.want("a", "1")
    state.want("a", "1")
    state.want("b", None)
    assert state.outbox == [("a", "1")]
    state.want("a", None)
    state.want("a", None, force=True)
    assert state.outbox == [("a", "1"), ("a", None), ("a", None)]


def test_absorb_after_rollback_returns_every_target_to_the_previous_version() -> None:
    dep = manifest(waves=[{"count": 1}, {"percent": 100}])
    rollout = new_rollout(dep, "3", ["a", "b"], "1")
    state = DeploymentState("web", "web", "each", 3, rollout, written={"a": "2", "b": "2"})
    rollout.start(0)
    state.absorb()
    assert state.written == {"a": "3", "b": "2"}
    rollout.undo(1)
    state.absorb()
    assert state.written == {"a": "1", "b": "1"}


def test_dedupe_rule_removes_the_returned_copy() -> None:
    # The controller relies on rebalance giving a newer generation.
    current = [Assignment(0, "a", 1), Assignment(1, "c", 2)]
    returned = Assignment(1, "b", 1)
    result = dedupe_replicas([*current, returned], "b")
    assert result.remove == (returned,)


def test_parse_report() -> None:
    status = parse_report("web", {"name": "web", "version": "2", "phase": "running"})
    assert status.version == "2"
    with pytest.raises(ValueError, match="key names"):
        parse_report("db", {"name": "web", "version": "2", "phase": "running"})
    with pytest.raises(ValueError, match="invalid workload status"):
        parse_report("web", {"name": "web", "phase": "dancing"})
    with pytest.raises(ValueError, match="invalid workload status"):
        parse_report("web", "running")


def test_workload_spec_carries_the_record_version() -> None:
    spec = workload_spec(manifest(), 7)
    assert spec["version"] == "7"
    assert spec["name"] == "web"


def test_device_views_use_profile_capacity_minus_allocations() -> None:
    profile = load_profile("raspberry-pi-4")
    records = [
        DeviceRecord(
            id="a", region="eu", profile="raspberry-pi-4", public_key="k1", arch="aarch64"
        ),
        DeviceRecord(id="b", region="eu", profile="nope", public_key="k2", arch="aarch64"),
    ]
    views = device_views(records, {"raspberry-pi-4": profile}, {"a": (500, 100)}, {"a": False})
    assert len(views) == 1
    view = views[0]
    assert view.free_cpu_millis == profile.cpu_cores * 1000 - 500
    assert view.free_memory_mb == profile.memory_mb - 100
    assert view.online is False


def test_rollout_summary() -> None:
    rollout = new_rollout(manifest(), "1", ["a"], None)
    rollout.start(0)
    summary = rollout_summary(rollout)
    assert summary["phase"] == "progressing"
    assert summary["targets"] == 1
    json.dumps(summary)
