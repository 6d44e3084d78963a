"""API tokens and roles: who may call the hub, and what each role may do.

Tokens
    ``nct_<id>_<secret>``: ``id`` is 12 lowercase hex characters (public; it names
    the token in lists, revocations and the audit log), ``secret`` is
    ``secrets.token_urlsafe(32)`` (256 bits). The store keeps only
    ``sha256(raw token)`` -- a fast hash is enough because the secret is random and
    high-entropy, unlike a password -- and compares it with
    :func:`hmac.compare_digest`. The raw token is returned once, by
    :meth:`TokenStore.create`, and can never be read back.

Roles (:func:`authorize`, a pure function)
    * ``admin``: everything, including API tokens and the audit log;
    * ``operator``: reads and mutates fleet resources (deployments, rollouts,
      devices' desired state, enrollment tokens, events);
    * ``viewer``: reads fleet resources only;
    * ``device``: reads its own device (kind ``"device"`` with its id) and nothing
      else -- not the device list, not other devices.

    Anything not granted is denied, including unknown roles and unknown kinds.
    ``"admin"`` actions (e.g. decommissioning a device, managing tokens) are
    admin-only whatever the resource.

Store
    :class:`TokenStore` is the interface the hub uses; it says nothing about
    SQLite, so a PostgreSQL implementation can follow (token parsing and hashing
    are the plain functions :func:`parse_token` and :func:`hash_token`, to share).
    :class:`SQLiteTokenStore` is the embedded one: its table can live in its own
    file or in the hub's store database (its migrations are a separate set).
    Methods are blocking: call them from a worker thread, not on the event loop.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self, get_args

from cloud_hub._closing import Closing
from cloud_hub._exceptions import AuthError, TokenNotFoundError

if TYPE_CHECKING:
    from sqlite_utils import Database

__all__ = [
    "ADMIN_KINDS",
    "FLEET_KINDS",
    "ROLES",
    "TOKEN_PREFIX",
    "Action",
    "Principal",
    "Resource",
    "ResourceKind",
    "Role",
    "SQLiteTokenStore",
    "TokenInfo",
    "TokenStore",
    "authorize",
    "action_for_method",
    "hash_token",
    "mint_token",
    "parse_token",
]

logger = logging.getLogger(__name__)

Role = Literal["admin", "operator", "viewer", "device"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
Action = Literal["read", "mutate", "admin"]
ResourceKind = Literal[
    "audit", "deployment", "device", "enrollment_token", "event", "rollout", "token"
]

FLEET_KINDS: Final[frozenset[ResourceKind]] = frozenset(
    {"deployment", "device", "enrollment_token", "event", "rollout"}
)
"""What operators manage and viewers see."""
ADMIN_KINDS: Final[frozenset[ResourceKind]] = frozenset({"audit", "token"})
"""What only admins may see or touch."""

TOKEN_PREFIX: Final = "nct"
_ID_RE: Final = re.compile(r"[0-9a-f]{12}")
_SECRET_RE: Final = re.compile(r"[A-Za-z0-9_-]{32,128}")
_MAX_TOKEN_LEN: Final = 200
_MAX_NAME_LEN: Final = 128
_MIGRATION_SET: Final = "novacron_hub_tokens"
# Compared against when the id is unknown, so that a miss costs the same as a hit.
_DUMMY_HASH: Final = hashlib.sha256(b"novacron-no-such-token").hexdigest()


# -- pure parts --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    Attributes:
        token_id: the token's public id (what the audit log records as actor).
        name: the token's name.
        role: its role.
        device_id: the device a ``device`` token belongs to, else ``None``.
    """

    token_id: str
    name: str
    role: Role
    device_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller (the token id)."""
        return self.token_id


@dataclass(frozen=True, slots=True)
class Resource:
    """What a call acts on.

    Attributes:
        kind: the resource kind.
        id: the resource's id, or ``None`` for the collection (a list, a create).
    """

    kind: ResourceKind
    id: str | None = None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What the store knows about a token (never its secret).

    Attributes:
        id: the public id.
        name: a human label ("ci-deployer", "gw-0042").
        role: the role.
        device_id: for ``device`` tokens, the device; else ``None``.
        created_at: creation time (UTC).
        expires_at: expiry (UTC), or ``None`` for a token that does not expire.
        revoked_at: revocation time (UTC), or ``None``.
    """

    id: str
    name: str
    role: Role
    device_id: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def revoked(self) -> bool:
        """Whether the token was revoked."""
        return self.revoked_at is not None

    def active(self, now: dt.datetime) -> bool:
        """Whether the token authenticates at ``now`` (not revoked, not expired)."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def principal(self) -> Principal:
        """Return the principal this token authenticates as."""
        return Principal(self.id, self.name, self.role, self.device_id)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (times as ISO 8601 strings)."""

        def iso(t: dt.datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "device_id": self.device_id,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
        }


