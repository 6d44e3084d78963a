"""The fleet controller: deployments placed, rolled out and kept placed.

:class:`FleetController` is the asyncio shell around the pure pieces:
:func:`~cloud_hub.placement.place` chooses devices, a
:class:`~cloud_hub.rollout.Rollout` per deployment decides who gets which version
when, :class:`~cloud_hub.health.HealthTracker` says which devices are lost, and
:mod:`cloud_hub._controller_plan` holds the rest of the decisions. It writes
desired state through a :class:`DesiredWriter` (the reconciler, which signs the
entries and sends them to the device's relay) and persists everything in the
:class:`~cloud_hub.store.Store`.

Semantics
---------

* :meth:`~FleetController.apply` of a new deployment version places it (free
  capacity = firmware profile capacity minus the resources of every deployment
  placed on the device), stores the placement, and starts a rollout of the
  version over the placed devices. An apply while a rollout of the same
  deployment is running supersedes it: the new rollout returns, on failure, to
  the last version that rolled out completely. An apply of the version already
  rolled out only adds devices that newly match. Devices no longer placed get
  their workload removed. A deployment that matches no device gets an empty,
  ``succeeded`` rollout (so ``apply`` always returns a record for a live
  deployment); devices that enroll later are added.
* Each deployment has its own lock, rollout and timers: a stuck rollout never
  delays another deployment. Placement (capacity read, place, store) runs under
  one fleet-wide lock so concurrent applies cannot both spend the same capacity.
* Workload reports (``reported/<workload>`` in scope ``device/<id>``) feed the
  rollout of the deployment that owns the workload name. Two live deployments
  may not share a workload name (:class:`~cloud_hub._exceptions.PlacementError`),
  and a deployment's workload name cannot change between versions.
* Presence: ``online`` and ``offline`` feed the rollouts; ``unreachable`` (the
  region's relay is lost) is not an offline device and changes nothing.
* :meth:`~FleetController.tick` lets rollout timers run, and moves the replicas
  of ``replicas`` deployments off devices offline for ``lost_after_ms``
  (:func:`~cloud_hub.placement.rebalance`): the replacement gets the version
  the lost device had, the lost device gets a signed removal. When the lost
  device comes back (presence ``online`` or a report), :func:`dedupe_replicas`
  keeps the newest placement of each slot and the returned copy is removed
  again, so exactly one copy survives. ``each`` deployments never move.
* After a rollback every target is sent the previous version.
* :meth:`~FleetController.delete` removes the workload from every device,
  clears the placement and saves the rollout with phase ``deleted``.
* Every decision is persisted before its writes are made (see
  :mod:`cloud_hub._controller_plan`), so :meth:`~FleetController.start` on a new
  controller over the same store continues every rollout where it was and
  redoes writes a crash interrupted. A report or presence change that makes no
  write and keeps the phase is saved lazily (next tick, or
  :meth:`~FleetController.flush` at shutdown): a report of a large rollout
  would otherwise rewrite its whole state. ``start`` feeds restored rollouts
  the workload status stored in the device scopes, so nothing is lost.
* Fleet inputs (reports, presence, enrollment, ticks) never raise: errors are
  logged and counted in :attr:`~FleetController.stats`, and unfinished writes
  are retried at the next tick. Operator calls (apply, delete, pause, resume,
  undo) raise.

Events published: ``rollout`` (a :func:`rollout_summary` whenever it changes)
and ``placement`` (``{"deployment", "moved": [[from, to], ...]}`` when replicas
move, ``{"deployment", "removed": [device]}`` when a returned copy is removed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

from cloud_hub._controller_fleet import FleetReader
from cloud_hub._controller_plan import (
    DELETED_PHASE,
    REPORTED_PREFIX,
    ControllerStats,
    DeploymentState,
    add_targets,
    assign_slots,
    new_rollout,
    parse_report,
    reported_values,
    retarget,
    rollout_summary,
    stable_version,
    workload_spec,
)
from cloud_hub._exceptions import PlacementError, RolloutDecodeError
from cloud_hub.health import HealthTracker
from cloud_hub.manifests import Deployment
from cloud_hub.placement import dedupe_replicas, place, rebalance
from cloud_hub.store import (
    MAX_PAGE_LIMIT,
    DeploymentRecord,
    DeviceRecord,
    NotFoundError,
    RolloutRecord,
    Store,
)
from firmware_profiles import FirmwareProfile, load_profile
from sync._exceptions import NovaCronError
from sync.models import WorkloadStatus

__all__ = ["ControllerStats", "DesiredWriter", "FleetController"]

log = logging.getLogger(__name__)


class DesiredWriter(Protocol):
    """Where the controller writes devices' desired state (the reconciler)."""

    async def set_desired(
        self, device_id: str, workload: str, spec: Mapping[str, Any] | None
    ) -> None:
        """Write hub-signed ``desired/<device_id>[workload] = spec``.

        ``None`` writes a signed removal. Persisted in the store before it
        returns, then sent to the device's region relay.
        """


