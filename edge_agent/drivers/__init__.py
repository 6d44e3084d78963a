"""Workload drivers: the runtimes the edge agent starts workloads on.

One protocol (:class:`WorkloadDriver`) and its implementations: supervised
subprocesses (:class:`ProcessDriver`), Podman containers over the API socket
(:class:`PodmanDriver`), libvirt domains (:class:`LibvirtDriver`, libvirt-python
imported lazily) and an in-memory model for the simulator and unit tests
(:class:`SimDriver`). The Podman, libvirt and sim driver modules themselves
load on first use of their names. See ``base.py`` for the contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_agent.drivers._exceptions import (
    DriverError,
    DriverUnavailableError,
    ImageNotFoundError,
    WorkloadConflictError,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from edge_agent.drivers.base import (
    LIMITS_LABEL,
    OWNER_LABEL,
    VERSION_LABEL,
    WORKLOAD_LABEL,
    ActualPhase,
    ActualState,
    BlockingRunner,
    DriverCapability,
    WorkloadDriver,
    WorkloadHandle,
)
from edge_agent.drivers.process import ProcessDriver

__all__ = [
    "ActualPhase",
    "ActualState",
    "BlockingRunner",
    "DriverCapability",
    "DriverError",
    "DriverUnavailableError",
    "ImageNotFoundError",
    "LIMITS_LABEL",
    "LibvirtDriver",
    "METADATA_NS",
    "OWNER_LABEL",
    "PodmanDriver",
    "ProcessDriver",
    "SimDriver",
    "VERSION_LABEL",
    "WORKLOAD_LABEL",
    "WorkloadConflictError",
    "WorkloadDriver",
    "WorkloadHandle",
    "WorkloadNotFoundError",
    "WorkloadStartError",
]

if TYPE_CHECKING:
    from edge_agent.drivers.libvirt import METADATA_NS, LibvirtDriver
    from edge_agent.drivers.podman import PodmanDriver
    from edge_agent.drivers.sim import SimDriver


def __getattr__(name: str) -> Any:
    # podman-py (and requests under it) cost ~10 MB: load them only when a
    # Podman driver is actually asked for. The libvirt driver module (and the
    # XML parser it uses) costs ~1.5 MB that an agent without VMs never needs.
    if name == "PodmanDriver":
        from edge_agent.drivers.podman import PodmanDriver  # noqa: PLC0415

        return PodmanDriver
    if name == "SimDriver":  # the simulator's and the tests' driver, not a gateway's
        from edge_agent.drivers.sim import SimDriver  # noqa: PLC0415

        return SimDriver
    if name in ("LibvirtDriver", "METADATA_NS"):
        from edge_agent.drivers import libvirt  # noqa: PLC0415

        return getattr(libvirt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
