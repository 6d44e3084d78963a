"""Shared pydantic v2 models carried by the protocol and stored by every tier.

All models are frozen and reject unknown fields, so a typo in a manifest or a
malicious extra key in a message is an error, never silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NAME_RE = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Name = Annotated[str, Field(pattern=_NAME_RE, description="DNS-label-like name")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Resources(_Frozen):
    """CPU and memory a workload reserves on its device."""

    cpu_millis: int = Field(default=100, ge=1, le=1_024_000)
    memory_mb: int = Field(default=64, ge=1, le=4_194_304)


class RestartPolicy(_Frozen):
    """When the supervisor restarts a workload that exited, and how often."""

    mode: Literal["always", "on-failure", "never"] = "always"
    max_attempts: int = Field(default=5, ge=1, le=10_000)
    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=60.0, gt=0, le=86_400)


class HealthCheck(_Frozen):
    """How the supervisor decides that a running workload is healthy."""

    kind: Literal["exec", "tcp", "http"]
    command: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str = "/"
    interval_s: float = Field(default=10.0, gt=0, le=3600)
    timeout_s: float = Field(default=2.0, gt=0, le=600)
    failure_threshold: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _check_kind(self) -> HealthCheck:
        if self.kind == "exec" and not self.command:
            raise ValueError("exec health check needs a command")
        if self.kind in ("tcp", "http") and self.port is None:
            raise ValueError(f"{self.kind} health check needs a port")
        return self


class WorkloadSpec(_Frozen):
    """Desired state of one workload on one device."""

    name: Name
    driver: Literal["process", "podman", "libvirt", "sim"]
    version: str = Field(default="1", min_length=1, max_length=64)
    image: str | None = Field(default=None, max_length=512)
    command: tuple[str, ...] = ()
    domain_xml: str | None = Field(default=None, max_length=65_536)
    disk_image: str | None = Field(default=None, max_length=4096)
    working_dir: str | None = Field(default=None, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    health: HealthCheck | None = None

    @model_validator(mode="after")
    def _check_driver(self) -> WorkloadSpec:
        if self.driver == "process" and not self.command:
            raise ValueError("process workloads need a command")
        if self.driver == "podman" and not self.image:
            raise ValueError("podman workloads need an image")
        for key in self.env:
            if not _ENV_KEY_RE.match(key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return self


class DeviceFacts(_Frozen):
    """What a device reports about itself at enrollment and in HELLO."""

    hostname: str = Field(max_length=253)
    arch: Literal["x86_64", "aarch64", "armv7l", "riscv64", "mips"]
    cpu_cores: int = Field(ge=1, le=1024)
    memory_mb: int = Field(ge=1)
    storage_mb: int = Field(ge=0)
    os: str = Field(default="linux", max_length=128)
    agent_version: str = Field(default="0.1.0", max_length=64)
    drivers: tuple[Literal["process", "podman", "libvirt", "sim"], ...] = ()
    gpu: bool = False


WorkloadPhase = Literal[
    "pending", "starting", "running", "stopped", "exited", "backoff", "failed", "rejected"
]


class WorkloadStatus(_Frozen):
    """Reported state of one workload, written by the device."""

    name: Name
    version: str
    phase: WorkloadPhase
    healthy: bool | None = None
    restarts: int = Field(default=0, ge=0)
    reason: str = Field(default="", max_length=1024)
    since_ms: int = Field(default=0, ge=0)


class Override(_Frozen):
    """A local operator override made on the device, kept until cleared."""

    name: Name
    action: Literal["stop", "start"]
    by: str = Field(default="local", max_length=128)
    at_ms: int = Field(default=0, ge=0)
