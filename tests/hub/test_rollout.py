"""Rollout engine: waves, thresholds, offline devices, timeouts, failures, commands."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub._exceptions import (
    HubError,
    RolloutDecodeError,
    RolloutError,
    RolloutStateError,
)
from cloud_hub.rollout import (
    TERMINAL_PHASES,
    OnFailure,
    Rollout,
    SetDesired,
    plan_waves,
)
from sync._exceptions import NovaCronError
from sync.models import WorkloadPhase

NEW = "v2"
OLD = "v1"
MIN = 60_000


def devices(n: int) -> list[str]:
    return [f"gw-{i:02d}" for i in range(n)]


def make(
    n: int = 10,
    waves: list[int] | None = None,
    *,
    name: str = "web",
    threshold: float = 1.0,
    timeout: int = 10 * MIN,
    deadline: int = 5 * MIN,
    budget: int = 0,
    on_failure: OnFailure = "pause",
    previous: str | None = OLD,
) -> Rollout:
    return Rollout(
        name,
        NEW,
        devices(n),
        waves if waves is not None else plan_waves(n, [1, "40%"]),
        success_threshold=threshold,
        wave_timeout_ms=timeout,
        offline_deadline_ms=deadline,
        failure_budget=budget,
        on_failure=on_failure,
        previous_version=previous,
    )


def ok(r: Rollout, device: str, now: int) -> None:
    r.report(device, NEW, True, "running", now)


def wave_devices(r: Rollout, index: int) -> list[str]:
    start = sum(r.waves[:index])
    return list(r.targets[start : start + r.waves[index]])


def desired_devices(actions: list[SetDesired], version: str) -> list[str]:
    return [a.device for a in actions if a.version == version]


# -- plan_waves ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "specs", "expected"),
    [
        (10, [1, "40%"], [1, 4, 5]),
        (10, ["10%", "20%", "70%"], [1, 2, 7]),
        (5, ["10%"], [1, 4]),  # rounded up, never an empty wave
        (10, [3, 3, 3, 3], [3, 3, 3, 1]),
        (10, [20], [10]),
        (10, [], [10]),
        (0, [1, "50%"], []),
        (3, ["12.5%", "100%"], [1, 2]),
        (4, ["2"], [2, 2]),
        (7, [2, 2, 2, 1, 5], [2, 2, 2, 1]),
    ],
)
def test_plan_waves(n: int, specs: list[int | str], expected: list[int]) -> None:
    assert plan_waves(n, specs) == expected
    assert sum(plan_waves(n, specs)) == n


@pytest.mark.parametrize("spec", [0, -1, "0%", "101%", "abc", "%", "-5%", "1/0%", ""])
def test_plan_waves_rejects_bad_specs(spec: int | str) -> None:
    with pytest.raises(ValueError, match="wave"):
        plan_waves(10, [spec])


def test_plan_waves_rejects_bool_and_negative_targets() -> None:
    with pytest.raises(TypeError):
        plan_waves(3, [True])
    with pytest.raises(ValueError, match="negative"):
        plan_waves(-1, [1])


@given(
    n=st.integers(0, 500),
    specs=st.lists(st.integers(1, 50) | st.integers(1, 100).map("{}%".format)),
)
@settings(max_examples=200, deadline=None)
def test_plan_waves_covers_every_target(n: int, specs: list[int | str]) -> None:
    sizes = plan_waves(n, specs)
    assert sum(sizes) == n
    assert all(s >= 1 for s in sizes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"targets": ["a", "a"], "waves": [2]},
        {"targets": ["a", "b"], "waves": [1]},
        {"targets": ["a"], "waves": [0, 1]},
        {"success_threshold": 0.0},
        {"success_threshold": 1.5},
        {"wave_timeout_ms": 0},
        {"offline_deadline_ms": -1},
        {"failure_budget": -1},
        {"on_failure": "explode"},
        {"previous_version": NEW},
        {"version": ""},
    ],
)
def test_constructor_validates(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "deployment": "web",
        "version": NEW,
        "targets": ["a", "b"],
        "waves": [1, 1],
    } | kwargs
    with pytest.raises(ValueError):
        Rollout(**args)


# -- waves and thresholds ------------------------------------------------------------------


def test_start_emits_first_wave_only() -> None:
    r = make()
    assert r.phase == "pending"
    assert r.status().current_wave is None
    r.start(0)
    assert r.take_actions() == [SetDesired("web", "gw-00", NEW)]
    assert r.take_actions() == []
    status = r.status()
    assert status.phase == "progressing"
    assert status.current_wave == 0
    assert [w.size for w in status.waves] == [1, 4, 5]
    assert status.waves[0].pending == 1
    assert status.waves[1].started_ms is None
    with pytest.raises(RolloutStateError) as info:
        r.start(1)
    assert info.value.command == "start"
    assert info.value.phase == "progressing"


def test_wave_advances_when_all_healthy() -> None:
    r = make()
    r.start(0)
    r.take_actions()
    ok(r, "gw-00", 1_000)
    assert r.status().current_wave == 1
    assert desired_devices(r.take_actions(), NEW) == wave_devices(r, 1)
    for i, device in enumerate(wave_devices(r, 1)[:-1]):
        ok(r, device, 2_000 + i)
    assert r.status().current_wave == 1  # one missing, threshold 1.0
    ok(r, "gw-04", 3_000)
    status = r.status()
    assert status.current_wave == 2
    assert status.waves[1].closed_by == "threshold"
    assert status.waves[1].closed_ms == 3_000
    assert status.waves[2].started_ms == 3_000
    for device in wave_devices(r, 2):
        ok(r, device, 4_000)
    status = r.status()
    assert status.phase == "succeeded"
    assert status.succeeded == 10
    assert status.reason == "every wave completed"
    assert r.desired("gw-09") == NEW


def test_fractional_threshold_counts_exactly() -> None:
    # 0.9 x 10 must need 9, not 10 through float rounding.
    r = make(10, [10], threshold=0.9)
    r.start(0)
    assert r.status().waves[0].needed == 9
    for device in devices(8):
        ok(r, device, 1)
    assert r.phase == "progressing"
    ok(r, "gw-08", 2)
    assert r.status().phase == "succeeded"
    assert r.status().waves[0].pending == 1


@pytest.mark.parametrize(
    ("version", "healthy", "phase", "success"),
    [
        (NEW, True, "running", True),
        (NEW, None, "running", True),  # no health check configured
        (NEW, False, "running", False),
        (NEW, True, "starting", False),
        (NEW, None, "backoff", False),
        (OLD, True, "running", False),
    ],
)
def test_what_counts_as_success(
    version: str, healthy: bool | None, phase: WorkloadPhase, success: bool
) -> None:
    r = make(2, [1, 1])
    r.start(0)
    r.report("gw-00", version, healthy, phase, 5)
    assert (r.status().current_wave == 1) is success
    assert r.outcome("gw-00") == ("succeeded" if success else "pending")


def test_success_that_turns_unhealthy_is_pending_again() -> None:
    r = make(3, [3], threshold=1.0)
    r.start(0)
    ok(r, "gw-00", 1)
    assert r.status().waves[0].succeeded == 1
    r.report("gw-00", NEW, False, "running", 2)
    assert r.outcome("gw-00") == "pending"
    assert r.status().waves[0].succeeded == 0


def test_reports_from_strangers_and_future_waves() -> None:
    r = make(3, [1, 2])
    r.report("gw-02", NEW, True, "running", 0)  # already updated by other means
    r.report("intruder", NEW, True, "running", 0)
    r.start(1)
    ok(r, "gw-00", 2)
    assert r.status().current_wave == 1
    ok(r, "gw-01", 3)
    assert r.phase == "succeeded"


# -- offline devices -----------------------------------------------------------------------


def test_offline_device_is_pending_then_skipped_then_catches_up() -> None:
    r = make(4, [2, 2], deadline=5 * MIN, timeout=60 * MIN)
    r.start(0)
    r.device_presence("gw-01", False, 1_000)
    ok(r, "gw-00", 2_000)
    wave = r.status().waves[0]
    assert (wave.succeeded, wave.pending, wave.skipped, wave.offline) == (1, 1, 0, 1)
    r.tick(1_000 + 5 * MIN - 1)
    assert r.status().current_wave == 0
    r.tick(1_000 + 5 * MIN)
    status = r.status()
    assert status.current_wave == 1
    assert status.waves[0].skipped == 1
    assert status.waves[0].failed == 0
    assert status.waves[0].needed == 1
    assert status.waves[0].closed_by == "threshold"
    assert r.outcome("gw-01") == "skipped"
    assert r.desired("gw-01") == NEW  # its desired version is kept for its return
    # It returns, catches up, and its success is counted in its own wave.
    r.device_presence("gw-01", True, 10 * MIN)
    r.report("gw-01", NEW, None, "starting", 10 * MIN + 1)
    assert r.outcome("gw-01") == "skipped"
    ok(r, "gw-01", 11 * MIN)
    assert r.status().waves[0].succeeded == 2
    assert r.status().waves[0].skipped == 0
    for device in wave_devices(r, 1):
        ok(r, device, 12 * MIN)
    status = r.status()
    assert status.phase == "succeeded"
    assert status.succeeded == 4
    assert status.failures == 0


def test_offline_deadline_counts_from_wave_start() -> None:
    r = make(2, [1, 1], deadline=5 * MIN)
    r.device_presence("gw-01", False, 0)  # offline long before its wave
    r.start(0)
    ok(r, "gw-00", 20 * MIN)
    assert r.status().current_wave == 1
    r.tick(20 * MIN + 5 * MIN - 1)
    assert r.outcome("gw-01") == "pending"
    r.tick(25 * MIN)
    assert r.outcome("gw-01") == "skipped"
    assert r.phase == "succeeded"  # every wave closed, nothing failed


def test_all_offline_wave_never_blocks() -> None:
    r = make(3, [3], deadline=MIN, timeout=60 * MIN)
    for device in devices(3):
        r.device_presence(device, False, 0)
    r.start(0)
    r.tick(MIN)
    status = r.status()
    assert status.phase == "succeeded"
    assert status.waves[0].skipped == 3
    assert status.waves[0].needed == 0


def test_device_back_online_before_deadline_is_not_skipped() -> None:
    r = make(2, [2], deadline=5 * MIN)
    r.start(0)
    r.device_presence("gw-01", False, MIN)
    r.device_presence("gw-01", True, 2 * MIN)
    r.tick(10 * MIN - 1)  # just before the wave timeout
    assert r.outcome("gw-01") == "pending"


# -- timeouts, failures, budget ------------------------------------------------------------


def test_timeout_fails_online_devices_and_pauses() -> None:
    r = make(6, [2, 4], timeout=10 * MIN, budget=0)
    r.start(0)
    ok(r, "gw-00", MIN)
    r.tick(10 * MIN - 1)
    assert r.phase == "progressing"
    r.tick(10 * MIN)
    status = r.status()
    assert status.phase == "paused"
    assert status.waves[0].failed == 1
    assert status.waves[0].closed_by == "timeout"
    assert status.current_wave == 0
    assert "1 failures exceed the budget of 0" in status.reason
    r.take_actions()
    # Paused: nothing advances, but reports are recorded.
    r.tick(100 * MIN)
    ok(r, "gw-01", 100 * MIN)
    assert r.status().waves[0].succeeded == 2
    assert r.take_actions() == []
    # Resume moves past the closed wave.
    r.resume(101 * MIN)
    status = r.status()
    assert status.phase == "progressing"
    assert status.current_wave == 1
    assert status.waves[1].started_ms == 101 * MIN
    assert desired_devices(r.take_actions(), NEW) == wave_devices(r, 1)


def test_timeout_within_budget_advances() -> None:
    r = make(6, [3, 3], timeout=10 * MIN, budget=1)
    r.start(0)
    ok(r, "gw-00", 1)
    ok(r, "gw-01", 1)
    r.tick(10 * MIN)
    status = r.status()
    assert status.phase == "progressing"
    assert status.current_wave == 1
    assert status.waves[0].failed == 1
    assert status.counted_failures == 1


def test_timeout_skips_offline_devices_instead_of_failing_them() -> None:
    r = make(3, [3], timeout=10 * MIN, deadline=60 * MIN, threshold=1.0)
    r.start(0)
    r.device_presence("gw-02", False, MIN)
    ok(r, "gw-00", MIN)
    r.tick(10 * MIN)
    wave = r.status().waves[0]
    assert (wave.succeeded, wave.failed, wave.skipped) == (1, 1, 1)
    assert r.phase == "paused"


def test_explicit_failure_report_trips_budget_mid_wave() -> None:
    r = make(4, [4], budget=1)
    r.start(0)
    r.report("gw-00", NEW, None, "failed", 1)
    assert r.phase == "progressing"
    r.report("gw-01", NEW, None, "rejected", 2)
    assert r.status().phase == "paused"
    # Resuming accepts these failures; the open wave gets a fresh timer.
    r.resume(3)
    status = r.status()
    assert status.counted_failures == 0
    assert status.failures == 2
    assert status.waves[0].started_ms == 3
    r.report("gw-02", NEW, None, "failed", 4)
    assert r.phase == "progressing"  # one new failure, within the budget of 1
    r.report("gw-03", NEW, None, "failed", 5)
    assert r.status().phase == "paused"


def test_failure_of_old_version_is_not_a_rollout_failure() -> None:
    r = make(2, [2])
    r.start(0)
    r.report("gw-00", OLD, None, "failed", 1)
    assert r.outcome("gw-00") == "pending"


def test_automatic_rollback_emits_previous_for_updated_devices_only() -> None:
    r = make(10, [2, 3, 5], budget=0, on_failure="rollback")
    r.start(0)
    ok(r, "gw-00", 1)
    ok(r, "gw-01", 2)
    r.take_actions()
    r.report("gw-02", NEW, None, "failed", 3)
    status = r.status()
    assert status.phase == "rolled_back"
    assert "rolled back automatically" in status.reason
    actions = r.take_actions()
    assert all(a.version == OLD for a in actions)
    # Waves 0 and 1 got the new version; wave 2 never did and is left alone.
    assert [a.device for a in actions] == devices(5)
    assert r.desired("gw-00") == OLD
    assert r.desired("gw-09") is None
    # Ended: time and reports change counts but never emit anything.
    r.tick(10**9)
    ok(r, "gw-03", 10**9)
    assert r.take_actions() == []
    assert r.phase == "rolled_back"


def test_automatic_rollback_without_previous_version_fails() -> None:
    r = make(2, [2], on_failure="rollback", previous=None)
    r.start(0)
    r.report("gw-00", NEW, None, "failed", 1)
    status = r.status()
    assert status.phase == "failed"
    assert "no previous version" in status.reason
    assert r.take_actions() == [SetDesired("web", d, NEW) for d in devices(2)]
    with pytest.raises(RolloutStateError, match="no previous version"):
        r.undo()


# -- operator commands ---------------------------------------------------------------------


def test_pause_holds_the_wave_and_resume_restarts_its_timer() -> None:
    r = make(4, [2, 2], timeout=10 * MIN)
    r.start(0)
    r.pause(MIN)
    r.pause()  # idempotent
    assert r.status().reason == "paused by operator"
    ok(r, "gw-00", 2 * MIN)
    ok(r, "gw-01", 2 * MIN)
    r.tick(60 * MIN)
    status = r.status()
    assert status.phase == "paused"
    assert status.current_wave == 0  # threshold met but paused: no advance
    assert status.waves[0].failed == 0  # no timeout while paused
    r.resume(70 * MIN)
    r.resume()  # idempotent
    assert r.status().current_wave == 1  # threshold already met
    assert r.status().waves[1].started_ms == 70 * MIN
    r.pause(71 * MIN)
    r.resume(90 * MIN)
    r.tick(90 * MIN + 10 * MIN - 1)
    assert r.status().waves[1].failed == 0
    r.tick(100 * MIN)
    assert r.status().waves[1].failed == 2


def test_undo_rolls_back_every_updated_device() -> None:
    r = make(10, [1, 4, 5])
    r.start(0)
    ok(r, "gw-00", 1)
    r.take_actions()
    r.undo(2)
    assert r.phase == "rolled_back"
    assert r.status().reason == "undone by operator"
    assert r.take_actions() == [SetDesired("web", d, OLD) for d in devices(5)]
    with pytest.raises(RolloutStateError, match="already rolled back"):
        r.undo()
    with pytest.raises(RolloutStateError):
        r.resume()
    with pytest.raises(RolloutStateError):
        r.pause()


def test_undo_after_success_and_before_start() -> None:
    r = make(2, [2])
    r.start(0)
    ok(r, "gw-00", 1)
    ok(r, "gw-01", 1)
    assert r.phase == "succeeded"
    r.take_actions()
    r.undo()
    assert desired_devices(r.take_actions(), OLD) == devices(2)

    fresh = make(2, [2])
    fresh.undo()
    assert fresh.phase == "rolled_back"
    assert fresh.take_actions() == []


def test_commands_refused_in_wrong_phase() -> None:
    r = make(2, [2])
    with pytest.raises(RolloutStateError) as info:
        r.pause()
    assert info.value.phase == "pending"
    assert info.value.deployment == "web"
    with pytest.raises(RolloutStateError):
        r.resume()
    r.start(0)
    ok(r, "gw-00", 1)
    ok(r, "gw-01", 1)
    with pytest.raises(RolloutStateError):
        r.pause()
    err = RolloutStateError("x", command="pause", phase="succeeded")
    assert isinstance(err, RolloutError)
    assert isinstance(err, HubError)
    assert isinstance(err, NovaCronError)


def test_time_never_runs_backwards() -> None:
    r = make(2, [1, 1], timeout=10 * MIN)
    r.start(0)
    r.tick(5 * MIN)
    ok(r, "gw-00", 1)  # a late-stamped report is evaluated at the newest time
    assert r.status().waves[1].started_ms == 5 * MIN


def test_empty_rollout_succeeds_at_once() -> None:
    r = Rollout("web", NEW, [], [])
    r.start(0)
    assert r.phase == "succeeded"
    assert r.status().current_wave is None


# -- independence --------------------------------------------------------------------------


def test_stuck_rollout_never_blocks_another() -> None:
    stuck = make(4, [2, 2], name="stuck", timeout=60 * MIN, deadline=60 * MIN)
    other = make(4, [2, 2], name="other", timeout=60 * MIN)
    stuck.start(0)
    other.start(0)
    # Both deployments target the same devices; the stuck one's workload never starts.
    for now, device in enumerate(devices(4)):
        stuck.report(device, NEW, None, "backoff", now)
        other.report(device, NEW, None, "backoff", now)
        ok(other, device, 10 + now)
        other.tick(10 + now)
        stuck.tick(10 + now)
    assert other.phase == "succeeded"
    assert stuck.phase == "progressing"
    assert stuck.status().current_wave == 0
    assert {a.deployment for a in other.take_actions()} == {"other"}
    assert {a.deployment for a in stuck.take_actions()} == {"stuck"}


# -- persistence ---------------------------------------------------------------------------


def test_round_trip_mid_rollout_continues_identically() -> None:
    r = make(10, [1, 4, 5], threshold=0.75, budget=2, on_failure="rollback")
    r.start(0)
    ok(r, "gw-00", 1)
    r.device_presence("gw-03", False, 2)
    r.report("gw-04", NEW, None, "failed", 3)
    r.pause(4)
    data = r.to_dict()
    restored = Rollout.from_dict(json.loads(json.dumps(data)))
    assert restored.to_dict() == data
    assert restored.status() == r.status()
    assert restored.actions == r.actions
    for rollout in (r, restored):
        rollout.resume(5)
        ok(rollout, "gw-01", 6)
        ok(rollout, "gw-02", 7)
        rollout.tick(10**7)
    assert restored.to_dict() == r.to_dict()
    assert restored.take_actions() == r.take_actions()


def _corrupt(data: dict[str, Any], key: str, value: object) -> dict[str, Any]:
    return {**data, key: value}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("v", 99),
        ("phase", "exploded"),
        ("targets", "gw-00"),
        ("waves", [1, 1]),
        ("current", 7),
        ("started", [None]),
        ("closed_by", ["sideways", None, None]),
        ("outcome", ["pending"]),
        ("offline_since", {"nobody": 1}),
        ("desired", {"gw-00": 3}),
        ("accepted", ["nobody"]),
        ("actions", [["gw-00", "v9"]]),
        ("actions", [["gw-00", None]]),
        ("actions", ["gw-00"]),
        ("current", None),
        ("previous_version", ""),
        ("success_threshold", "high"),
        ("wave_timeout_ms", True),
        ("now", None),
        ("deployment", ""),
    ],
)
def test_from_dict_rejects_malformed(key: str, value: object) -> None:
    r = make(10, [1, 4, 5])
    r.start(0)
    with pytest.raises(RolloutDecodeError):
        Rollout.from_dict(_corrupt(r.to_dict(), key, value))


def test_from_dict_rejects_missing_keys_and_non_mappings() -> None:
    data = make().to_dict()
    del data["phase"]
    with pytest.raises(RolloutDecodeError, match="phase"):
        Rollout.from_dict(data)
    with pytest.raises(RolloutDecodeError):
        Rollout.from_dict([])  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------------


@dataclass
class Oracle:
    """What the test itself knows, independently of the engine's bookkeeping."""

    latest_ok: dict[str, bool] = field(default_factory=dict)
    offline_since: dict[str, int] = field(default_factory=dict)
    max_offline: dict[str, int] = field(default_factory=dict)
    """Longest offline spell of each device within its wave, at input times."""


