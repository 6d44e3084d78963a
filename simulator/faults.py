"""Fault schedules: what goes wrong in a simulated run, when, and to whom.

A schedule is a YAML file with a list of faults::

    faults:
      - kind: partition_region
        at: 60            # seconds from the start of the run
        duration: 60      # healed at t=120
        region: eu-west

Kinds and their targets (every fault has ``at`` and ``duration`` in seconds):

``partition_region``  ``region``: the region's relay loses the hub (TCP proxy cut).
``flap_devices``      ``devices`` (a :class:`DeviceSelector`), ``down_s``/``up_s``:
                      each chosen device's link goes down and up repeatedly;
                      ``use_profile: true`` takes the means from the device's
                      firmware profile (``link.outages``) and draws exponential
                      periods from the seed.
``kill_relay``        ``region``: the relay process is killed, restarted after ``duration``.
``kill_hub``          the hub is killed, restarted after ``duration``.
``kill_broker``       ``region`` (omitted: the hub's broker): killed, restarted after ``duration``.
``clock_skew``        ``devices``, ``hours`` (may be negative): device clocks jump,
                      and jump back after ``duration``.
``fill_disk``         ``devices``: the journal's disk is full for ``duration``.
``garbage``           ``devices``, ``rate_per_s``: the devices send garbage bytes
                      upstream for ``duration``.

:class:`FaultTimeline` turns a schedule, a fleet and a seed into a sorted list
of ``(time, action)``: the same inputs always give the same list, so a run (and
a deterministic simulation) can be replayed from its seed.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from firmware_profiles._yamlio import load_yaml_model
from sync._exceptions import ConfigError

__all__ = [
    "Action",
    "ActionKind",
    "ClockSkewFault",
    "DeviceRef",
    "DeviceSelector",
    "Fault",
    "FaultSchedule",
    "FaultTimeline",
    "FillDiskFault",
    "FlapDevicesFault",
    "GarbageFault",
    "KillBrokerFault",
    "KillHubFault",
    "KillRelayFault",
    "PartitionRegionFault",
    "load_fault_schedule",
]

_MAX_T = 30 * 86_400.0  # a month of simulated time is more than any run needs
_MAX_FLAPS_PER_DEVICE = 10_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Seconds = Annotated[float, Field(ge=0, le=_MAX_T)]
Duration = Annotated[float, Field(gt=0, le=_MAX_T)]
RegionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class DeviceSelector(_Frozen):
    """Which devices a fault hits: a share or a count, optionally narrowed.

    Exactly one of ``fraction`` and ``count``. The choice among the eligible
    devices is drawn from the run's seed.
    """

    fraction: float | None = Field(default=None, gt=0, le=1)
    count: int | None = Field(default=None, ge=1, le=10_000_000)
    region: RegionName | None = None
    profile: str | None = Field(default=None, min_length=1, max_length=63)

    @model_validator(mode="after")
    def _one_of(self) -> DeviceSelector:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of fraction and count")
        return self


class _Fault(_Frozen):
    at: Seconds
    duration: Duration


class PartitionRegionFault(_Fault):
    """A region's relay cut off from the hub for ``duration`` seconds."""

    kind: Literal["partition_region"]
    region: RegionName
    mode: Literal["cut", "blackhole"] = "cut"


class FlapDevicesFault(_Fault):
    """Device links going down and up during ``duration`` seconds."""

    kind: Literal["flap_devices"]
    devices: DeviceSelector
    down_s: Duration = 10.0
    up_s: Duration = 30.0
    use_profile: bool = False
    jitter: bool = Field(default=True, description="exponential periods instead of fixed ones")


class KillRelayFault(_Fault):
    """A region's relay killed, restarted after ``duration`` seconds."""

    kind: Literal["kill_relay"]
    region: RegionName


class KillHubFault(_Fault):
    """The hub killed, restarted after ``duration`` seconds."""

    kind: Literal["kill_hub"]


class KillBrokerFault(_Fault):
    """A broker killed (a region's, or the hub's when no region), restarted after ``duration``."""

    kind: Literal["kill_broker"]
    region: RegionName | None = None


class ClockSkewFault(_Fault):
    """Device clocks moved by ``hours`` for ``duration`` seconds."""

    kind: Literal["clock_skew"]
    devices: DeviceSelector
    hours: float = Field(ge=-24 * 365 * 30, le=24 * 365 * 30)

    @model_validator(mode="after")
    def _nonzero(self) -> ClockSkewFault:
        if self.hours == 0:
            raise ValueError("hours must not be 0")
        return self


