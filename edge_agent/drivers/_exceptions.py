"""Errors raised by the workload drivers.

::

    AgentError (edge_agent._exceptions)
    └── DriverError                    base of every driver error (driver, workload)
        ├── DriverUnavailableError     runtime missing or unreachable (socket, URI, module)
        ├── WorkloadNotFoundError      no workload of that name owned by this agent
        ├── WorkloadConflictError      the name is held by something this agent does not own
        └── WorkloadStartError         create or start failed (bad command, runtime refusal)
            └── ImageNotFoundError     the image is not in local storage (no pulls)

Third-party errors (podman-py, libvirt-python, ``OSError``) are translated into these
at the driver boundary with ``raise ... from exc``; callers never see runtime types.
"""

from __future__ import annotations

from edge_agent._exceptions import AgentError


class DriverError(AgentError):
    """Base of every error a workload driver raises.

    Attributes:
        driver: name of the driver (``"process"``, ``"podman"``, ``"libvirt"``).
        workload: name of the workload concerned, or ``""``.
        reason: the message without the driver/workload prefix (what a status shows).
    """

    def __init__(self, message: str, *, driver: str = "", workload: str = "") -> None:
        self.reason = message
        self.driver = driver
        self.workload = workload
        parts = [p for p in (driver, workload) if p]
        prefix = "/".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class DriverUnavailableError(DriverError):
    """The runtime behind the driver is missing or cannot be reached."""


class WorkloadNotFoundError(DriverError):
    """No workload of that name is owned by this agent."""


class WorkloadConflictError(DriverError):
    """A container or domain of that name exists but is not owned by this agent.

    The driver leaves it alone: it never stops, replaces or removes it.
    """


class WorkloadStartError(DriverError):
    """Creating or starting the workload failed; ``inspect`` reports it as failed."""


class ImageNotFoundError(WorkloadStartError):
    """The container image is not in local storage (drivers never pull).

    Attributes:
        image: the image reference that was asked for.
    """

    def __init__(self, image: str, *, driver: str = "", workload: str = "") -> None:
        self.image = image
        super().__init__(f"image not found: {image}", driver=driver, workload=workload)