def authorize(principal: Principal, action: Action, resource: Resource) -> bool:
    """Decide whether ``principal`` may perform ``action`` on ``resource``.

    Pure and total: anything the rules in the module docstring do not grant is
    denied (unknown roles, kinds and actions included).
    """
    role: str = principal.role  # typed Literal, but it came from storage: stay total
    match role:
        case "admin":
            return action in ("read", "mutate", "admin") and resource.kind in (
                FLEET_KINDS | ADMIN_KINDS
            )
        case "operator":
            return action in ("read", "mutate") and resource.kind in FLEET_KINDS
        case "viewer":
            return action == "read" and resource.kind in FLEET_KINDS
        case "device":
            return (
                action == "read"
                and resource.kind == "device"
                and principal.device_id is not None
                and resource.id == principal.device_id
            )
        case _:
            return False


def action_for_method(method: str) -> Action:
    """Map an HTTP method to the action it needs (safe methods read, others mutate)."""
    return "read" if method.upper() in ("GET", "HEAD", "OPTIONS") else "mutate"


def mint_token() -> tuple[str, str]:
    """Return a new ``(token id, raw token)``."""
    token_id = secrets.token_hex(6)
    return token_id, f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"


def parse_token(raw: object) -> str | None:
    """Return the id of a well-formed raw token, or ``None``."""
    if not isinstance(raw, str) or len(raw) > _MAX_TOKEN_LEN:
        return None
    parts = raw.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    _, token_id, secret = parts
    if not _ID_RE.fullmatch(token_id) or not _SECRET_RE.fullmatch(secret):
        return None
    return token_id


def hash_token(raw: str) -> str:
    """Return what the store keeps for a raw token: ``sha256(raw).hexdigest()``."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def _check_request(name: str, role: str, device_id: str | None, ttl: dt.timedelta | None) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME_LEN:
        raise AuthError(f"token name must be 1-{_MAX_NAME_LEN} characters")
    if not name.isprintable():
        raise AuthError("token name must be printable text")
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    if role == "device":
        if device_id is None:
            raise AuthError("a device token needs a device id")
        from sync._exceptions import TopicError  # noqa: PLC0415
        from sync.topics import validate_id  # noqa: PLC0415

        try:
            validate_id(device_id, what="device id")
        except TopicError as exc:
            raise AuthError(str(exc)) from exc
    elif device_id is not None:
        raise AuthError(f"only device tokens have a device id (role {role!r})")
    if ttl is not None and (not isinstance(ttl, dt.timedelta) or ttl <= dt.timedelta(0)):
        raise AuthError("ttl must be a positive timedelta")


# -- the interface -----------------------------------------------------------------------


class TokenStore(Protocol):
    """Where API tokens live. Blocking; thread-safe implementations.

    Nothing here depends on the database: ids are strings, times are aware
    datetimes, and a missing token is ``None`` or :class:`TokenNotFoundError`.
    """

    def create(
        self,
        name: str,
        role: Role,
        *,
        device_id: str | None = None,
        ttl: dt.timedelta | None = None,
    ) -> tuple[str, TokenInfo]:
        """Create a token and return ``(raw token, info)``; the raw token is shown once.

        Raises:
            AuthError: invalid name, role, device id (required for and only for
                ``device`` tokens) or ttl.
        """
        ...

    def authenticate(self, raw_token: str) -> Principal | None:
        """Return the principal of a valid token; ``None`` if unknown, expired or revoked."""
        ...

    def get(self, token_id: str) -> TokenInfo | None:
        """Return one token's info, or ``None``."""
        ...

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke a token (idempotent: the first revocation time is kept).

        Raises:
            TokenNotFoundError: no such token.
        """
        ...

    def list(self) -> builtins.list[TokenInfo]:
        """Return every token, revoked and expired ones included, oldest first."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


# -- SQLite ------------------------------------------------------------------------------


def _m0001_initial(db: Database) -> None:
    db.execute(
        """CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            device_id TEXT,
            secret_hash TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            expires_ms INTEGER,
            revoked_ms INTEGER
        ) STRICT"""
    )


def _from_ms(ms: int | None) -> dt.datetime | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