class FillDiskFault(_Fault):
    """Devices whose disk is full for ``duration`` seconds."""

    kind: Literal["fill_disk"]
    devices: DeviceSelector


class GarbageFault(_Fault):
    """Devices sending garbage upstream for ``duration`` seconds."""

    kind: Literal["garbage"]
    devices: DeviceSelector
    rate_per_s: float = Field(default=1.0, gt=0, le=1000)


Fault = Annotated[
    PartitionRegionFault
    | FlapDevicesFault
    | KillRelayFault
    | KillHubFault
    | KillBrokerFault
    | ClockSkewFault
    | FillDiskFault
    | GarbageFault,
    Field(discriminator="kind"),
]


class FaultSchedule(_Frozen):
    """A whole schedule: faults in any order (the timeline sorts them)."""

    name: str = Field(default="", max_length=200)
    faults: tuple[Fault, ...] = ()

    @property
    def end_s(self) -> float:
        """When the last fault is over (0 for an empty schedule)."""
        return max((f.at + f.duration for f in self.faults), default=0.0)

    def regions(self) -> set[str]:
        """Every region a fault names (for checking against the fleet)."""
        out: set[str] = set()
        for f in self.faults:
            region = getattr(f, "region", None)
            if isinstance(region, str):
                out.add(region)
            sel = getattr(f, "devices", None)
            if isinstance(sel, DeviceSelector) and sel.region is not None:
                out.add(sel.region)
        return out


def load_fault_schedule(path: str | Path) -> FaultSchedule:
    """Load and validate a fault schedule file.

    Raises:
        ConfigError: missing file, bad YAML (naming the line) or an invalid
            fault (naming the field, e.g. ``faults[1].devices.fraction``).
    """
    return load_yaml_model(Path(path), FaultSchedule)


# -- the timeline ---------------------------------------------------------------------

ActionKind = Literal[
    "partition",
    "heal",
    "link_down",
    "link_up",
    "kill_relay",
    "start_relay",
    "kill_hub",
    "start_hub",
    "kill_broker",
    "start_broker",
    "skew_clock",
    "unskew_clock",
    "fill_disk",
    "free_disk",
    "garbage",
]

_HEALING: frozenset[str] = frozenset(
    ("heal", "link_up", "start_relay", "start_hub", "start_broker", "unskew_clock", "free_disk")
)


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """What the timeline needs to know of a device."""

    device_id: str
    region: str
    profile: str


@dataclass(frozen=True, slots=True)
class Action:
    """One thing to do at one time.

    Attributes:
        t: seconds from the start of the run.
        kind: what to do.
        fault: index of the fault in the schedule that caused it.
        region: the region acted on (or ``None``: the hub).
        device: the device acted on, for device actions.
        value: a parameter: clock offset in ms for ``skew_clock``.
    """

    t: float
    kind: ActionKind
    fault: int
    region: str | None = None
    device: str | None = None
    value: int = 0

    @property
    def heals(self) -> bool:
        """Whether this action ends a disruption (convergence is timed from it)."""
        return self.kind in _HEALING

    def sort_key(self) -> tuple[float, int, str, str, str]:
        return (self.t, self.fault, self.kind, self.region or "", self.device or "")


