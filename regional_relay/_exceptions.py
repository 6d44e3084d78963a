"""Exceptions raised by the regional relay.

::

    NovaCronError (sync._exceptions)
    ├── ConfigError                    bad relay config (file, field); CLI exit 2
    └── RelayError                     base of everything the relay raises
        ├── OutboxError                the durable outbox (path)
        │   ├── OutboxClosedError      used before open / after close, or writer stopped
        │   ├── OutboxFullError        items refused by the overflow policy (quota)
        │   └── OutboxWriteError       SQLite failed to apply or commit a write
        ├── PresenceError              a device state payload that is garbage (device, reason)
        └── AggregateError             a metric event that cannot be aggregated (reason)

Invalid configuration is always :class:`sync._exceptions.ConfigError`, never a
:class:`RelayError`. Other relay modules derive their errors from
:class:`RelayError`, here when several modules share them.
"""

from __future__ import annotations

from collections.abc import Sequence

from sync._exceptions import NovaCronError

__all__ = [
    "AggregateError",
    "OutboxClosedError",
    "OutboxError",
    "OutboxFullError",
    "OutboxWriteError",
    "PresenceError",
    "RelayError",
]


class RelayError(NovaCronError):
    """Base of every error the regional relay raises on purpose."""


class OutboxError(RelayError):
    """Base of every outbox error, and of misuse of its API.

    Attributes:
        path: the outbox file concerned (``""`` when not known).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class OutboxClosedError(OutboxError):
    """The outbox is not open, is closing, or its writer thread has stopped."""


class OutboxFullError(OutboxError):
    """Some items of an append were refused because the outbox is at its quota.

    The items that were *not* refused in the same call are stored and durable:
    :attr:`ids` says which. A refusal is backpressure, not a loss: the relay does
    not acknowledge refused items, so the agent keeps them and sends them again.

    Attributes:
        ids: one entry per appended item, in order: its outbox id if it was
            stored, ``None`` if it was refused.
        refused: indices (into the appended items) of the refused items.
        stored_bytes: outbox bytes (stored plus in flight) when refused.
        quota_bytes: the outbox quota.
        policy: the overflow policy that refused them.
    """

    def __init__(
        self,
        *,
        ids: Sequence[int | None],
        stored_bytes: int,
        quota_bytes: int,
        policy: str,
        path: str = "",
    ) -> None:
        self.ids = list(ids)
        self.refused = [i for i, v in enumerate(self.ids) if v is None]
        self.stored_bytes = stored_bytes
        self.quota_bytes = quota_bytes
        self.policy = policy
        super().__init__(
            f"outbox at quota ({stored_bytes}/{quota_bytes} bytes, policy {policy}): "
            f"{len(self.refused)} of {len(self.ids)} item(s) refused",
            path=path,
        )


class OutboxWriteError(OutboxError):
    """SQLite could not apply or commit a write (disk full, I/O error, bad input)."""


class PresenceError(RelayError):
    """A device state payload (``{"online": bool, "bd": int}``) that is garbage.

    Attributes:
        device: the device whose state topic carried it (``""`` when not known).
        reason: ``"decode"`` (not acceptable msgpack) or ``"shape"`` (wrong
            structure or types), for per-reason counters.
    """

    def __init__(self, message: str, *, reason: str, device: str = "") -> None:
        self.reason = reason
        self.device = device
        super().__init__(message)


class AggregateError(RelayError):
    """A metric event that cannot be aggregated.

    Attributes:
        reason: ``"decode"``, ``"shape"`` or ``"kind"``, for per-reason counters.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)
