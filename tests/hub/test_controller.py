"""FleetController over a real SQLite store, an in-memory desired writer and a manual clock."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cloud_hub._exceptions import PlacementError, RolloutStateError
from cloud_hub._sqlite_store import SQLiteStore, open_sqlite_store
from cloud_hub.controller import FleetController
from cloud_hub.health import HealthTracker
from cloud_hub.manifests import Deployment
from cloud_hub.rollout import Rollout
from cloud_hub.store import DeploymentRecord, DeviceRecord, EnrollTokenRecord, NotFoundError
from cloud_hub.testing import EventRecorder, HealthFeed, InMemoryDesiredWriter
from sync.crdt import LwwMap
from sync.envelope import packb
from sync.testing import ManualClock

S = 1000
MIN = 60 * S


def manifest(
    name: str = "web",
    *,
    workload: str | None = None,
    env: str = "one",
    waves: Sequence[dict[str, Any]] = ({"percent": 100},),
    replicas: int | None = None,
    budget: float = 0,
    on_failure: str = "pause",
    threshold: float = 1.0,
    labels: dict[str, str] | None = None,
    cpu: int = 100,
    timeout_s: float = 600,
    deadline_s: float = 120,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "workload": {
            "name": workload or name,
            "driver": "process",
            "command": ["sleep", "3600"],
            "env": {"V": env},
        },
        "selector": {"labels": labels or {}},
        "resources": {"cpu_millis": cpu, "memory_mb": 64},
        "rollout": {
            "waves": list(waves),
            "failure_budget": budget,
            "on_failure": on_failure,
            "success_threshold": threshold,
            "wave_timeout_s": timeout_s,
            "offline_deadline_s": deadline_s,
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    doc = {"kind": "Deployment", "apiVersion": "novacron.io/v1", "metadata": {"name": name}}
    return Deployment.model_validate({**doc, "spec": spec}).to_document()


@dataclasses.dataclass
class Hub:
    store: SQLiteStore
    clock: ManualClock
    writer: InMemoryDesiredWriter
    health: HealthTracker
    feed: HealthFeed
    events: EventRecorder
    ctl: FleetController

    async def restart(self, writer: InMemoryDesiredWriter | None = None) -> FleetController:
        """A hub restart: a new controller over the same store, started, in :attr:`ctl`."""
        self.ctl = FleetController(
            self.store,
            writer or self.writer,
            self.health,
            clock=self.clock.now_ms,
            publish=self.events,
            lost_after_ms=5 * MIN,
        )
        await self.ctl.start()
        return self.ctl

    async def minutes_pass(self, n: int, *, region: str = "eu") -> None:
        """``n`` minutes, each with its relay alive and a tick."""
        for _ in range(n):
            self.clock.advance(MIN)
            self.feed.relay_up(region, self.clock.now_ms())
            await self.ctl.tick()

    async def enroll(
        self,
        device_id: str,
        *,
        region: str = "eu",
        labels: dict[str, str] | None = None,
        profile: str = "raspberry-pi-4",
    ) -> DeviceRecord:
        token = EnrollTokenRecord(
            id=f"tok-{device_id}", secret_hash="00" * 32, name=device_id, region=region
        )
        await self.store.create_enroll_token(token)
        device = DeviceRecord(
            id=device_id,
            region=region,
            profile=profile,
            public_key=f"key-{device_id}",
            arch="aarch64",
            labels=labels or {},
        )
        return await self.store.redeem_enroll_token(
            token.id, token.secret_hash, self.clock.now_ms(), lambda _t: device
        )

    async def put(self, document: dict[str, Any]) -> DeploymentRecord:
        record, _ = await self.store.put_deployment(
            document["metadata"]["name"], document, "alice", self.clock.now_ms()
        )
        return record

    async def apply(self, document: dict[str, Any]) -> Rollout:
        record = await self.ctl.apply(await self.put(document))
        assert record is not None
        return Rollout.from_dict(record.state)

    async def report(
        self,
        device: str,
        workload: str,
        version: str,
        *,
        phase: str = "running",
        healthy: bool | None = True,
        ctl: FleetController | None = None,
    ) -> None:
        status = {"name": workload, "version": version, "phase": phase, "healthy": healthy}
        await (ctl or self.ctl).device_reported(device, {f"reported/{workload}": status})

    async def report_desired(
        self, workload: str, *, healthy: bool = True, skip: Sequence[str] = ()
    ) -> list[str]:
        """Every device with the workload desired reports it running (healthy)."""
        done = []
        for device in self.writer.devices_running(workload):
            version = self.writer.version(device, workload)
            if device in skip or version is None:
                continue
            await self.report(device, workload, version, healthy=healthy)
            done.append(device)
        return done

    async def rollout(self, name: str) -> Rollout:
        """The rollout as saved, after saving what was saved lazily."""
        await self.ctl.flush()
        return Rollout.from_dict((await self.store.get_rollout(name)).state)


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    store = await asyncio.to_thread(open_sqlite_store, tmp_path / "hub.db")
    clock = ManualClock()
    writer = InMemoryDesiredWriter()
    health = HealthTracker()
    events = EventRecorder()
    ctl = FleetController(
        store, writer, health, clock=clock.now_ms, publish=events, lost_after_ms=5 * MIN
    )
    await ctl.start()
    try:
        yield Hub(store, clock, writer, health, HealthFeed(health), events, ctl)
    finally:
        await store.aclose()


async def fleet(hub: Hub, n: int, *, online: bool = False, **kwargs: Any) -> list[str]:
    """Enroll ``n`` devices (in "eu" unless told); ``online``: seen by the health feed."""
    ids = [f"gw-{i:02d}" for i in range(n)]
    for device_id in ids:
        device = await hub.enroll(device_id, **kwargs)
        if online:
            hub.feed.device(device.region, device_id, True, hub.clock.now_ms())
    return ids


# -- deployments and waves ----------------------------------------------------------------


async def test_waves_advance_on_healthy_reports(hub: Hub) -> None:
    devices = await fleet(hub, 5)
    rollout = await hub.apply(manifest(waves=[{"count": 1}, {"percent": 100}]))
    assert rollout.phase == "progressing"
    first = hub.writer.devices_running("web")
    assert len(first) == 1
    spec = hub.writer.spec(first[0], "web")
    assert spec is not None
    assert spec["version"] == "1"
    assert spec["env"] == {"V": "one"}
    assigned = await hub.store.list_assignments(deployment="web")
    assert sorted(a.device_id for a in assigned) == devices

    await hub.report_desired("web")
    assert hub.writer.devices_running("web") == devices
    assert (await hub.rollout("web")).phase == "progressing"
    await hub.report_desired("web")
    record = await hub.store.get_rollout("web")
    assert record.phase == "succeeded"
    assert record.version == 1
    assert hub.events.of("rollout")[-1]["phase"] == "succeeded"
    assert hub.ctl.stats.reports == 6


async def test_unhealthy_report_does_not_advance(hub: Hub) -> None:
    await fleet(hub, 2)
    await hub.apply(manifest(waves=[{"count": 1}, {"percent": 100}]))
    await hub.report_desired("web", healthy=False)
    assert len(hub.writer.devices_running("web")) == 1
    assert (await hub.rollout("web")).status().current_wave == 0


async def test_failure_budget_pauses_then_resume_continues(hub: Hub) -> None:
    devices = await fleet(hub, 4)
    await hub.apply(manifest())
    await hub.report_desired("web")
    await hub.apply(manifest(env="two", waves=[{"count": 1}, {"percent": 100}]))
    first = [d for d in devices if hub.writer.version(d, "web") == "2"]
    assert len(first) == 1
    await hub.report(first[0], "web", "2", phase="failed", healthy=None)
    rollout = await hub.rollout("web")
    assert rollout.phase == "paused"
    assert rollout.previous_version == "1"
    assert [d for d in devices if hub.writer.version(d, "web") == "2"] == first

    assert (await hub.ctl.resume("web", "bob")).phase == "progressing"
    await hub.report(first[0], "web", "2")  # restarted fine
    assert {hub.writer.version(d, "web") for d in devices} == {"2"}
    await hub.report_desired("web")
    assert (await hub.rollout("web")).phase == "succeeded"


async def test_failure_budget_rolls_back_to_the_previous_document(hub: Hub) -> None:
    devices = await fleet(hub, 4)
    await hub.apply(manifest())
    await hub.report_desired("web")
    doc = manifest(env="two", waves=[{"count": 2}, {"percent": 100}], on_failure="rollback")
    await hub.apply(doc)
    first = [d for d in devices if hub.writer.version(d, "web") == "2"]
    assert len(first) == 2
    await hub.report(first[0], "web", "2")
    await hub.report(first[1], "web", "2", phase="failed")
    rollout = await hub.rollout("web")
    assert rollout.phase == "rolled_back"
    for device in devices:
        spec = hub.writer.spec(device, "web")
        assert spec is not None
        assert (spec["version"], spec["env"]) == ("1", {"V": "one"})
    assert hub.events.of("rollout")[-1]["phase"] == "rolled_back"


async def test_first_deploy_failure_with_rollback_ends_failed(hub: Hub) -> None:
    await fleet(hub, 2)
    await hub.apply(manifest(waves=[{"count": 1}, {"percent": 100}], on_failure="rollback"))
    (first,) = hub.writer.devices_running("web")
    await hub.report(first, "web", "1", phase="failed")
    assert (await hub.rollout("web")).phase == "failed"
    assert hub.writer.devices_running("web") == [first]


async def test_pause_resume_undo_and_their_errors(hub: Hub) -> None:
    devices = await fleet(hub, 3)
    with pytest.raises(NotFoundError):
        await hub.ctl.pause("web", "bob")
    await hub.apply(manifest(waves=[{"count": 1}, {"percent": 100}]))
    with pytest.raises(RolloutStateError) as info:
        await hub.ctl.undo("web", "bob")
    assert info.value.command == "undo"  # a first deploy has nothing to return to
    record = await hub.ctl.pause("web", "bob")
    assert record.phase == "paused"
    await hub.report_desired("web")
    assert len(hub.writer.devices_running("web")) == 1  # paused: no new wave
    record = await hub.ctl.resume("web", "bob")
    assert record.phase == "progressing"
    assert hub.writer.devices_running("web") == devices
    await hub.report_desired("web")
    assert (await hub.store.get_rollout("web")).phase == "succeeded"
    with pytest.raises(RolloutStateError) as info:
        await hub.ctl.pause("web", "bob")
    assert info.value.phase == "succeeded"

    await hub.apply(manifest(env="two"))
    await hub.report_desired("web")
    record = await hub.ctl.undo("web", "bob")
    assert record.phase == "rolled_back"
    assert {hub.writer.version(d, "web") for d in devices} == {"1"}
    with pytest.raises(RolloutStateError):
        await hub.ctl.undo("web", "bob")
    with pytest.raises(RolloutStateError):
        await hub.ctl.resume("web", "bob")


# -- offline devices -----------------------------------------------------------------------


async def test_offline_device_is_skipped_past_the_deadline_and_catches_up(hub: Hub) -> None:
    devices = await fleet(hub, 3)
    await hub.apply(manifest(deadline_s=120))
    late = devices[2]
    await hub.ctl.presence_changed(late, "offline", hub.clock.now_ms())
    await hub.report_desired("web", skip=[late])
    assert (await hub.rollout("web")).phase == "progressing"  # pending, not yet skipped
    hub.clock.advance(60 * S)
    await hub.ctl.tick()
    assert (await hub.rollout("web")).phase == "progressing"
    hub.clock.advance(61 * S)
    await hub.ctl.tick()
    rollout = await hub.rollout("web")
    assert rollout.phase == "succeeded"
    assert rollout.outcome(late) == "skipped"
    # Its desired state was written all along: it catches up when it returns.
    assert hub.writer.version(late, "web") == "1"
    await hub.ctl.presence_changed(late, "online", hub.clock.now_ms())
    await hub.report(late, "web", "1")
    assert (await hub.rollout("web")).outcome(late) == "succeeded"


async def test_unreachable_is_not_offline(hub: Hub) -> None:
    devices = await fleet(hub, 2)
    await hub.apply(manifest(deadline_s=10, timeout_s=3600))
    await hub.ctl.presence_changed(devices[1], "unreachable", hub.clock.now_ms())
    await hub.report(devices[0], "web", "1")
    hub.clock.advance(60 * S)
    await hub.ctl.tick()
    rollout = await hub.rollout("web")
    assert rollout.phase == "progressing"
    assert rollout.outcome(devices[1]) == "pending"


async def test_wave_timeout_counts_silent_online_devices_as_failed(hub: Hub) -> None:
    devices = await fleet(hub, 2)
    await hub.apply(manifest(timeout_s=60, budget=0))
    await hub.report(devices[0], "web", "1")
    hub.clock.advance(61 * S)
    await hub.ctl.tick()
    rollout = await hub.rollout("web")
    assert rollout.phase == "paused"
    assert rollout.outcome(devices[1]) == "failed"


# -- independence --------------------------------------------------------------------------


async def test_independent_deployments_never_block_each_other(hub: Hub) -> None:
    await fleet(hub, 2, labels={"site": "a"})
    b_devices = [f"b-{i}" for i in range(3)]
    for device in b_devices:
        await hub.enroll(device, labels={"site": "b"})
    await hub.apply(manifest("stuck", labels={"site": "a"}, waves=[{"count": 1}, {"percent": 100}]))
    await hub.apply(manifest("ok", labels={"site": "b"}, waves=[{"count": 1}, {"percent": 100}]))
    # "stuck" never hears back; "ok" completes all its waves meanwhile.
    for _ in range(3):
        await hub.report_desired("ok")
        hub.clock.advance(10 * S)
        await hub.ctl.tick()
    assert (await hub.rollout("ok")).phase == "succeeded"
    assert hub.writer.devices_running("ok") == b_devices
    stuck = await hub.rollout("stuck")
    assert stuck.phase == "progressing"
    assert stuck.status().current_wave == 0


async def test_a_hanging_write_holds_only_its_own_deployment(hub: Hub) -> None:
    await hub.enroll("a-0", labels={"site": "a"})
    await hub.enroll("b-0", labels={"site": "b"})
    hub.writer.blocked.add("a-0")
    slow = asyncio.create_task(hub.apply(manifest("slow", labels={"site": "a"})))
    await asyncio.sleep(0.05)
    assert not slow.done()
    await asyncio.wait_for(hub.apply(manifest("fast", labels={"site": "b"})), 5)
    await hub.report("b-0", "fast", "1")
    assert (await hub.rollout("fast")).phase == "succeeded"
    hub.writer.unblock("a-0")
    await asyncio.wait_for(slow, 5)
    assert hub.writer.version("a-0", "slow") == "1"


# -- replicas and lost devices -----------------------------------------------------------


async def _lose(hub: Hub, device: str, *, region: str = "eu") -> None:
    """Take ``device`` offline, then let lost_after pass with its relay alive."""
    hub.feed.device(region, device, False, hub.clock.now_ms())
    await hub.ctl.presence_changed(device, "offline", hub.clock.now_ms())
    await hub.minutes_pass(6, region=region)


async def test_replicas_move_off_a_lost_device_and_one_copy_survives_its_return(
    hub: Hub,
) -> None:
    await fleet(hub, 4, online=True)
    await hub.apply(manifest(replicas=2))
    await hub.report_desired("web")
    running = hub.writer.devices_running("web")
    assert len(running) == 2
    assert (await hub.rollout("web")).phase == "succeeded"

    lost = running[0]
    await _lose(hub, lost)
    after = hub.writer.devices_running("web")
    assert len(after) == 2
    assert lost not in after
    (replacement,) = set(after) - set(running)
    assert hub.writer.version(replacement, "web") == "1"
    assert hub.writer.writes_to(lost)[-1].spec is None
    assigned = {a.device_id for a in await hub.store.list_assignments(deployment="web")}
    assert assigned == set(after)
    assert hub.ctl.stats.moved_replicas == 1
    assert hub.events.of("placement")[-1]["moved"] == [[lost, replacement]]
    # The replacement is a target of the rollout now; its report counts.
    await hub.report(replacement, "web", "1")
    assert (await hub.rollout("web")).outcome(replacement) == "succeeded"

    # The lost device comes back still running its copy: the newest placement
    # wins, the returned copy is removed again, no duplicate.
    writes_before = len(hub.writer.writes_to(lost))
    hub.feed.device("eu", lost, True, hub.clock.now_ms())
    await hub.ctl.presence_changed(lost, "online", hub.clock.now_ms())
    await hub.report(lost, "web", "1")
    assert hub.writer.devices_running("web") == sorted(after)
    removal = hub.writer.writes_to(lost)[writes_before:]
    assert [w.spec for w in removal] == [None]
    assert hub.ctl.stats.removed_duplicates == 1
    state = hub.ctl.state("web")
    assert state is not None
    assert state.displaced == []
    await hub.minutes_pass(3)  # more ticks change nothing
    assert hub.writer.devices_running("web") == sorted(after)


async def test_a_short_outage_does_not_move_replicas(hub: Hub) -> None:
    await fleet(hub, 3, online=True)
    await hub.apply(manifest(replicas=1))
    (holder,) = hub.writer.devices_running("web")
    hub.feed.device("eu", holder, False, hub.clock.now_ms())
    hub.clock.advance(4 * MIN)
    hub.feed.relay_up("eu", hub.clock.now_ms())
    await hub.ctl.tick()
    assert hub.writer.devices_running("web") == [holder]


async def test_replicas_in_an_unreachable_region_are_not_moved(hub: Hub) -> None:
    await fleet(hub, 3, online=True)
    await hub.apply(manifest(replicas=1))
    (holder,) = hub.writer.devices_running("web")
    hub.feed.device("eu", holder, False, hub.clock.now_ms())
    hub.clock.advance(30 * MIN)  # the relay went silent too: a partition
    await hub.ctl.tick()
    assert hub.writer.devices_running("web") == [holder]


async def test_each_deployments_are_not_moved(hub: Hub) -> None:
    devices = await fleet(hub, 2, online=True)
    await hub.apply(manifest())
    await _lose(hub, devices[0])
    assert hub.writer.devices_running("web") == devices


async def test_replicas_rebalance_mid_rollout_keeps_the_wave_going(hub: Hub) -> None:
    await fleet(hub, 4, online=True)
    await hub.apply(manifest(replicas=2, waves=[{"count": 1}, {"percent": 100}], deadline_s=3600))
    (first,) = hub.writer.devices_running("web")
    await _lose(hub, first)
    (replacement,) = hub.writer.devices_running("web")
    assert replacement != first
    await hub.report(replacement, "web", "1")
    assert len(hub.writer.devices_running("web")) == 2  # the second wave started
    await hub.report_desired("web")
    assert (await hub.rollout("web")).phase == "succeeded"


# -- restart -------------------------------------------------------------------------------


async def test_a_new_controller_on_the_same_store_resumes_rollouts(hub: Hub) -> None:
    devices = await fleet(hub, 3)
    await hub.apply(manifest(waves=[{"count": 1}, {"percent": 100}]))
    (first,) = hub.writer.devices_running("web")
    await hub.restart()
    await hub.report(first, "web", "1")
    assert hub.writer.devices_running("web") == devices
    await hub.report_desired("web")
    assert (await hub.rollout("web")).phase == "succeeded"
    # The previous version is known after a restart too.
    await hub.apply(manifest(env="two"))
    assert (await hub.rollout("web")).previous_version == "1"


async def test_reports_saved_lazily_are_recovered_from_device_scopes(hub: Hub) -> None:
    await fleet(hub, 2)
    await hub.apply(manifest(waves=[{"percent": 50}, {"percent": 100}]))
    (first,) = hub.writer.devices_running("web")
    await hub.report(first, "web", "1", healthy=None, phase="starting")
    saved = Rollout.from_dict((await hub.store.get_rollout("web")).state)
    assert saved.outcome(first) == "pending"
    # The device reports healthy; the hub crashes before saving that report,
    # which reached the store only through the reconciler's device scope.
    status = {"name": "web", "version": "1", "phase": "running", "healthy": True}
    scope = LwwMap()
    scope.set("reported/web", status, ts=1, origin=first)
    await hub.store.save_scopes({f"device/{first}": packb(scope.to_wire())})
    await hub.store.save_scopes({"device/gw-99": b"not msgpack"})
    await hub.restart()
    assert (await hub.rollout("web")).outcome(first) == "succeeded"
    assert len(hub.writer.devices_running("web")) == 2


async def test_lazy_saves_are_written_by_tick(hub: Hub) -> None:
    devices = await fleet(hub, 2)
    await hub.apply(manifest())
    await hub.report(devices[0], "web", "1")  # no write, no phase change: saved lazily

    async def saved() -> str:
        return Rollout.from_dict((await hub.store.get_rollout("web")).state).outcome(devices[0])

    assert await saved() == "pending"
    await hub.ctl.tick()
    assert await saved() == "succeeded"


async def test_writes_interrupted_by_a_crash_are_redone_at_start(hub: Hub) -> None:
    devices = await fleet(hub, 2)
    hub.writer.fail.add(devices[1])
    with pytest.raises(ConnectionError):
        await hub.apply(manifest())
    assert hub.writer.version(devices[1], "web") is None
    state = (await hub.store.get_rollout("web")).state
    assert [devices[1], "1"] in state["controller"]["outbox"]
    fresh = InMemoryDesiredWriter()
    await hub.restart(fresh)
    assert fresh.version(devices[1], "web") == "1"
    assert [w.device_id for w in fresh.writes].count(devices[1]) == 1
    assert (await hub.store.get_rollout("web")).state["controller"]["outbox"] == []


async def test_a_corrupt_persisted_rollout_is_skipped_at_start(hub: Hub) -> None:
    await fleet(hub, 1)
    await hub.apply(manifest())
    record = await hub.store.get_rollout("web")
    await hub.store.save_rollout(dataclasses.replace(record, state={"v": 99}))
    restarted = await hub.restart()
    assert restarted.stats.restore_errors == 1
    assert restarted.deployments() == []


# -- apply semantics -----------------------------------------------------------------------


async def test_apply_supersedes_a_running_rollout_and_rolls_back_to_the_stable_version(
    hub: Hub,
) -> None:
    devices = await fleet(hub, 4)
    await hub.apply(manifest())
    await hub.report_desired("web")
    waves = [{"count": 2}, {"percent": 100}]
    await hub.apply(manifest(env="two", waves=waves))
    await hub.report_desired("web")  # only the first wave had it: it succeeds
    await hub.report_desired("web")
    assert (await hub.rollout("web")).phase == "succeeded"
    await hub.apply(manifest(env="three", waves=[{"count": 2}, {"percent": 100}]))
    on_v3 = [d for d in devices if hub.writer.version(d, "web") == "3"]
    await hub.apply(manifest(env="four", waves=waves, on_failure="rollback"))
    rollout = await hub.rollout("web")
    assert rollout.version == "4"
    assert rollout.previous_version == "2"  # v3 never completed
    on_v4 = [d for d in devices if hub.writer.version(d, "web") == "4"]
    await hub.report(on_v4[0], "web", "4", phase="failed")
    assert (await hub.rollout("web")).phase == "rolled_back"
    # Every device, including those that had the unfinished v3, is back on v2.
    assert {hub.writer.version(d, "web") for d in devices} == {"2"}
    assert on_v3


async def test_apply_of_the_same_version_changes_nothing(hub: Hub) -> None:
    await fleet(hub, 2)
    doc = manifest()
    record = await hub.put(doc)
    first = await hub.ctl.apply(record)
    writes = len(hub.writer.writes)
    second = await hub.ctl.apply(record)
    assert first is not None
    assert second is not None
    assert second.version == first.version
    assert len(hub.writer.writes) == writes


async def test_devices_no_longer_selected_lose_the_workload(hub: Hub) -> None:
    await hub.enroll("a", labels={"tier": "x"})
    await hub.enroll("b", labels={"tier": "y"})
    await hub.apply(manifest())
    assert hub.writer.devices_running("web") == ["a", "b"]
    await hub.apply(manifest(labels={"tier": "x"}))
    assert hub.writer.devices_running("web") == ["a"]
    assert [a.device_id for a in await hub.store.list_assignments(deployment="web")] == ["a"]


async def test_nothing_matches_gives_an_empty_rollout_then_enrollment_adds(hub: Hub) -> None:
    rollout = await hub.apply(manifest(labels={"site": "x"}))
    assert rollout.phase == "succeeded"
    assert rollout.targets == ()
    device = await hub.enroll("late", labels={"site": "x"})
    await hub.ctl.device_enrolled(device)
    assert hub.writer.version("late", "web") == "1"
    await hub.report("late", "web", "1")
    assert (await hub.rollout("web")).targets == ("late",)


async def test_device_enrolled_joins_matching_each_deployments_only(hub: Hub) -> None:
    await fleet(hub, 2, labels={"site": "a"})
    await hub.apply(manifest("web", labels={"site": "a"}))
    await hub.apply(manifest("db", labels={"site": "b"}))
    await hub.apply(manifest("rep", replicas=1, labels={"site": "a"}))
    await hub.report_desired("web")
    newcomer = await hub.enroll("new", labels={"site": "a"})
    await hub.ctl.device_enrolled(newcomer)
    assert hub.writer.desired("new").keys() == {"web"}
    assert "new" in {a.device_id for a in await hub.store.list_assignments(deployment="web")}
    await hub.ctl.device_enrolled(newcomer)  # twice: no change
    assert (await hub.rollout("web")).targets.count("new") == 1


async def test_capacity_counts_other_deployments(hub: Hub) -> None:
    await hub.enroll("pi")  # 4 cores
    await hub.apply(manifest("big", cpu=3000))
    rollout = await hub.apply(manifest("more", cpu=2000))
    assert rollout.targets == ()
    assert hub.writer.desired("pi").keys() == {"big"}
    await hub.ctl.delete(await hub.store.delete_deployment("big", "alice", hub.clock.now_ms()))
    await hub.apply(manifest("more", cpu=2000, env="again"))
    assert hub.writer.desired("pi").keys() == {"more"}


async def test_workload_names_cannot_clash_or_change(hub: Hub) -> None:
    await fleet(hub, 1)
    await hub.apply(manifest("web"))
    with pytest.raises(PlacementError, match="used by deployment"):
        await hub.apply(manifest("other", workload="web"))
    with pytest.raises(PlacementError, match="cannot change"):
        await hub.apply(manifest("web", workload="web2"))


async def test_delete_removes_the_workload_everywhere(hub: Hub) -> None:
    devices = await fleet(hub, 3)
    await hub.apply(manifest(replicas=2))
    deleted = await hub.store.delete_deployment("web", "alice", hub.clock.now_ms())
    await hub.ctl.delete(deleted)
    assert hub.writer.devices_running("web") == []
    assert await hub.store.list_assignments(deployment="web") == []
    record = await hub.store.get_rollout("web")
    assert record.phase == "deleted"
    assert hub.ctl.deployments() == []
    with pytest.raises(NotFoundError):
        await hub.ctl.pause("web", "bob")
    # Reports of the deleted workload are ignored; a restart does not revive it.
    await hub.report(devices[0], "web", "1")
    restarted = await hub.restart()
    assert restarted.deployments() == []
    # Applying again starts from scratch.
    rollout = await hub.apply(manifest(replicas=2))
    assert rollout.previous_version is None
    assert len(hub.writer.devices_running("web")) == 2


# -- reports -------------------------------------------------------------------------------


async def test_bad_and_unknown_reports_are_counted_never_raised(hub: Hub) -> None:
    await fleet(hub, 1)
    await hub.apply(manifest())
    await hub.ctl.device_reported(
        "gw-00",
        {
            "reported/web": {"name": "web", "phase": "dancing"},
            "reported/other": {"name": "other", "version": "1", "phase": "running"},
            "override/web": {"name": "web", "action": "stop"},
            "reported/web2": None,
        },
    )
    assert hub.ctl.stats.malformed_reports == 1
    assert hub.ctl.stats.ignored_reports == 1
    assert (await hub.rollout("web")).phase == "progressing"
    await hub.ctl.device_reported("gw-00", {"reported/web": ["not", "a", "status"]})
    assert hub.ctl.stats.malformed_reports == 2


async def test_a_failed_write_during_a_report_is_retried_by_tick(hub: Hub) -> None:
    devices = await fleet(hub, 2)
    await hub.apply(manifest(waves=[{"count": 1}, {"percent": 100}]))
    (first,) = hub.writer.devices_running("web")
    (second,) = set(devices) - {first}
    hub.writer.fail.add(second)
    await hub.report(first, "web", "1")  # opens the second wave; its write fails
    assert hub.ctl.stats.errors == 1
    assert hub.writer.version(second, "web") is None
    await hub.ctl.tick()
    assert hub.ctl.stats.errors == 2  # still failing, still queued
    hub.writer.fail.clear()
    await hub.ctl.tick()
    assert hub.writer.version(second, "web") == "1"
    await hub.report(second, "web", "1")
    assert (await hub.rollout("web")).phase == "succeeded"


async def test_tick_skips_a_deployment_busy_writing(hub: Hub) -> None:
    await hub.enroll("a-0", labels={"site": "a"})
    await hub.enroll("b-0", labels={"site": "b"})
    await hub.enroll("b-1", labels={"site": "b"})
    await hub.apply(manifest("fast", labels={"site": "b"}, timeout_s=60))
    hub.writer.blocked.add("a-0")
    slow = asyncio.create_task(hub.apply(manifest("slow", labels={"site": "a"})))
    await asyncio.sleep(0.05)
    await hub.report("b-0", "fast", "1")
    hub.clock.advance(61 * S)
    await asyncio.wait_for(hub.ctl.tick(), 5)  # does not wait for "slow"
    assert (await hub.rollout("fast")).outcome("b-1") == "failed"
    hub.writer.unblock("a-0")
    await asyncio.wait_for(slow, 5)


async def test_a_restart_between_the_move_and_the_return_keeps_one_copy(hub: Hub) -> None:
    await fleet(hub, 3, online=True)
    await hub.apply(manifest(replicas=1))
    (lost,) = hub.writer.devices_running("web")
    await _lose(hub, lost)
    (replacement,) = hub.writer.devices_running("web")
    restarted = await hub.restart()
    await hub.report(lost, "web", "1")  # back, still running its old copy
    assert hub.writer.devices_running("web") == [replacement]
    assert hub.writer.writes_to(lost)[-1].spec is None
    assert restarted.stats.removed_duplicates == 1
    # A second return of the same device changes nothing more.
    writes = len(hub.writer.writes)
    await restarted.presence_changed(lost, "online", hub.clock.now_ms())
    assert len(hub.writer.writes) == writes


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_losses_and_returns_never_duplicate_replicas(hub: Hub, seed: int) -> None:
    rng = random.Random(seed)
    devices = await fleet(hub, 6, online=True)
    await hub.apply(manifest(replicas=3))
    await hub.report_desired("web")
    offline: set[str] = set()
    ever_ran: set[str] = set(hub.writer.devices_running("web"))
    for _ in range(12):
        device = rng.choice(devices)
        now = hub.clock.now_ms()
        if device in offline:
            offline.discard(device)
            hub.feed.device("eu", device, True, now)
            await hub.ctl.presence_changed(device, "online", now)
            if device in ever_ran:  # it still runs whatever it had
                await hub.report(device, "web", "1")
        elif len(offline) < 3:
            offline.add(device)
            hub.feed.device("eu", device, False, now)
            await hub.ctl.presence_changed(device, "offline", now)
        await hub.minutes_pass(6)
        running = hub.writer.devices_running("web")
        ever_ran.update(running)
        assert len(running) == 3, running
        assert not offline.intersection(running)
        assigned = sorted(a.device_id for a in await hub.store.list_assignments(deployment="web"))
        assert assigned == running


async def test_an_enrolled_device_fills_a_replica_shortfall(hub: Hub) -> None:
    await fleet(hub, 1)
    rollout = await hub.apply(manifest(replicas=2, waves=[{"count": 1}, {"percent": 100}]))
    assert rollout.targets == ("gw-00",)
    await hub.report("gw-00", "web", "1")
    assert (await hub.rollout("web")).phase == "succeeded"
    newcomer = await hub.enroll("gw-01")
    await hub.ctl.device_enrolled(newcomer)
    assert hub.writer.devices_running("web") == ["gw-00", "gw-01"]
    state = hub.ctl.state("web")
    assert state is not None
    assert [(a.slot, a.device_id) for a in state.slots] == [(0, "gw-00"), (1, "gw-01")]
    await hub.ctl.device_enrolled(await hub.enroll("gw-02"))
    assert hub.writer.devices_running("web") == ["gw-00", "gw-01"]
