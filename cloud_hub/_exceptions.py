"""Exceptions raised by the cloud hub.

::

    NovaCronError (sync._exceptions)
    └── HubError                       base of everything the hub raises
        ├── AuditError                 the audit log cannot be opened / written (path)
        │   └── AuditNotFoundError     no audit log at the path given (path)
        ├── AuthError                  API tokens: an invalid request to the token store
        │   └── TokenNotFoundError     no token with that id (token_id)
        ├── PlacementError             placement input that cannot be placed (deployment)
        └── RolloutError               a rollout (deployment)
            ├── RolloutStateError      command not allowed in the phase (command, phase)
            └── RolloutDecodeError     a persisted rollout that cannot be restored

Invalid configuration is always :class:`sync._exceptions.ConfigError`, never a
:class:`HubError`. Other hub modules derive their errors from :class:`HubError`,
here when several modules share them.
"""

from __future__ import annotations

from sync._exceptions import NovaCronError

__all__ = [
    "AuditError",
    "AuditNotFoundError",
    "AuthError",
    "HubError",
    "PlacementError",
    "RolloutDecodeError",
    "RolloutError",
    "RolloutStateError",
    "TokenNotFoundError",
]


class HubError(NovaCronError):
    """Base of every error the cloud hub raises on purpose."""


class RolloutError(HubError):
    """Base of the rollout engine's errors.

    Attributes:
        deployment: the deployment the rollout belongs to (``""`` when not known).
    """

    def __init__(self, message: str, *, deployment: str = "") -> None:
        self.deployment = deployment
        super().__init__(f"rollout {deployment}: {message}" if deployment else message)


class RolloutStateError(RolloutError):
    """An operator command that the rollout's phase does not allow (an API 409).

    Attributes:
        command: ``"pause"``, ``"resume"``, ``"undo"`` or ``"start"``.
        phase: the rollout's phase when the command came.
    """

    def __init__(self, message: str, *, command: str, phase: str, deployment: str = "") -> None:
        self.command = command
        self.phase = phase
        super().__init__(message, deployment=deployment)


class RolloutDecodeError(RolloutError):
    """A persisted rollout (:meth:`cloud_hub.rollout.Rollout.from_dict`) is malformed.

    Attributes:
        field: the offending key, when known.
    """

    def __init__(self, message: str, *, field: str = "", deployment: str = "") -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message, deployment=deployment)


class AuditError(HubError):
    """The audit log cannot be opened, read or written, or an entry is invalid.

    A *tampered* log is not an error: :func:`cloud_hub.audit.verify` reports it in
    a :class:`~cloud_hub.audit.VerifyReport`.

    Attributes:
        path: the audit database file (``""`` when not known).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class AuditNotFoundError(AuditError):
    """There is no audit log at the path given (``novacron audit verify`` exits 2)."""


class AuthError(HubError):
    """An invalid request to the API token store (bad role, name, device id or ttl).

    Failed *authentication* is not an error: ``authenticate`` returns ``None``.
    """


class TokenNotFoundError(AuthError):
    """No API token has this id (an API 404).

    Attributes:
        token_id: the id asked for.
    """

    def __init__(self, token_id: str) -> None:
        self.token_id = token_id
        super().__init__(f"no API token with id {token_id!r}")


class PlacementError(HubError):
    """Placement or rebalance input that is inconsistent (a bug in the caller).

    Raised for a device id given twice, a rebalance of an ``each`` deployment, a
    replica slot given twice, or a generation that does not move forward.

    Attributes:
        deployment: the deployment being placed (``""`` when not known).
    """

    def __init__(self, message: str, *, deployment: str = "") -> None:
        self.deployment = deployment
        super().__init__(f"placement of {deployment}: {message}" if deployment else message)
