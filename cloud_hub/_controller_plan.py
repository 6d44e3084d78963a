"""Pure decisions of the fleet controller: no I/O, no clock, deterministic.

:class:`cloud_hub.controller.FleetController` is a thin asyncio shell around
these functions and around :class:`DeploymentState`, the whole per-deployment
state it keeps and persists:

* the deployment's current :class:`~cloud_hub.rollout.Rollout`;
* ``written``: the version the hub last wrote in each device's desired state
  for the deployment's workload, so a write is only repeated when it changes;
* ``slots`` and ``displaced`` (``replicas`` mode): one
  :class:`~cloud_hub.placement.Assignment` per replica slot, and the copies left
  on lost devices when their replica moved (kept until the device returns so
  :func:`~cloud_hub.placement.dedupe_replicas` can settle the slot);
* ``outbox``: desired-state writes decided but not yet carried out. It is
  persisted *before* the writes are made and cleared after, so a hub that
  crashes in between redoes them at start (writes are idempotent).

The state is saved as the rollout's :meth:`~cloud_hub.rollout.Rollout.to_dict`
plus one extra key, ``"controller"``; :meth:`Rollout.from_dict` ignores it, so
any reader of a :class:`~cloud_hub.store.RolloutRecord` can still restore the
rollout alone.

Two edits of a rollout's saved form are made here because the engine has no
command for them: :func:`add_targets` (a device enrolled that an ``each``
deployment selects, or a re-apply that places more devices) and
:func:`retarget` (a replica moved off a lost device). Both go back through
:meth:`Rollout.from_dict`, which validates the result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Self

from pydantic import ValidationError

from cloud_hub._exceptions import RolloutDecodeError
from cloud_hub.manifests import Deployment, PlacementMode
from cloud_hub.placement import Assignment, DeviceView
from cloud_hub.rollout import TERMINAL_PHASES, Rollout
from cloud_hub.store import DeviceRecord
from firmware_profiles import FirmwareProfile
from sync.crdt import LwwMap
from sync.envelope import unpackb_strict
from sync.models import WorkloadStatus

__all__ = [
    "DELETED_PHASE",
    "REPORTED_PREFIX",
    "ControllerStats",
    "DeploymentState",
    "add_targets",
    "assign_slots",
    "device_views",
    "new_rollout",
    "parse_report",
    "reported_values",
    "retarget",
    "rollout_summary",
    "stable_version",
    "wave_sizes",
    "workload_spec",
]

log = logging.getLogger(__name__)

DELETED_PHASE: Final = "deleted"
"""``RolloutRecord.phase`` of a deleted deployment (its ``state`` keeps the
rollout's last phase)."""

REPORTED_PREFIX: Final = "reported/"
"""Key prefix of workload status in a device's ``device/<id>`` scope."""

CONTROLLER_KEY: Final = "controller"
STATE_VERSION: Final = 1

Write = tuple[str, str | None]
"""An outbox entry: (device, version to write; None removes the workload)."""


@dataclass(slots=True)
class ControllerStats:
    """Counters for ``/metrics``.

    Attributes:
        reports: workload reports applied to a rollout.
        ignored_reports: reports of workloads no deployment owns.
        malformed_reports: reports that are not a valid workload status.
        writes: desired-state writes made.
        moved_replicas: replicas moved off lost devices.
        stranded_replicas: replicas on lost devices that found no new device.
        removed_duplicates: returned copies removed by the dedupe rule.
        unknown_profiles: devices left out of placement for an unknown profile.
        restore_errors: persisted rollouts that could not be restored.
        errors: fleet inputs (reports, presence, ticks) whose handling failed;
            their writes are retried at the next tick.
    """

    reports: int = 0
    ignored_reports: int = 0
    malformed_reports: int = 0
    writes: int = 0
    moved_replicas: int = 0
    stranded_replicas: int = 0
    removed_duplicates: int = 0
    unknown_profiles: int = 0
    restore_errors: int = 0
    errors: int = 0


def wave_sizes(deployment: Deployment, total: int) -> list[int]:
    """Wave sizes for ``total`` targets from the manifest's cumulative waves.

    Empty waves (a cumulative target equal to the one before) are dropped, so
    the sizes are positive and add up to ``total``.
    """
    sizes: list[int] = []
    reached = 0
    for cumulative in deployment.spec.rollout.wave_targets(total):
        if cumulative > reached:
            sizes.append(cumulative - reached)
            reached = cumulative
    return sizes


def new_rollout(
    deployment: Deployment, version: str, targets: Sequence[str], previous: str | None
) -> Rollout:
    """The (not yet started) rollout of ``version`` over ``targets``.

    Args:
        deployment: the manifest; its ``spec.rollout`` gives the waves, threshold,
            timeouts, failure budget and failure action.
        version: the version to roll out (the deployment record's version).
        targets: placed devices, in placement order.
        previous: the version a rollback returns to (see :func:`stable_version`).
    """
    spec = deployment.spec.rollout
    return Rollout(
        deployment.name,
        version,
        list(targets),
        wave_sizes(deployment, len(targets)),
        success_threshold=spec.success_threshold,
        wave_timeout_ms=max(1, round(spec.wave_timeout_s * 1000)),
        offline_deadline_ms=round(spec.offline_deadline_s * 1000),
        failure_budget=spec.failure_budget_count(len(targets)),
        on_failure=spec.on_failure,
        previous_version=previous if previous != version else None,
    )


def stable_version(rollout: Rollout | None) -> str | None:
    """The version the fleet is known to run, which a new rollout may return to.

    A succeeded rollout's version; otherwise (in progress, paused, failed or
    rolled back) the version that rollout itself would return to. A superseded
    rollout that never completed is thus never the rollback target.
    """
    if rollout is None:
        return None
    if rollout.phase == "succeeded":
        return rollout.version
    return rollout.previous_version


def assign_slots(
    slots: Sequence[Assignment], devices: Sequence[str], generation: int
) -> list[Assignment]:
    """Replica slots for a new placement of a ``replicas`` deployment.

    A device that keeps its slot keeps its generation; every other device takes
    the lowest free slot with ``generation``, which must exceed every current
    one (so :func:`~cloud_hub.placement.dedupe_replicas` prefers it).

    Args:
        slots: the current assignments.
        devices: the devices placed now (one replica each).
        generation: the generation of new assignments.

    Returns:
        One assignment per device, sorted by slot, slots ``0 .. len(devices)-1``.
    """
    wanted = set(devices)
    count = len(devices)
    kept = {a.slot: a for a in slots if a.device_id in wanted and a.slot < count}
    held = {a.device_id for a in kept.values()}
    free = (s for s in range(count) if s not in kept)
    out = list(kept.values())
    for dev in devices:
        if dev not in held:
            out.append(Assignment(slot=next(free), device_id=dev, generation=generation))
    return sorted(out)


def device_views(
    devices: Iterable[DeviceRecord],
    profiles: Mapping[str, FirmwareProfile],
    allocated: Mapping[str, tuple[int, int]],
    online: Mapping[str, bool],
) -> list[DeviceView]:
    """Placement views of stored devices.

    Devices whose firmware profile is not in ``profiles`` are left out (the
    caller counts them): their capacity is unknown.

    Args:
        devices: the fleet.
        profiles: firmware profiles by name.
        allocated: (cpu millis, memory MB) already reserved per device id.
        online: whether each device counts as online (absent: True).
    """
    views: list[DeviceView] = []
    for dev in devices:
        profile = profiles.get(dev.profile)
        if profile is None:
            continue
        cpu, mem = allocated.get(dev.id, (0, 0))
        views.append(
            DeviceView(
                id=dev.id,
                region=dev.region,
                profile=profile.name,
                arch=profile.arch,
                drivers=frozenset(profile.drivers),
                gpu=profile.gpu,
                cpu_millis=profile.cpu_cores * 1000,
                memory_mb=profile.memory_mb,
                allocated_cpu_millis=cpu,
                allocated_memory_mb=mem,
                labels=dev.labels,
                online=online.get(dev.id, True),
            )
        )
    return views


def workload_spec(deployment: Deployment, version: int) -> dict[str, Any]:
    """The spec JSON written to a device: the desired workload, ``version`` set
    to the deployment record's version (what the device reports back)."""
    spec = deployment.desired_workload().model_copy(update={"version": str(version)})
    return spec.model_dump(mode="json")


def parse_report(workload: str, value: Any) -> WorkloadStatus:
    """Validate a ``reported/<workload>`` value.

    Raises:
        ValueError: not a valid :class:`~sync.models.WorkloadStatus` of that
            workload.
    """
    try:
        status = WorkloadStatus.model_validate(value)
    except ValidationError as exc:
        raise ValueError(f"invalid workload status: {exc.errors()[0]['msg']}") from exc
    if status.name != workload:
        raise ValueError(f"status names workload {status.name!r}, key names {workload!r}")
    return status


def reported_values(scope: bytes) -> dict[str, Any]:
    """Live ``reported/<workload>`` values of a stored ``device/<id>`` scope, by workload.

    Args:
        scope: the scope as the store keeps it (msgpack of
            :meth:`~sync.crdt.LwwMap.to_wire`).

    Raises:
        sync._exceptions.NovaCronError: the bytes are not a valid scope state.
    """
    state = LwwMap.from_wire(unpackb_strict(scope))
    return {
        key[len(REPORTED_PREFIX) :]: value
        for key, value in state.items()
        if key.startswith(REPORTED_PREFIX)
    }


def rollout_summary(rollout: Rollout) -> dict[str, Any]:
    """A small JSON-ready summary, published as a ``rollout`` event."""
    status = rollout.status()
    return {
        "deployment": rollout.deployment,
        "version": rollout.version,
        "previous_version": rollout.previous_version,
        "phase": status.phase,
        "reason": status.reason,
        "current_wave": status.current_wave,
        "waves": len(status.waves),
        "targets": len(rollout.targets),
        "succeeded": status.succeeded,
        "failures": status.failures,
        "skipped": status.skipped,
    }


def _wave_started(data: Mapping[str, Any], index: int) -> bool:
    started = data["started"]
    return 0 <= index < len(started) and started[index] is not None


def add_targets(rollout: Rollout, devices: Sequence[str]) -> tuple[Rollout, str | None]:
    """Add devices to a rollout's last wave.

    Used when an ``each`` deployment gains a device (enrollment, re-apply) without
    a new version. The devices join the last wave, so they get the version when
    that wave starts; if it has started already (or the rollout ended) they get
    what the rest of the fleet was given: the new version, or the previous one
    after a rollback. A failed first deploy sends nothing.

    A rollout without targets (nothing matched when it was applied) cannot be
    extended: build a new one instead (the caller does).

    Args:
        rollout: a rollout with at least one target.
        devices: new devices (not targets yet).

    Returns:
        The new rollout and the version the new devices must be sent now (None:
        nothing yet; they are then sent it by the rollout itself).

    Raises:
        ValueError: no targets yet, or a device is a target already.
    """
    if not rollout.targets:
        raise ValueError("a rollout without targets cannot be extended")
    fresh = [d for d in devices if d not in set(rollout.targets)]
    if len(fresh) != len(devices) or len(set(fresh)) != len(fresh):
        raise ValueError("devices must be new and distinct")
    data = rollout.to_dict()
    last = len(data["waves"]) - 1
    version: str | None = None
    if rollout.phase == "rolled_back":
        version = rollout.previous_version
    elif rollout.phase != "failed" and _wave_started(data, last):
        version = rollout.version
    data["targets"] = [*data["targets"], *fresh]
    data["waves"] = [*data["waves"][:-1], data["waves"][-1] + len(fresh)]
    data["outcome"] = [*data["outcome"], *(["pending"] * len(fresh))]
    if version is not None:
        data["desired"] = {**data["desired"], **dict.fromkeys(fresh, version)}
    return Rollout.from_dict(data), version


def retarget(rollout: Rollout, old: str, new: str) -> Rollout:
    """Replace target ``old`` by ``new`` (a replica moved off a lost device).

    ``new`` takes ``old``'s place in its wave, pending, and inherits the version
    the rollout asked ``old`` to run (the controller writes it to ``new``).

    Raises:
        ValueError: ``old`` is not a target or ``new`` is one already.
    """
    targets = list(rollout.targets)
    if old not in targets or new in targets:
        raise ValueError(f"cannot retarget {old!r} to {new!r}")
    data = rollout.to_dict()
    index = targets.index(old)
    targets[index] = new
    outcome = list(data["outcome"])
    outcome[index] = "pending"
    desired = dict(data["desired"])
    if old in desired:
        desired[new] = desired.pop(old)
    offline = dict(data["offline_since"])
    offline.pop(old, None)
    data.update(
        targets=targets,
        outcome=outcome,
        desired=desired,
        offline_since=offline,
        accepted=[d for d in data["accepted"] if d != old],
        actions=[a for a in data["actions"] if a[0] != old],
    )
    return Rollout.from_dict(data)


@dataclass(slots=True)
class DeploymentState:
    """Everything the controller keeps about one deployment (see the module doc).

    Attributes:
        name: the deployment name.
        workload: its workload name (the key in devices' desired state).
        mode: ``each`` or ``replicas``.
        record_version: the deployment record version being rolled out.
        rollout: its rollout.
        written: version last written per device (absent: nothing written).
        slots: replica slots (``replicas`` mode), sorted.
        displaced: copies left on lost devices when their replica moved.
        generation: the placement counter of :attr:`slots`.
        outbox: writes decided and not yet carried out, in order.
        deleted: the deployment was deleted.
    """

    name: str
    workload: str
    mode: PlacementMode
    record_version: int
    rollout: Rollout
    written: dict[str, str] = field(default_factory=dict)
    slots: list[Assignment] = field(default_factory=list)
    displaced: list[Assignment] = field(default_factory=list)
    generation: int = 0
    outbox: list[Write] = field(default_factory=list)
    deleted: bool = False
    _targets: frozenset[str] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        self._targets = frozenset(self.rollout.targets)

    @property
    def phase(self) -> str:
        """The rollout's phase, or ``deleted``."""
        return DELETED_PHASE if self.deleted else self.rollout.phase

    @property
    def active(self) -> bool:
        """Whether the rollout still advances with time (not ended, not deleted)."""
        return not self.deleted and self.rollout.phase not in TERMINAL_PHASES

    def set_rollout(self, rollout: Rollout) -> None:
        """Replace the rollout (keeps the target lookup in step)."""
        self.rollout = rollout
        self._targets = frozenset(rollout.targets)

    def is_target(self, device: str) -> bool:
        """Whether ``device`` is one of the rollout's targets."""
        return device in self._targets

    def want(self, device: str, version: str | None, *, force: bool = False) -> None:
        """Queue a desired-state write unless ``device`` already has ``version``.

        Args:
            device: the device.
            version: the version to run there; None removes the workload.
            force: queue it even when it was written already (a removal
                re-issued when a lost device comes back).
        """
        if not force and self.written.get(device) == version:
            return
        if version is None:
            self.written.pop(device, None)
        else:
            self.written[device] = version
        self.outbox.append((device, version))

    def absorb(self) -> None:
        """Move the rollout's actions to the outbox.

        After a rollback, every target not on the previous version is sent it
        (not only those the rollout had sent the new version): a rollout that
        superseded an unfinished one may find devices on a third version.
        """
        for action in self.rollout.take_actions():
            self.want(action.device, action.version)
        previous = self.rollout.previous_version
        if self.rollout.phase == "rolled_back" and previous is not None:
            for device in self.rollout.targets:
                if self.written.get(device) != previous:
                    self.want(device, previous)

    def to_state(self) -> dict[str, Any]:
        """The persisted form: the rollout's dict plus a ``controller`` key."""
        data = self.rollout.to_dict()
        data[CONTROLLER_KEY] = {
            "v": STATE_VERSION,
            "workload": self.workload,
            "mode": self.mode,
            "record_version": self.record_version,
            "written": dict(self.written),
            "slots": [[a.slot, a.device_id, a.generation] for a in self.slots],
            "displaced": [[a.slot, a.device_id, a.generation] for a in self.displaced],
            "generation": self.generation,
            "outbox": [[d, v] for d, v in self.outbox],
            "deleted": self.deleted,
        }
        return data

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> Self:
        """Restore :meth:`to_state`'s output.

        Raises:
            RolloutDecodeError: malformed data.
        """
        rollout = Rollout.from_dict(data)
        try:
            return cls._decode(rollout, data.get(CONTROLLER_KEY))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RolloutDecodeError(
                f"bad controller state: {exc}", field=CONTROLLER_KEY, deployment=rollout.deployment
            ) from exc

    @classmethod
    def _decode(cls, rollout: Rollout, extra: Any) -> Self:
        if not isinstance(extra, Mapping) or extra.get("v") != STATE_VERSION:
            raise TypeError("missing or unsupported controller state")
        mode = extra["mode"]
        if mode not in ("each", "replicas"):
            raise ValueError(f"bad mode {mode!r}")
        written = {_str(k): _str(v) for k, v in extra["written"].items()}
        outbox: list[Write] = [
            (_str(d), None if v is None else _str(v)) for d, v in extra["outbox"]
        ]
        return cls(
            name=rollout.deployment,
            workload=_str(extra["workload"]),
            mode=mode,
            record_version=_int(extra["record_version"]),
            rollout=rollout,
            written=written,
            slots=_assignments(extra["slots"]),
            displaced=_assignments(extra["displaced"]),
            generation=_int(extra["generation"]),
            outbox=outbox,
            deleted=bool(extra["deleted"]),
        )

    def slot_devices(self) -> list[str]:
        """Devices holding a replica slot, by slot."""
        return [a.device_id for a in self.slots]

    def holders(self) -> Collection[str]:
        """Devices the deployment is placed on (slots, or the rollout targets)."""
        return self.slot_devices() if self.mode == "replicas" else self.rollout.targets

    def replace_slot(self, old: Assignment, new: Assignment) -> None:
        """Put ``new`` in place of ``old`` in :attr:`slots`."""
        self.slots = sorted(new if a == old else a for a in self.slots)

    def drop_displaced_held(self) -> None:
        """Forget displaced copies on devices that hold a slot again: a device
        holds at most one copy of a workload (one desired key)."""
        held = set(self.slot_devices())
        self.displaced = [a for a in self.displaced if a.device_id not in held]

    def copy_with(self, **changes: Any) -> DeploymentState:
        """A copy with some fields changed (outbox and maps copied)."""
        base = dataclasses.replace(
            self,
            written=dict(self.written),
            slots=list(self.slots),
            displaced=list(self.displaced),
            outbox=list(self.outbox),
        )
        for key, value in changes.items():
            if key == "rollout":
                base.set_rollout(value)
            else:
                setattr(base, key, value)
        return base


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an int, got {type(value).__name__}")
    return value


def _assignments(items: Any) -> list[Assignment]:
    return sorted(
        Assignment(slot=_int(slot), device_id=_str(dev), generation=_int(gen))
        for slot, dev, gen in items
    )
