"""Shared pydantic models: validation, immutability, JSON round trips."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sync.models import (
    DeviceFacts,
    HealthCheck,
    Override,
    Resources,
    RestartPolicy,
    WorkloadSpec,
    WorkloadStatus,
)

PODMAN: dict[str, Any] = {
    "name": "mqtt-bridge",
    "driver": "podman",
    "image": "docker.io/eclipse-mosquitto:2",
    "env": {"LOG_LEVEL": "info", "_X1": "y"},
    "resources": {"cpu_millis": 250, "memory_mb": 128},
    "restart": {"mode": "on-failure", "max_attempts": 3},
    "health": {"kind": "tcp", "port": 1883},
}


def test_workload_spec_valid_and_defaults() -> None:
    spec = WorkloadSpec.model_validate(PODMAN)
    assert spec.resources == Resources(cpu_millis=250, memory_mb=128)
    assert spec.restart.backoff_initial_s == 1.0
    assert spec.version == "1"
    proc = WorkloadSpec(name="p", driver="process", command=("sleep", "1"))
    assert proc.restart == RestartPolicy()
    assert WorkloadSpec(name="vm", driver="libvirt").health is None
    assert WorkloadSpec(name="s", driver="sim").command == ()


def test_workload_spec_is_frozen() -> None:
    spec = WorkloadSpec.model_validate(PODMAN)
    with pytest.raises(ValidationError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.resources.cpu_millis = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"surprise": 1}, "Extra inputs"),
        ({"resources": {"cpu_millis": 1, "gpu": 1}}, "Extra inputs"),
        ({"health": {"kind": "tcp", "port": 1, "extra": True}}, "Extra inputs"),
        ({"driver": "docker"}, "driver"),
        ({"image": None}, "podman workloads need an image"),
        ({"image": ""}, "podman workloads need an image"),
        ({"name": "Bad_Name"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "-x"}, "name"),
        ({"name": "a" * 64}, "name"),
        ({"env": {"1BAD": "x"}}, "environment variable"),
        ({"env": {"A-B": "x"}}, "environment variable"),
        ({"resources": {"cpu_millis": 0}}, "cpu_millis"),
        ({"restart": {"mode": "sometimes"}}, "mode"),
        ({"health": {"kind": "tcp"}}, "needs a port"),
        ({"health": {"kind": "http", "port": 70000}}, "port"),
        ({"health": {"kind": "exec"}}, "needs a command"),
        ({"version": ""}, "version"),
    ],
    ids=repr,
)
def test_workload_spec_rejects(patch: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        WorkloadSpec.model_validate(PODMAN | patch)


def test_process_driver_needs_command() -> None:
    with pytest.raises(ValidationError, match="process workloads need a command"):
        WorkloadSpec(name="p", driver="process")


def test_workload_spec_json_round_trip() -> None:
    spec = WorkloadSpec.model_validate(PODMAN)
    again = WorkloadSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert hash(again.resources) == hash(spec.resources)


def test_health_check_exec() -> None:
    hc = HealthCheck(kind="exec", command=("true",))
    assert hc.port is None
    assert HealthCheck.model_validate_json(hc.model_dump_json()) == hc


def test_device_facts() -> None:
    facts = DeviceFacts(
        hostname="gw-17",
        arch="aarch64",
        cpu_cores=4,
        memory_mb=2048,
        storage_mb=0,
        drivers=("podman", "process"),
    )
    assert DeviceFacts.model_validate_json(facts.model_dump_json()) == facts
    assert DeviceFacts.model_validate(facts.model_dump(mode="json")) == facts
    with pytest.raises(ValidationError):
        facts.gpu = True  # type: ignore[misc]
    base = facts.model_dump()
    for patch in (
        {"arch": "sparc"},
        {"cpu_cores": 0},
        {"memory_mb": 0},
        {"storage_mb": -1},
        {"drivers": ("docker",)},
        {"hostname": "h" * 254},
        {"serial": "x"},
    ):
        with pytest.raises(ValidationError):
            DeviceFacts.model_validate(base | patch)


def test_status_and_override_round_trip() -> None:
    status = WorkloadStatus(name="w", version="3", phase="backoff", restarts=2, reason="exit 1")
    assert WorkloadStatus.model_validate_json(status.model_dump_json()) == status
    override = Override(name="w", action="stop", at_ms=5)
    assert Override.model_validate_json(override.model_dump_json()) == override
    with pytest.raises(ValidationError):
        WorkloadStatus(name="w", version="1", phase="sleeping")
    with pytest.raises(ValidationError):
        Override(name="w", action="pause")


def test_models_survive_strict_msgpack() -> None:
    from sync.envelope import packb, unpackb_strict

    spec = WorkloadSpec.model_validate(PODMAN)
    assert WorkloadSpec.model_validate(unpackb_strict(packb(spec.model_dump(mode="json")))) == spec
