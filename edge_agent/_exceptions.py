"""Exceptions raised by the edge agent.

::

    NovaCronError (sync._exceptions)
    ├── ConfigError                    bad agent config / firmware profile (file, field)
    └── AgentError                     base of everything the edge agent raises
        └── EnrollError                enrollment failed (tree in edge_agent.enroll)
            ├── NotEnrolledError       no enrollment / hub key in the data dir
            └── EnrollmentCorruptError a stored enrollment or key file is invalid

Invalid configuration is always reported as :class:`sync._exceptions.ConfigError`
(the CLI maps it to exit code 2), never as an :class:`AgentError`. Modules of the
agent derive their own errors from :class:`AgentError` next to where they are raised
or here, when several modules share them.
"""

from __future__ import annotations

from pathlib import Path

from sync._exceptions import NovaCronError


class AgentError(NovaCronError):
    """Base of every error the edge agent raises on purpose."""


# The two enrollment errors the running agent can meet (reading hub.pub and
# relays.pub) live here rather than in edge_agent._enroll_wire, so the agent never
# imports the enrollment code; the rest of the tree is in _enroll_wire.


class EnrollError(AgentError):
    """Base of every enrollment failure."""


class NotEnrolledError(EnrollError):
    """No enrollment is stored in the data directory.

    Attributes:
        path: the missing ``enrollment.json``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"this device is not enrolled ({path} not found); run "
            "`novacron agent enroll --hub URL --token T` first"
        )


class EnrollmentCorruptError(EnrollError):
    """A stored enrollment file is unreadable or invalid.

    Attributes:
        path: the file.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")