_SELECT: Final = "SELECT id, name, role, device_id, created_ms, expires_ms, revoked_ms"


def _row_info(row: tuple[Any, ...]) -> TokenInfo:
    token_id, name, role, device_id, created_ms, expires_ms, revoked_ms = row
    created = dt.datetime.fromtimestamp(created_ms / 1000, dt.UTC)
    return TokenInfo(
        token_id, name, role, device_id, created, _from_ms(expires_ms), _from_ms(revoked_ms)
    )


class SQLiteTokenStore(Closing):
    """The embedded :class:`TokenStore` (one SQLite table, ``api_tokens``; WAL).

    Thread-safe: one connection behind a lock (token operations are short).
    """

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float]) -> None:
        """Wrap an open connection; use :meth:`open` instead."""
        self._conn: sqlite3.Connection | None = conn
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, *, clock: Callable[[], float] = time.time) -> Self:
        """Open (creating if needed) the token table in an SQLite file.

        Args:
            path: the database file (its own, or the hub store's).
            clock: wall clock in seconds, for creation and expiry times.

        Raises:
            AuthError: the file cannot be opened or migrated.
        """
        db_path = Path(path)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db_path, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise AuthError(f"{db_path}: cannot open token store: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            from sqlite_utils import Database, Migrations  # noqa: PLC0415

            migrations = Migrations(_MIGRATION_SET)
            migrations(name="0001_initial")(_m0001_initial)
            migrations.apply(Database(conn, execute_plugins=False))
            conn.isolation_level = None
        except sqlite3.Error as exc:
            conn.close()
            raise AuthError(f"{db_path}: cannot open token store: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, clock)

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AuthError("token store is closed")
        return self._conn

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def create(
        self,
        name: str,
        role: Role,
        *,
        device_id: str | None = None,
        ttl: dt.timedelta | None = None,
    ) -> tuple[str, TokenInfo]:
        """See :meth:`TokenStore.create`."""
        _check_request(name, role, device_id, ttl)
        now = self._now_ms()
        expires = None if ttl is None else now + int(ttl.total_seconds() * 1000)
        with self._lock:
            db = self._db()
            for _ in range(5):  # 48-bit ids: a collision is a curiosity, not a failure
                token_id, raw = mint_token()
                try:
                    db.execute(
                        "INSERT INTO api_tokens (id, name, role, device_id, secret_hash, "
                        "created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (token_id, name, role, device_id, hash_token(raw), now, expires),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue
            else:
                raise AuthError("could not allocate a token id")
            row = db.execute(f"{_SELECT} FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        info = _row_info(row)
        logger.info("API token %s (%s, role %s) created", info.id, info.name, info.role)
        return raw, info

    def authenticate(self, raw_token: str) -> Principal | None:
        """See :meth:`TokenStore.authenticate`."""
        token_id = parse_token(raw_token)
        if token_id is None:
            return None
        with self._lock:
            row = (
                self._db()
                .execute(f"{_SELECT}, secret_hash FROM api_tokens WHERE id = ?", (token_id,))
                .fetchone()
            )
        # Compare even on a miss, so that timing does not tell which ids exist.
        stored = _DUMMY_HASH if row is None else str(row[-1])
        if not hmac.compare_digest(stored, hash_token(raw_token)) or row is None:
            return None
        info = _row_info(row[:-1])
        if not info.active(dt.datetime.fromtimestamp(self._clock(), dt.UTC)):
            return None
        return info.principal()

    def get(self, token_id: str) -> TokenInfo | None:
        """See :meth:`TokenStore.get`."""
        with self._lock:
            row = (
                self._db()
                .execute(f"{_SELECT} FROM api_tokens WHERE id = ?", (token_id,))
                .fetchone()
            )
        return None if row is None else _row_info(row)

    def revoke(self, token_id: str) -> TokenInfo:
        """See :meth:`TokenStore.revoke`."""
        with self._lock:
            db = self._db()
            db.execute(
                "UPDATE api_tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
                (self._now_ms(), token_id),
            )
            row = db.execute(f"{_SELECT} FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            raise TokenNotFoundError(token_id)
        logger.info("API token %s revoked", token_id)
        return _row_info(row)

    def list(self) -> builtins.list[TokenInfo]:
        """See :meth:`TokenStore.list`."""
        with self._lock:
            rows = (
                self._db().execute(f"{_SELECT} FROM api_tokens ORDER BY created_ms, id").fetchall()
            )
        return [_row_info(r) for r in rows]