PHASES: list[WorkloadPhase] = ["running", "running", "starting", "failed", "backoff"]

event = st.tuples(
    st.integers(0, 4 * MIN),  # time step
    st.sampled_from(["report", "report", "presence", "tick"]),
    st.integers(0, 11),  # device index (modulo the target count)
    st.sampled_from([NEW, NEW, OLD]),
    st.sampled_from([True, True, None, False]),
    st.sampled_from(PHASES),
    st.booleans(),  # online
)


Event = tuple[int, str, int, str, bool | None, WorkloadPhase, bool]


@dataclass(frozen=True)
class Scenario:
    n: int
    specs: list[int | str]
    threshold: float
    timeout: int
    deadline: int
    budget: int
    on_failure: OnFailure
    events: list[Event]


scenarios = st.builds(
    Scenario,
    n=st.integers(1, 12),
    specs=st.lists(st.integers(1, 4) | st.sampled_from(["25%", "50%"]), max_size=4),
    threshold=st.sampled_from([0.5, 0.75, 0.9, 1.0]),
    timeout=st.integers(1, 10).map(lambda m: m * MIN),
    deadline=st.integers(0, 10).map(lambda m: m * MIN),
    budget=st.integers(0, 3),
    on_failure=st.sampled_from(["pause", "rollback"]),
    events=st.lists(event, max_size=60),
)


