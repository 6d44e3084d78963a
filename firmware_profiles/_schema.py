"""Pydantic schema of a firmware profile: one class of gateway hardware.

A profile says what a device class can run (architecture, cores, memory, storage,
GPU, workload drivers), how much the agent may keep on it (journal quota, batch
size, telemetry cadence), and how its uplink behaves, which the simulator uses to
model the network. The hub's placement filters on the same figures.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Arch = Literal["x86_64", "aarch64", "armv7l", "riscv64", "mips"]
"""CPU architectures a profile may declare (the same set as ``DeviceFacts.arch``)."""

DriverName = Literal["process", "podman", "libvirt", "sim"]
"""Workload drivers: ``sim`` models workloads in the simulator and needs no hardware."""

LinkKind = Literal["ethernet", "wifi", "lte", "satellite"]
"""Physical kind of a device's uplink."""

PROFILE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
"""What a profile name looks like: lower-case, digits, ``.``, ``_``, ``-``; 1-63 long."""

ProfileName = Annotated[
    str,
    Field(
        pattern=PROFILE_NAME_PATTERN,
        description="DNS-label-like name, equal to the file name stem",
    ),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OutageWindow(_Frozen):
    """One scheduled outage, in seconds from the start of the schedule."""

    start_s: float = Field(ge=0, description="offset of the outage from the schedule start")
    duration_s: float = Field(gt=0, description="how long the link stays down")


class OutagePattern(_Frozen):
    """When the link is down: random outages, a schedule, both, or neither.

    Random outages alternate exponentially distributed up and down periods with the
    given means. Scheduled outages repeat every ``period_s`` when it is set, and
    happen once otherwise. With neither, the link never goes down by itself.
    """

    mean_up_s: float | None = Field(default=None, gt=0, description="mean time between outages")
    mean_down_s: float | None = Field(default=None, gt=0, description="mean outage length")
    scheduled: tuple[OutageWindow, ...] = Field(default=(), description="fixed outage windows")
    period_s: float | None = Field(default=None, gt=0, description="repeat period of schedule")

    @model_validator(mode="after")
    def _check(self) -> OutagePattern:
        if (self.mean_up_s is None) != (self.mean_down_s is None):
            raise ValueError("mean_up_s and mean_down_s must be given together")
        previous_end = 0.0
        for window in self.scheduled:
            if window.start_s < previous_end:
                raise ValueError("scheduled outages must be sorted and must not overlap")
            previous_end = window.start_s + window.duration_s
        if self.period_s is not None:
            if not self.scheduled:
                raise ValueError("period_s needs scheduled outages to repeat")
            if previous_end > self.period_s:
                raise ValueError("scheduled outages must fit within period_s")
        return self

    @property
    def has_outages(self) -> bool:
        """Whether the link ever goes down by itself."""
        return self.mean_up_s is not None or bool(self.scheduled)


class LinkModel(_Frozen):
    """The uplink of a device class, as the simulator models it."""

    kind: LinkKind
    bandwidth_kbps: int = Field(gt=0, le=100_000_000, description="usable uplink bandwidth")
    latency_ms: float = Field(ge=0, le=60_000, description="one-way latency")
    jitter_ms: float = Field(default=0.0, ge=0, le=60_000, description="latency std deviation")
    loss_pct: float = Field(default=0.0, ge=0, le=100, description="packet loss in percent")
    outages: OutagePattern = Field(default_factory=OutagePattern)

    def summary(self) -> str:
        """One short human line, e.g. ``"lte 10 Mbit/s 60 ms"``."""
        if self.bandwidth_kbps >= 1000 and self.bandwidth_kbps % 1000 == 0:
            rate = f"{self.bandwidth_kbps // 1000} Mbit/s"
        else:
            rate = f"{self.bandwidth_kbps} kbit/s"
        return f"{self.kind} {rate} {self.latency_ms:g} ms"


class FirmwareProfile(_Frozen):
    """A device class: hardware, available drivers, agent quotas and uplink model."""

    name: ProfileName
    description: str = Field(min_length=1, max_length=500)
    arch: Arch
    cpu_cores: int = Field(ge=1, le=1024)
    memory_mb: int = Field(ge=16, le=4_194_304)
    storage_mb: int = Field(ge=1, le=1_073_741_824)
    gpu: bool = False
    drivers: tuple[DriverName, ...] = Field(min_length=1)
    journal_quota_mb: int = Field(ge=1, description="cap on the agent's journal file")
    telemetry_interval_s: float = Field(gt=0, le=86_400)
    sync_batch_size: int = Field(ge=1, le=100_000, description="max items in one sync batch")
    link: LinkModel

    @model_validator(mode="after")
    def _check(self) -> FirmwareProfile:
        if len(set(self.drivers)) != len(self.drivers):
            raise ValueError("drivers must not repeat")
        if self.journal_quota_mb >= self.storage_mb:
            raise ValueError(
                f"journal_quota_mb ({self.journal_quota_mb}) must be below "
                f"storage_mb ({self.storage_mb})"
            )
        return self