class FaultTimeline:
    """The actions of a schedule over a fleet, fixed by a seed.

    Args:
        schedule: the faults.
        devices: the fleet (see :func:`simulator.fleet.assign_fleet`).
        seed: the run's seed; device choices and flap periods are drawn from it.
        outage_means: per profile name, ``(mean_up_s, mean_down_s)`` for
            ``flap_devices`` faults with ``use_profile`` (profiles without
            outages fall back to the fault's own ``up_s``/``down_s``).
        horizon_s: actions after this time are left out (``None``: keep all).
        source: the schedule's file name, for error messages.

    Raises:
        ConfigError: a fault names a region the fleet does not have, or a
            selector matches no device.
    """

    def __init__(
        self,
        schedule: FaultSchedule,
        devices: Sequence[DeviceRef],
        seed: int,
        *,
        outage_means: Mapping[str, tuple[float, float]] | None = None,
        horizon_s: float | None = None,
        source: str = "",
    ) -> None:
        self.schedule = schedule
        self._source = source
        self.seed = seed
        self._devices = sorted(devices, key=lambda d: d.device_id)
        self._regions = sorted({d.region for d in self._devices})
        self._means = dict(outage_means or {})
        actions: list[Action] = []
        for index, fault in enumerate(schedule.faults):
            actions += self._expand(index, fault, random.Random(seed * 1_000_003 + index))
        if horizon_s is not None:
            actions = [a for a in actions if a.t <= horizon_s]
        actions.sort(key=Action.sort_key)
        self.actions: tuple[Action, ...] = tuple(actions)
        self._times = [a.t for a in self.actions]

    def __iter__(self) -> Iterator[Action]:
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def between(self, t0: float, t1: float) -> list[Action]:
        """Actions with ``t0 <= t < t1``, in order."""
        lo = bisect.bisect_left(self._times, t0)
        hi = bisect.bisect_left(self._times, t1)
        return list(self.actions[lo:hi])

    def heal_times(self) -> dict[int, float]:
        """Per fault index, when its last disruption ends."""
        out: dict[int, float] = {}
        for a in self.actions:
            if a.heals:
                out[a.fault] = max(out.get(a.fault, 0.0), a.t)
        return out

    # -- expansion -----------------------------------------------------------------

    def _region(self, index: int, region: str) -> str:
        if region not in self._regions:
            raise ConfigError(
                f"region {region!r} is not in the fleet (regions: {', '.join(self._regions)})",
                source=self._source,
                field=f"faults[{index}].region",
            )
        return region

    def _select(self, index: int, sel: DeviceSelector, rng: random.Random) -> list[DeviceRef]:
        pool = [
            d
            for d in self._devices
            if (sel.region is None or d.region == sel.region)
            and (sel.profile is None or d.profile == sel.profile)
        ]
        if not pool:
            raise ConfigError(
                "no device of the fleet matches",
                source=self._source,
                field=f"faults[{index}].devices",
            )
        if sel.count is not None:
            n = min(sel.count, len(pool))
        else:
            assert sel.fraction is not None
            n = max(1, round(sel.fraction * len(pool)))
        return sorted(rng.sample(pool, n), key=lambda d: d.device_id)

    def _expand(self, index: int, fault: Fault, rng: random.Random) -> list[Action]:
        end = fault.at + fault.duration
        match fault:
            case PartitionRegionFault():
                r = self._region(index, fault.region)
                return [
                    Action(fault.at, "partition", index, region=r),
                    Action(end, "heal", index, region=r),
                ]
            case KillRelayFault():
                r = self._region(index, fault.region)
                return [
                    Action(fault.at, "kill_relay", index, region=r),
                    Action(end, "start_relay", index, region=r),
                ]
            case KillHubFault():
                return [Action(fault.at, "kill_hub", index), Action(end, "start_hub", index)]
            case KillBrokerFault():
                where = None if fault.region is None else self._region(index, fault.region)
                return [
                    Action(fault.at, "kill_broker", index, region=where),
                    Action(end, "start_broker", index, region=where),
                ]
            case ClockSkewFault():
                offset = round(fault.hours * 3_600_000)
                out: list[Action] = []
                for d in self._select(index, fault.devices, rng):
                    out.append(Action(fault.at, "skew_clock", index, d.region, d.device_id, offset))
                    out.append(Action(end, "unskew_clock", index, d.region, d.device_id))
                return out
            case FillDiskFault():
                out = []
                for d in self._select(index, fault.devices, rng):
                    out.append(Action(fault.at, "fill_disk", index, d.region, d.device_id))
                    out.append(Action(end, "free_disk", index, d.region, d.device_id))
                return out
            case GarbageFault():
                out = []
                step = 1.0 / fault.rate_per_s
                for d in self._select(index, fault.devices, rng):
                    t = fault.at + rng.random() * step
                    while t < end:
                        out.append(Action(t, "garbage", index, d.region, d.device_id))
                        t += step
                return out
            case FlapDevicesFault():
                return self._flaps(index, fault, rng)
        raise AssertionError(f"unhandled fault {fault!r}")  # pragma: no cover

    def _flaps(self, index: int, fault: FlapDevicesFault, rng: random.Random) -> list[Action]:
        out: list[Action] = []
        end = fault.at + fault.duration
        for d in self._select(index, fault.devices, rng):
            up_s, down_s = fault.up_s, fault.down_s
            if fault.use_profile and d.profile in self._means:
                up_s, down_s = self._means[d.profile]
            jitter = fault.jitter or fault.use_profile

            def draw(mean: float, jitter: bool = jitter) -> float:
                return rng.expovariate(1.0 / mean) if jitter else mean

            # Each device starts at a random point of its cycle, so they do not flap in step.
            t = fault.at + rng.random() * up_s
            for _ in range(_MAX_FLAPS_PER_DEVICE):
                if t >= end:
                    break
                back = min(t + draw(down_s), end)
                out.append(Action(t, "link_down", index, d.region, d.device_id))
                out.append(Action(back, "link_up", index, d.region, d.device_id))
                t = back + draw(up_s)
        return out