@given(scenario=scenarios)
@settings(max_examples=200, deadline=None)
def test_rollout_properties(scenario: Scenario) -> None:
    """Random reports, presence changes and ticks against an independent oracle.

    A wave closes (and the next starts) only once it met its threshold, counting
    as skippable every device seen offline past the deadline (a superset of the
    engine's skipped devices, so the check is sound), or its timeout passed; only
    the new or previous version is ever emitted; and after every deadline the
    rollout is at rest.
    """
    n, threshold, timeout, deadline = (
        scenario.n,
        scenario.threshold,
        scenario.timeout,
        scenario.deadline,
    )
    targets = devices(n)
    waves = plan_waves(n, scenario.specs)
    r = Rollout(
        "web",
        NEW,
        targets,
        waves,
        success_threshold=threshold,
        wave_timeout_ms=timeout,
        offline_deadline_ms=deadline,
        failure_budget=scenario.budget,
        on_failure=scenario.on_failure,
        previous_version=OLD,
    )
    wave_of = {d: i for i, members in enumerate(_split(targets, waves)) for d in members}
    oracle = Oracle()
    now = 0
    wave_start = {0: now}

    def observe(at: int) -> None:
        # Offline spells as the engine sees them: evaluated at input times only,
        # counted from the later of going offline and the device's wave start.
        for device, since in oracle.offline_since.items():
            started = wave_start.get(wave_of[device])
            if started is not None:
                spell = at - max(since, started)
                oracle.max_offline[device] = max(oracle.max_offline.get(device, -1), spell)

    def check(at: int, before: int | None) -> None:
        status = r.status()
        assert all(a.version in (NEW, OLD) for a in r.actions)
        after = status.current_wave
        assert before is not None
        assert after is not None
        assert after >= before
        for k in range(before, after):
            # Wave k closed and k + 1 started at this input: k must have met its
            # threshold or its deadline at this time.
            start = wave_start[k]
            members = [d for d in targets if wave_of[d] == k]
            succeeded = sum(oracle.latest_ok.get(d, False) for d in members)
            may_skip = sum(
                1
                for d in members
                if not oracle.latest_ok.get(d, False) and oracle.max_offline.get(d, -1) >= deadline
            )
            needed = math.ceil(round(threshold * (len(members) - may_skip), 9))
            assert status.waves[k].closed_ms == at
            assert at - start >= timeout or succeeded >= needed, (k, status)
            wave_start[k + 1] = at
            assert status.waves[k + 1].started_ms == at
            observe(at)

    r.start(now)
    check(now, 0)
    for step, kind, index, version, healthy, phase, online in scenario.events:
        now += step
        device = targets[index % n]
        before = r.status().current_wave
        if kind == "report":
            oracle.latest_ok[device] = (
                version == NEW and phase == "running" and healthy is not False
            )
            observe(now)
            r.report(device, version, healthy, phase, now)
        elif kind == "presence":
            if online:
                oracle.offline_since.pop(device, None)
            else:
                oracle.offline_since.setdefault(device, now)
            observe(now)
            r.device_presence(device, online, now)
        else:
            observe(now)
            r.tick(now)
        check(now, before)

    # Once every deadline has passed, the rollout has come to rest.
    for _ in range(len(waves) + 1):
        now += timeout + deadline + 1
        before = r.status().current_wave
        observe(now)
        r.tick(now)
        check(now, before)
    status = r.status()
    assert status.phase in TERMINAL_PHASES | {"paused"}
    assert all(a.version in (NEW, OLD) for a in r.take_actions())
    assert Rollout.from_dict(r.to_dict()).to_dict() == r.to_dict()


@given(
    n=st.integers(1, 12),
    specs=st.lists(st.integers(1, 4) | st.sampled_from(["25%", "50%"]), max_size=4),
    order=st.randoms(use_true_random=False),
)
@settings(max_examples=200, deadline=None)
def test_all_devices_healthy_always_succeeds(n: int, specs: list[int | str], order: Any) -> None:
    r = make(n, plan_waves(n, specs))
    r.start(0)
    emitted: list[str] = []
    now = 0
    while r.phase == "progressing":
        batch = desired_devices(r.take_actions(), NEW)
        assert batch, "progressing with no device to wait for"
        emitted += batch
        order.shuffle(batch)
        for device in batch:
            now += 1
            ok(r, device, now)
    assert r.phase == "succeeded"
    assert emitted == list(r.targets)
    assert r.status().succeeded == n


def _split(targets: list[str], waves: list[int]) -> list[list[str]]:
    out, start = [], 0
    for size in waves:
        out.append(targets[start : start + size])
        start += size
    return out
