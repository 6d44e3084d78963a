"""The hub's fleet store: the interface, its records and its errors.

Everything the hub keeps beyond memory goes through :class:`Store`: devices,
enrollment tokens, deployments with their version history, rollouts, placements,
the CRDT scopes it replicates and the device event streams it ingests.

The interface is async and speaks in plain records so that a PostgreSQL
implementation can follow the embedded SQLite one (``cloud_hub._sqlite_store``)
without any caller changing:

- no SQL, connections, rowids or SQLite types cross it;
- pagination is by opaque cursor strings, never by offset; a cursor that was
  not handed out for the same listing and filters raises :class:`CursorError`,
  a page size outside ``1..MAX_PAGE_LIMIT`` raises :class:`ValueError` (a
  caller's bug: validate query parameters before calling);
- atomic operations that need a read and a write together (redeeming an
  enrollment token, committing an ingested batch) are single methods, so each
  implementation runs them in one transaction of its own;
- times are integer milliseconds since the epoch, passed in by the caller.

:func:`open_store` picks the implementation from a URL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from cloud_hub._exceptions import HubError
from sync._exceptions import ConfigError

__all__ = [
    "DEFAULT_PAGE_LIMIT",
    "MAX_PAGE_LIMIT",
    "AssignmentRecord",
    "ConflictError",
    "CursorError",
    "DeploymentRecord",
    "DeviceQuery",
    "DeviceRecord",
    "DeviceStatus",
    "DeviceStatusUpdate",
    "EnrollTokenRecord",
    "EventRecord",
    "IngestCommit",
    "NotFoundError",
    "Page",
    "RolloutRecord",
    "Store",
    "StoreError",
    "TokenRefusedError",
    "TokenRefusal",
    "open_store",
]

DEFAULT_PAGE_LIMIT: Final = 100
MAX_PAGE_LIMIT: Final = 1000

DeviceStatus = Literal["unknown", "online", "offline", "unreachable"]
"""``unknown`` until the hub has heard of the device; then what
:class:`cloud_hub.health.HealthTracker` says."""

TokenRefusal = Literal["unknown", "revoked", "expired", "spent", "duplicate_key"]

T = TypeVar("T")


# -- errors ---------------------------------------------------------------------------


class StoreError(HubError):
    """The store failed or refused an operation."""


class NotFoundError(StoreError):
    """No record with that key.

    Attributes:
        kind: what was looked for (``device``, ``deployment``, ...).
        key: its key.
    """

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"no {kind} {key!r}")
        self.kind = kind
        self.key = key


class ConflictError(StoreError):
    """A record with that key (or that unique value) exists already.

    Attributes:
        kind: the record kind.
        key: the conflicting key or value.
    """

    def __init__(self, kind: str, key: str, message: str | None = None) -> None:
        super().__init__(message or f"{kind} {key!r} exists already")
        self.kind = kind
        self.key = key


class CursorError(StoreError):
    """A pagination cursor that this store did not hand out (or for another query)."""


class TokenRefusedError(StoreError):
    """An enrollment token cannot be redeemed.

    Attributes:
        reason: why: unknown, revoked, expired, spent, or duplicate_key (the
            device's public key is enrolled already; the token is not used up).
    """

    def __init__(self, reason: TokenRefusal, message: str) -> None:
        super().__init__(message)
        self.reason: TokenRefusal = reason


# -- records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """An enrolled device.

    Attributes:
        id: the device id (an MQTT-safe id, see :func:`sync.topics.validate_id`).
        region: its region.
        profile: its firmware profile name.
        public_key: its Ed25519 public key, base64 of the 32 raw bytes; unique.
        arch: CPU architecture from its facts.
        labels: operator labels (from the token, then edited).
        facts: what the device reported at enrollment (:class:`sync.models.DeviceFacts`
            as JSON).
        enrolled_at_ms: when it enrolled.
        token_id: the enrollment token used, if any.
        mqtt_username: its broker account.
        status: its last known health state.
        last_seen_ms: when the hub last heard of it, if ever.
    """

    id: str
    region: str
    profile: str
    public_key: str
    arch: str
    labels: Mapping[str, str] = field(default_factory=dict)
    facts: Mapping[str, Any] = field(default_factory=dict)
    enrolled_at_ms: int = 0
    token_id: str | None = None
    mqtt_username: str = ""
    status: DeviceStatus = "unknown"
    last_seen_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """Filters and page of a device listing; every filter given must match.

    Attributes:
        labels: each label must be present with that value.
        region: the device's region.
        profile: its firmware profile.
        status: its health state.
        cursor: from a previous page's ``next_cursor``; None for the first page.
        limit: page size, 1..MAX_PAGE_LIMIT.
    """

    labels: Mapping[str, str] = field(default_factory=dict)
    region: str | None = None
    profile: str | None = None
    status: DeviceStatus | None = None
    cursor: str | None = None
    limit: int = DEFAULT_PAGE_LIMIT


@dataclass(frozen=True, slots=True)
class DeviceStatusUpdate:
    """A health change to persist (see :meth:`Store.update_device_status`)."""

    device_id: str
    status: DeviceStatus
    last_seen_ms: int | None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing, in a stable order (ids ascending).

    Attributes:
        items: the records.
        next_cursor: pass it back for the next page; None on the last page.
    """

    items: tuple[T, ...]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class EnrollTokenRecord:
    """An enrollment token (its secret is stored hashed only).

    Attributes:
        id: public id, printed and used in the audit log.
        secret_hash: hex SHA-256 of the secret part.
        name: operator's name for it.
        region: the region devices enrolled with it join.
        labels: labels they get.
        max_uses: how many devices may enroll with it.
        uses: how many did.
        expires_at_ms: after this it is refused; None for never.
        created_at_ms: when it was made.
        created_by: the actor that made it.
        revoked_at_ms: when it was revoked, if it was.
    """

    id: str
    secret_hash: str
    name: str
    region: str
    labels: Mapping[str, str] = field(default_factory=dict)
    max_uses: int = 1
    uses: int = 0
    expires_at_ms: int | None = None
    created_at_ms: int = 0
    created_by: str = ""
    revoked_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    """One version of a deployment manifest.

    Attributes:
        name: the deployment name (``metadata.name``).
        version: 1, 2, ... per name; every apply of a changed manifest adds one.
        document: the manifest as JSON (:meth:`cloud_hub.manifests.Deployment.to_document`).
        created_at_ms: when this version was applied.
        actor: who applied it.
        deleted: the deployment was deleted at this version (its document is the
            last one applied).
    """

    name: str
    version: int
    document: Mapping[str, Any]
    created_at_ms: int
    actor: str
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """The persisted state of a deployment's current rollout.

    Attributes:
        deployment: the deployment name (one current rollout per deployment).
        version: the deployment version it rolls out.
        phase: the rollout phase (for filters, a copy of ``state["phase"]``).
        state: :meth:`cloud_hub.rollout.Rollout.to_dict`.
        updated_at_ms: when it was last saved.
    """

    deployment: str
    version: int
    phase: str
    state: Mapping[str, Any]
    updated_at_ms: int


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    """A device a deployment is placed on.

    Attributes:
        deployment: the deployment name.
        device_id: the device.
        assigned_at_ms: when placement put it there.
    """

    deployment: str
    device_id: str
    assigned_at_ms: int


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event of a device stream, as ingested.

    Attributes:
        device_id: the device.
        stream: the stream name (``events``, ``metrics``, ...).
        seq: its sequence number in the stream (from 1, no gaps once ingested
            in order).
        ingested_at_ms: when the hub stored it.
        body: the event as JSON-ready data.
    """

    device_id: str
    stream: str
    seq: int
    ingested_at_ms: int
    body: Any


@dataclass(frozen=True, slots=True)
class IngestCommit:
    """What one ingested relay batch changed, committed atomically.

    Attributes:
        scopes: full CRDT scope state to store, by scope name
            (msgpack of :meth:`sync.crdt.LwwMap.to_wire`, opaque to the store).
        events: new events, each at most once per (device, stream, seq); a
            duplicate is ignored.
        cursors: the next seq wanted per (device, stream), stored with the events
            they guard.
        seen: last-seen times to raise (never lowered), per device.
    """

    scopes: Mapping[str, bytes] = field(default_factory=dict)
    events: Sequence[EventRecord] = ()
    cursors: Mapping[tuple[str, str], int] = field(default_factory=dict)
    seen: Mapping[str, int] = field(default_factory=dict)


# -- the interface ----------------------------------------------------------------------


class Store(Protocol):
    """The hub's persistent state. Every method is safe to call concurrently."""

    async def aclose(self) -> None:
        """Release connections and threads; idempotent."""

    # devices

    async def get_device(self, device_id: str) -> DeviceRecord:
        """The device. Raises :class:`NotFoundError`."""

    async def list_devices(self, query: DeviceQuery) -> Page[DeviceRecord]:
        """Devices matching ``query``, ids ascending. Raises :class:`CursorError`."""

    async def count_devices(self) -> dict[DeviceStatus, int]:
        """Devices per status (every status present, zero when none)."""

    async def set_device_labels(self, device_id: str, labels: Mapping[str, str]) -> DeviceRecord:
        """Replace a device's labels. Raises :class:`NotFoundError`."""

    async def update_device_status(self, updates: Sequence[DeviceStatusUpdate]) -> None:
        """Persist health changes in one transaction; unknown ids are ignored."""

    async def delete_device(self, device_id: str) -> DeviceRecord:
        """Remove a device (decommission). Raises :class:`NotFoundError`."""

    # enrollment tokens

    async def create_enroll_token(self, token: EnrollTokenRecord) -> EnrollTokenRecord:
        """Store a new token. Raises :class:`ConflictError` on a duplicate id."""

    async def get_enroll_token(self, token_id: str) -> EnrollTokenRecord:
        """The token. Raises :class:`NotFoundError`."""

    async def list_enroll_tokens(
        self, *, cursor: str | None = None, limit: int = DEFAULT_PAGE_LIMIT
    ) -> Page[EnrollTokenRecord]:
        """Tokens, ids ascending."""

    async def revoke_enroll_token(self, token_id: str, now_ms: int) -> EnrollTokenRecord:
        """Revoke (idempotent: the first revocation time is kept). Raises NotFoundError."""

    async def redeem_enroll_token(
        self,
        token_id: str,
        secret_hash: str,
        now_ms: int,
        make_device: Callable[[EnrollTokenRecord], DeviceRecord],
    ) -> DeviceRecord:
        """Atomically check a token, use it once and add the device it admits.

        ``make_device`` builds the device from the token (its region and labels);
        it runs inside the transaction and must not do I/O.

        Raises:
            TokenRefusedError: unknown id or wrong secret (both ``unknown``, so a
                caller cannot probe ids), revoked, expired, spent, or the public key
                or device id is enrolled already (``duplicate_key``; the token is
                then not used up). Nothing changes.
        """

    # deployments, rollouts, placements

    async def put_deployment(
        self, name: str, document: Mapping[str, Any], actor: str, now_ms: int
    ) -> tuple[DeploymentRecord, bool]:
        """Add a version when ``document`` differs from the latest (or the
        deployment was deleted); otherwise return the latest unchanged.

        Returns:
            The latest record and whether it is new.
        """

    async def get_deployment(self, name: str, version: int | None = None) -> DeploymentRecord:
        """The latest (or a given) version. Raises :class:`NotFoundError`."""

    async def list_deployments(
        self,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_LIMIT,
        include_deleted: bool = False,
    ) -> Page[DeploymentRecord]:
        """Latest version of each deployment, names ascending."""

    async def deployment_history(self, name: str) -> list[DeploymentRecord]:
        """Every version, oldest first. Raises :class:`NotFoundError`."""

    async def delete_deployment(self, name: str, actor: str, now_ms: int) -> DeploymentRecord:
        """Add a deleted version. Raises :class:`NotFoundError`."""

    async def save_rollout(self, rollout: RolloutRecord) -> None:
        """Insert or replace the deployment's current rollout."""

    async def get_rollout(self, deployment: str) -> RolloutRecord:
        """Raises :class:`NotFoundError`."""

    async def list_rollouts(
        self,
        *,
        phase: str | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_LIMIT,
    ) -> Page[RolloutRecord]:
        """Current rollouts, deployment names ascending."""

    async def set_assignments(
        self, deployment: str, device_ids: Sequence[str], now_ms: int
    ) -> list[AssignmentRecord]:
        """Replace a deployment's placement (devices kept keep their time)."""

    async def list_assignments(
        self, *, deployment: str | None = None, device_id: str | None = None
    ) -> list[AssignmentRecord]:
        """Placements, by deployment then device."""

    # replicated state and events

    async def load_scopes(self) -> dict[str, bytes]:
        """Every stored scope state (see :attr:`IngestCommit.scopes`)."""

    async def get_scope(self, scope: str) -> bytes | None:
        """One stored scope state, or None when the store has none."""

    async def save_scopes(self, scopes: Mapping[str, bytes]) -> None:
        """Store scope states (the hub's own writes), in one transaction."""

    async def load_cursors(self) -> dict[tuple[str, str], int]:
        """The next seq wanted per (device, stream)."""

    async def commit_ingest(self, commit: IngestCommit) -> None:
        """Apply one ingested batch in one transaction (see :class:`IngestCommit`)."""

    async def list_events(
        self,
        device_id: str,
        *,
        stream: str | None = None,
        after_seq: int = 0,
        limit: int = DEFAULT_PAGE_LIMIT,
    ) -> list[EventRecord]:
        """A device's stored events, (stream, seq) ascending. The store keeps a
        bounded number per stream (oldest pruned first, counted)."""


def open_store(url: str | Path, **options: Any) -> Store:
    """Open the store a URL names.

    ``sqlite:///abs/path.db``, ``sqlite:relative.db`` or a plain path open the
    embedded SQLite store; ``postgresql://`` is reserved for the implementation
    to come and is refused with a clear error.

    Raises:
        sync._exceptions.ConfigError: an unsupported URL scheme.
        StoreError: the database cannot be opened.
    """
    from cloud_hub._sqlite_store import open_sqlite_store  # noqa: PLC0415 - it imports this module

    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "hub store: PostgreSQL is not implemented yet; use a sqlite path",
            field="store",
        )
    if text.startswith("sqlite:///"):
        text = text[len("sqlite://") :]
    elif text.startswith("sqlite:"):
        text = text[len("sqlite:") :]
    elif "://" in text:
        raise ConfigError(f"hub store: unsupported URL {text!r}", field="store")
    return open_sqlite_store(Path(text), **options)