class FleetController:
    """Places deployments, runs their rollouts and keeps replicas placed.

    Args:
        store: the hub's store.
        desired: where desired state is written.
        health: the hub's device health view (lost devices, presence).
        clock: the hub clock, milliseconds since the epoch.
        publish: called with fleet events (``rollout``, ``placement``); must not
            block.
        lost_after_ms: how long a device must be offline before its replicas move.
        profile_loader: firmware profile by name (default: the built-in profiles).
    """

    def __init__(
        self,
        store: Store,
        desired: DesiredWriter,
        health: HealthTracker,
        *,
        clock: Callable[[], int],
        publish: Callable[[str, Mapping[str, Any]], None] | None = None,
        lost_after_ms: int = 300_000,
        profile_loader: Callable[[str], FirmwareProfile] = load_profile,
    ) -> None:
        if lost_after_ms < 0:
            raise ValueError("lost_after_ms must not be negative")
        self.store = store
        self.desired = desired
        self.health = health
        self.clock = clock
        self.lost_after_ms = lost_after_ms
        self.stats = ControllerStats()
        self._publish = publish
        self._fleet = FleetReader(store, health, profile_loader, self.stats)
        self._states: dict[str, DeploymentState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._placement_lock = asyncio.Lock()
        self._docs: dict[tuple[str, int], Deployment] = {}
        self._by_workload: dict[str, str] = {}
        self._reported: dict[tuple[str, str], WorkloadStatus] = {}
        self._published: dict[str, dict[str, Any]] = {}
        self._saved_phase: dict[str, str] = {}
        self._dirty: set[str] = set()

    # -- queries -----------------------------------------------------------------------

    def deployments(self) -> list[str]:
        """Names of the live (not deleted) deployments the controller runs."""
        return sorted(n for n, s in self._states.items() if not s.deleted)

    def state(self, name: str) -> DeploymentState | None:
        """The live state of a deployment (read-only use), or None."""
        state = self._states.get(name)
        return None if state is None or state.deleted else state

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Restore every rollout from the store and redo interrupted writes.

        Restored rollouts are fed the workload status stored in the device
        scopes (reports saved lazily may not be in the rollout yet). A rollout
        that cannot be restored is logged and counted
        (:attr:`ControllerStats.restore_errors`), not fatal; a write that fails
        is retried by :meth:`tick`.
        """
        cursor: str | None = None
        records: list[RolloutRecord] = []
        while True:
            page = await self.store.list_rollouts(cursor=cursor, limit=MAX_PAGE_LIMIT)
            records.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        for record in records:
            if record.phase == DELETED_PHASE:
                continue
            try:
                state = DeploymentState.from_state(record.state)
            except RolloutDecodeError as exc:
                self.stats.restore_errors += 1
                log.warning("cannot restore the rollout of %s: %s", record.deployment, exc)
                continue
            if state.deleted:
                continue
            self._states[state.name] = state
            self._by_workload[state.workload] = state.name
            self._published[state.name] = rollout_summary(state.rollout)
            self._saved_phase[state.name] = state.phase
        if any(s.active for s in self._states.values()):
            await self._reseed()
        for name in sorted(self._states):
            async with self._guard(name):  # a failing write is retried by tick
                await self._commit(self._states[name])
        log.info("fleet controller started with %s deployments", len(self._states))

    async def flush(self) -> None:
        """Save the rollouts whose latest inputs are not saved yet (see
        :meth:`device_reported`); call it at shutdown."""
        for name in sorted(self._dirty):
            async with self._guard(name):
                state = self._states.get(name)
                if state is not None and name in self._dirty:
                    await self._commit(state)

    async def _reseed(self) -> None:
        """Feed restored rollouts the workload status stored in device scopes.

        Reports that changed no write and no phase are saved lazily, so a crash
        may lose the latest ones from a rollout; the device scopes hold them.
        """
        now = self.clock()
        scopes = await self.store.load_scopes()
        for scope in sorted(scopes):
            if not scope.startswith("device/"):
                continue
            device = scope[len("device/") :]
            try:
                values = reported_values(scopes[scope])
            except NovaCronError as exc:
                log.warning("stored scope %s cannot be read: %s", scope, exc)
                continue
            for workload, value in sorted(values.items()):
                name = self._by_workload.get(workload)
                state = self._states.get(name) if name is not None else None
                if state is None:
                    continue
                try:
                    status = parse_report(workload, value)
                except ValueError:
                    continue
                self._reported[device, workload] = status
                if state.is_target(device):
                    state.rollout.report(device, status.version, status.healthy, status.phase, now)

    # -- deployments -------------------------------------------------------------------

    async def apply(self, record: DeploymentRecord) -> RolloutRecord | None:
        """Place and roll out a deployment version.

        Returns:
            The deployment's rollout record; None only for a deleted record
            (which is handled as :meth:`delete`).

        Raises:
            PlacementError: the document is not a valid manifest, its workload
                name is used by another deployment or differs from the one its
                earlier versions used.
        """
        if record.deleted:
            await self.delete(record)
            return None
        deployment = self._remember(record)
        name = record.name
        async with self._lock(name):
            workload = deployment.spec.workload.name
            owner = self._by_workload.get(workload)
            if owner is not None and owner != name:
                raise PlacementError(
                    f"workload name {workload!r} is used by deployment {owner!r}",
                    deployment=name,
                )
            state = self.state(name)
            if state is not None and state.workload != workload:
                raise PlacementError(
                    f"the workload name cannot change ({state.workload!r} -> {workload!r}); "
                    "delete the deployment and apply it again",
                    deployment=name,
                )
            now = self.clock()
            if state is not None and record.version < state.record_version:
                log.warning(
                    "apply of %s version %s ignored: version %s is newer",
                    name,
                    record.version,
                    state.record_version,
                )
            elif state is not None and record.version == state.record_version:
                await self._extend(state, deployment, None, now)
            else:
                await self._roll_out(state, record, deployment, now)
            return self._record(self._states[name], now)

    async def delete(self, record: DeploymentRecord) -> None:
        """Remove a deployment from every device and clear its placement."""
        name = record.name
        async with self._lock(name):
            now = self.clock()
            state = self.state(name)
            if state is None:
                await self.store.set_assignments(name, [], now)
                return
            for device in sorted(state.written):
                state.want(device, None)
            state.deleted = True
            state.slots = []
            state.displaced = []
            await self.store.set_assignments(name, [], now)
            await self._commit(state)
            if self._by_workload.get(state.workload) == name:
                del self._by_workload[state.workload]
            log.info("deployment %s deleted by %s", name, record.actor)

    async def pause(self, name: str, actor: str) -> RolloutRecord:
        """Pause a deployment's rollout.

        Raises:
            NotFoundError: no live deployment of that name.
            RolloutStateError: the rollout is not progressing.
        """
        return await self._command(name, actor, "pause")

    async def resume(self, name: str, actor: str) -> RolloutRecord:
        """Resume a paused rollout (its failures so far are accepted).

        Raises:
            NotFoundError: no live deployment of that name.
            RolloutStateError: the rollout is not paused.
        """
        return await self._command(name, actor, "resume")

    async def undo(self, name: str, actor: str) -> RolloutRecord:
        """Roll a deployment back to its previous version.

        Raises:
            NotFoundError: no live deployment of that name.
            RolloutStateError: already rolled back, or no previous version.
        """
        return await self._command(name, actor, "undo")

    # -- fleet inputs ------------------------------------------------------------------

    async def device_reported(self, device_id: str, changes: Mapping[str, Any]) -> None:
        """Apply changed keys of a device's ``device/<id>`` scope.

        ``reported/<workload>`` values feed the rollout owning the workload;
        other keys are ignored. A malformed status is counted and logged; a
        failed write is logged and counted (:attr:`ControllerStats.errors`) and
        retried at the next tick. Never raises for either.
        """
        for key, value in changes.items():
            if not key.startswith(REPORTED_PREFIX):
                continue
            workload = key[len(REPORTED_PREFIX) :]
            name = self._by_workload.get(workload)
            if value is None:
                self._reported.pop((device_id, workload), None)
                continue
            try:
                status = parse_report(workload, value)
            except ValueError as exc:
                self.stats.malformed_reports += 1
                log.warning("malformed report of %s from %s: %s", workload, device_id, exc)
                continue
            if name is None:
                self.stats.ignored_reports += 1
                log.debug("report of unknown workload %s from %s", workload, device_id)
                continue
            self._reported[device_id, workload] = status
            async with self._guard(name):
                state = self.state(name)
                if state is None:
                    continue
                self.stats.reports += 1
                state.rollout.report(
                    device_id, status.version, status.healthy, status.phase, self.clock()
                )
                self._settle_return(state, device_id)
                await self._commit(state, lazy=True)

    async def presence_changed(self, device_id: str, state: str, now_ms: int) -> None:
        """Apply a device's health change (``online``, ``offline``, ``unreachable``).

        Errors are logged and counted, not raised (see :meth:`device_reported`).
        """
        if state not in ("online", "offline"):
            return
        online = state == "online"
        for name in sorted(self._states):
            entry = self.state(name)
            if entry is None:
                continue
            returned = online and any(a.device_id == device_id for a in entry.displaced)
            if not entry.is_target(device_id) and not returned:
                continue
            async with self._guard(name):
                entry = self.state(name)
                if entry is None:
                    continue
                if entry.is_target(device_id):
                    entry.rollout.device_presence(device_id, online, now_ms)
                if online:
                    self._settle_return(entry, device_id)
                await self._commit(entry, lazy=True)

    async def device_enrolled(self, device: DeviceRecord) -> None:
        """Place a new device: it joins every ``each`` deployment that selects it,
        and ``replicas`` deployments short of replicas are placed again.

        For ``each`` only this device is placed (against its own free capacity);
        the deployments' other devices are left as they are. Errors are logged
        and counted, not raised (the enrollment itself succeeded).
        """
        for name in sorted(self._states):
            state = self.state(name)
            if state is None or state.is_target(device.id):
                continue
            async with self._guard(name):
                state = self.state(name)
                if state is None or state.is_target(device.id):
                    continue
                deployment = await self._document(name, state.record_version)
                if state.mode == "each":
                    await self._extend(state, deployment, device, self.clock())
                elif len(state.slots) < (deployment.spec.replicas or 0):
                    await self._extend(state, deployment, None, self.clock())

    async def tick(self) -> None:
        """Let rollout timers run and move replicas off lost devices.

        Deployments are ticked concurrently, and one whose lock is held (a
        write in progress) is left for the next tick, so a slow or failing
        deployment never holds up the others. Errors are logged and counted
        (:attr:`ControllerStats.errors`); unfinished writes stay in the
        deployment's outbox and are retried at the next tick.
        """
        now = self.clock()
        lost = frozenset(self.health.lost_devices(now, self.lost_after_ms))
        async with asyncio.TaskGroup() as group:
            for name in sorted(self._states):
                lock = self._locks.get(name)
                if self.state(name) is None or (lock is not None and lock.locked()):
                    continue
                group.create_task(self._tick_one(name, now, lost), name=f"tick-{name}")

    async def _tick_one(self, name: str, now: int, lost: frozenset[str]) -> None:
        async with self._guard(name):
            state = self.state(name)
            if state is None:
                return
            moving = state.mode == "replicas" and bool(lost.intersection(state.slot_devices()))
            if not (state.active or moving or state.outbox or name in self._dirty):
                return
            before = state.to_state()
            if state.active:
                state.rollout.tick(now)
            if moving:
                await self._rebalance(state, lost, now)
            after = state.to_state()
            before.pop("now", None)
            after.pop("now", None)
            if before != after or state.outbox or state.rollout.actions or name in self._dirty:
                await self._commit(state)

    # -- internals: placement and rollouts ---------------------------------------------

    async def _roll_out(
        self,
        state: DeploymentState | None,
        record: DeploymentRecord,
        deployment: Deployment,
        now: int,
    ) -> None:
        name = record.name
        holders = list(state.holders()) if state is not None else []
        async with self._placement_lock:
            views = await self._fleet.views(deployment, holders, now, self._resources)
            placement = place(deployment, views, current=holders)
            targets = list(placement.devices)
            await self.store.set_assignments(name, targets, now)
        previous = stable_version(state.rollout) if state is not None else None
        rollout = new_rollout(deployment, str(record.version), targets, previous)
        if state is None:
            new = DeploymentState(
                name=name,
                workload=deployment.spec.workload.name,
                mode=deployment.spec.mode,
                record_version=record.version,
                rollout=rollout,
            )
        else:
            new = state.copy_with(
                rollout=rollout, record_version=record.version, mode=deployment.spec.mode
            )
        if new.mode == "replicas":
            new.generation += 1
            new.slots = assign_slots(new.slots, targets, new.generation)
            new.drop_displaced_held()
        else:
            new.slots, new.displaced = [], []
        placed = set(targets)
        for device in sorted(new.written):
            if device not in placed:
                new.want(device, None)
        rollout.start(now)
        for device in targets:
            status = self._reported.get((device, new.workload))
            if status is not None:
                rollout.report(device, status.version, status.healthy, status.phase, now)
        self._states[name] = new
        self._by_workload[new.workload] = name
        log.info(
            "deployment %s version %s placed on %s devices (%s wanted, %s rejected)",
            name,
            record.version,
            len(targets),
            placement.wanted if placement.wanted is not None else "each",
            len(placement.rejected),
        )
        await self._commit(new)

    async def _extend(
        self,
        state: DeploymentState,
        deployment: Deployment,
        only: DeviceRecord | None,
        now: int,
    ) -> None:
        """Place the current version again and add the devices it newly selects."""
        name = state.name
        holders = list(state.holders())
        async with self._placement_lock:
            if only is None:
                views = await self._fleet.views(deployment, holders, now, self._resources)
            else:
                views = await self._fleet.views(
                    deployment, holders, now, self._resources, only=only
                )
            placement = place(deployment, views, current=[] if only else holders)
            added = [d for d in placement.devices if not state.is_target(d)]
            if not added:
                return
            if state.mode == "replicas":
                state.generation += 1
                state.slots = assign_slots(
                    state.slots, [*state.slot_devices(), *added], state.generation
                )
                state.drop_displaced_held()
            await self.store.set_assignments(name, [*state.rollout.targets, *added], now)
        if not state.rollout.targets:
            previous = state.rollout.previous_version
            rollout = new_rollout(deployment, state.rollout.version, added, previous)
            rollout.start(now)
            state.set_rollout(rollout)
        else:
            rollout, version = add_targets(state.rollout, added)
            state.set_rollout(rollout)
            for device in added:
                if version is not None:
                    state.want(device, version)
        log.info("deployment %s extended to %s new devices", name, len(added))
        await self._commit(state)

    async def _rebalance(self, state: DeploymentState, lost: frozenset[str], now: int) -> None:
        name = state.name
        deployment = await self._document(name, state.record_version)
        lost_after_s = self.lost_after_ms / 1000
        holders = state.slot_devices()
        async with self._placement_lock:
            views = await self._fleet.views(deployment, holders, now, self._resources)
            result = rebalance(
                deployment,
                views,
                state.slots,
                dict.fromkeys(lost, lost_after_s),
                lost_after_s=lost_after_s,
                generation=state.generation + 1,
            )
            if result.stranded:
                self.stats.stranded_replicas += len(result.stranded)
                log.warning(
                    "deployment %s: %s replicas on lost devices found no new device",
                    name,
                    len(result.stranded),
                )
            if not result.moved:
                return
            state.generation += 1
            state.slots = list(result.assignments)
            state.drop_displaced_held()
            await self.store.set_assignments(name, state.slot_devices(), now)
        for old, new in result.moved:
            version = state.written.get(old.device_id)
            state.displaced.append(old)
            if state.is_target(old.device_id):
                state.set_rollout(retarget(state.rollout, old.device_id, new.device_id))
            state.want(old.device_id, None)
            if version is not None:
                state.want(new.device_id, version)
            log.info(
                "deployment %s: replica %s moved from lost %s to %s",
                name,
                old.slot,
                old.device_id,
                new.device_id,
            )
        self.stats.moved_replicas += len(result.moved)
        self._emit(
            "placement",
            {"deployment": name, "moved": [[o.device_id, n.device_id] for o, n in result.moved]},
        )

    def _settle_return(self, state: DeploymentState, device: str) -> None:
        """A device with displaced copies is back: keep one copy per slot."""
        mine = [a for a in state.displaced if a.device_id == device]
        if not mine:
            return
        result = dedupe_replicas([*state.slots, *mine], device)
        state.displaced = [a for a in state.displaced if a.device_id != device]
        for copy in result.remove:
            if copy in mine:
                continue
            # A slot's current copy lost to the returned one (not possible while
            # generations only grow, handled for completeness).
            survivor = next(a for a in result.keep if a.slot == copy.slot)
            version = state.written.get(copy.device_id)
            state.replace_slot(copy, survivor)
            if state.is_target(copy.device_id) and not state.is_target(device):
                state.set_rollout(retarget(state.rollout, copy.device_id, device))
            state.want(copy.device_id, None)
            if version is not None:
                state.want(device, version)
        if device not in state.slot_devices():
            # Removed when the replica moved; issued again so the returned device,
            # whatever it missed, sees a removal newer than its copy.
            state.want(device, None, force=True)
            self.stats.removed_duplicates += 1
            self._emit("placement", {"deployment": state.name, "removed": [device]})
        log.info("deployment %s: %s returned, one copy per slot kept", state.name, device)

    async def _command(self, name: str, actor: str, command: str) -> RolloutRecord:
        async with self._lock(name):
            state = self.state(name)
            if state is None:
                raise NotFoundError("rollout", name)
            now = self.clock()
            if command == "pause":
                state.rollout.pause(now)
            elif command == "resume":
                state.rollout.resume(now)
            else:
                state.rollout.undo(now)
            log.info("rollout %s: %s by %s", name, command, actor)
            await self._commit(state)
            return self._record(state, now)

    # -- internals: persistence and writes ---------------------------------------------

    async def _commit(self, state: DeploymentState, *, lazy: bool = False) -> None:
        """Persist the state with its outbox, make the writes, persist again.

        With ``lazy``, a change that queued no write and kept the phase is only
        marked dirty, and saved by the next :meth:`tick` (or :meth:`flush`):
        each report of a large rollout would otherwise rewrite its whole state.
        """
        state.absorb()
        if lazy and not state.outbox and self._saved_phase.get(state.name) == state.phase:
            self._dirty.add(state.name)
            self._publish_summary(state)
            return
        self._dirty.discard(state.name)
        self._saved_phase[state.name] = state.phase
        now = self.clock()
        await self.store.save_rollout(self._record(state, now))
        if state.outbox:
            try:
                while state.outbox:
                    device, version = state.outbox[0]
                    spec = None
                    if version is not None:
                        deployment = await self._document(state.name, int(version))
                        spec = workload_spec(deployment, int(version))
                    await self.desired.set_desired(device, state.workload, spec)
                    self.stats.writes += 1
                    state.outbox.pop(0)
            finally:
                await self.store.save_rollout(self._record(state, self.clock()))
        self._publish_summary(state)

    def _publish_summary(self, state: DeploymentState) -> None:
        summary = rollout_summary(state.rollout)
        summary["phase"] = state.phase
        if self._published.get(state.name) != summary:
            self._published[state.name] = summary
            self._emit("rollout", summary)

    def _record(self, state: DeploymentState, now: int) -> RolloutRecord:
        return RolloutRecord(
            deployment=state.name,
            version=state.record_version,
            phase=state.phase,
            state=state.to_state(),
            updated_at_ms=now,
        )

    @asynccontextmanager
    async def _guard(self, name: str) -> AsyncIterator[None]:
        """The deployment's lock, for inputs from the fleet (reports, presence,
        ticks): an error is logged and counted, not raised, so the reconciler
        and the tick loop carry on; unfinished writes stay in the outbox."""
        async with self._lock(name):
            try:
                yield
            except Exception:
                self.stats.errors += 1
                log.exception("deployment %s: handling a fleet input failed", name)

    def _emit(self, kind: str, data: Mapping[str, Any]) -> None:
        if self._publish is not None:
            self._publish(kind, data)

    @asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        async with lock:
            yield

    def _remember(self, record: DeploymentRecord) -> Deployment:
        key = (record.name, record.version)
        deployment = self._docs.get(key)
        if deployment is None:
            try:
                deployment = Deployment.model_validate(record.document)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise PlacementError(
                    f"version {record.version} is not a valid manifest: {exc}",
                    deployment=record.name,
                ) from exc
            self._docs[key] = deployment
        return deployment

    async def _document(self, name: str, version: int) -> Deployment:
        deployment = self._docs.get((name, version))
        if deployment is None:
            deployment = self._remember(await self.store.get_deployment(name, version))
        return deployment

    async def _resources(self, name: str, own: Deployment) -> tuple[int, int] | None:
        if name == own.name:
            res = own.spec.effective_resources
            return res.cpu_millis, res.memory_mb
        state = self.state(name)
        try:
            if state is not None:
                other = await self._document(name, state.record_version)
            else:
                other = self._remember(await self.store.get_deployment(name))
        except (NotFoundError, PlacementError) as exc:
            log.warning("assignments of %s not counted: %s", name, exc)
            return None
        res = other.spec.effective_resources
        return res.cpu_millis, res.memory_mb
