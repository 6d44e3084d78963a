"""The SQLite hub store's operations: plain blocking functions on one connection.

One function per :class:`cloud_hub.store.Store` method.
:class:`cloud_hub._sqlite_store.SQLiteStore` runs the writes inside one
transaction each on its writer thread, and the reads inside one read
transaction each on its reader threads; nothing here opens a transaction.

Encoding (canonical JSON, event bodies, cursors): :mod:`cloud_hub._sqlite_store_codec`.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast, get_args

from cloud_hub._sqlite_store_codec import (
    check_limit,
    decode_cursor,
    dumps,
    dumps_body,
    labels_map,
    page,
)
from cloud_hub.store import (
    AssignmentRecord,
    ConflictError,
    DeploymentRecord,
    DeviceQuery,
    DeviceRecord,
    DeviceStatus,
    DeviceStatusUpdate,
    EnrollTokenRecord,
    EventRecord,
    IngestCommit,
    NotFoundError,
    Page,
    RolloutRecord,
    StoreError,
    TokenRefusedError,
)

__all__ = ["STATUSES", "IngestCounts"]


STATUSES: Final[tuple[DeviceStatus, ...]] = get_args(DeviceStatus)
_DUMMY_HASH: Final = "0" * 64


# -- devices ---------------------------------------------------------------------------------

_DEVICE_COLS: Final = (
    "id, region, profile, public_key, arch, labels, facts, enrolled_at_ms, token_id, "
    "mqtt_username, status, last_seen_ms"
)


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    (
        device_id,
        region,
        profile,
        public_key,
        arch,
        labels,
        facts,
        enrolled_at_ms,
        token_id,
        mqtt_username,
        status,
        last_seen_ms,
    ) = row
    return DeviceRecord(
        id=device_id,
        region=region,
        profile=profile,
        public_key=public_key,
        arch=arch,
        labels=json.loads(labels),
        facts=json.loads(facts),
        enrolled_at_ms=enrolled_at_ms,
        token_id=token_id,
        mqtt_username=mqtt_username,
        status=status,
        last_seen_ms=last_seen_ms,
    )


def get_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord:
    """See :meth:`cloud_hub.store.Store.get_device`."""
    row = conn.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is None:
        raise NotFoundError("device", device_id)
    return _device(row)


def _device_query_key(query: DeviceQuery) -> dict[str, Any]:
    return {
        "labels": labels_map(query.labels, "label filter"),
        "region": query.region,
        "profile": query.profile,
        "status": query.status,
    }


def list_devices(conn: sqlite3.Connection, query: DeviceQuery) -> Page[DeviceRecord]:
    """See :meth:`cloud_hub.store.Store.list_devices`."""
    limit = check_limit(query.limit)
    key = _device_query_key(query)
    after = decode_cursor(query.cursor, "devices", key)
    where: list[str] = []
    args: list[Any] = []
    for column in ("region", "profile", "status"):
        if key[column] is not None:
            where.append(f"d.{column} = ?")
            args.append(key[column])
    for label, value in sorted(key["labels"].items()):
        # SQLite turns each into a sorted list from device_labels_kv and walks
        # it in id order: the cost follows the matches, never the fleet size.
        where.append("d.id IN (SELECT device_id FROM device_labels WHERE key = ? AND value = ?)")
        args += [label, value]
    if after is not None:
        where.append("d.id > ?")
        args.append(after)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(
        f"SELECT {_DEVICE_COLS} FROM devices d {clause} ORDER BY d.id LIMIT ?",
        (*args, limit + 1),
    ).fetchall()
    return page(rows, limit, make=_device, key=lambda d: d.id, kind="devices", query=key)


def count_devices(conn: sqlite3.Connection) -> dict[DeviceStatus, int]:
    """See :meth:`cloud_hub.store.Store.count_devices`."""
    counts: dict[DeviceStatus, int] = dict.fromkeys(STATUSES, 0)
    for status, n in conn.execute("SELECT status, COUNT(*) FROM devices GROUP BY status"):
        if status in counts:
            counts[status] = n
    return counts


def _check_device(device: DeviceRecord) -> None:
    if device.status not in STATUSES:
        raise StoreError(f"device {device.id!r}: unknown status {device.status!r}")
    for name in ("id", "region", "profile", "public_key", "arch", "mqtt_username"):
        if not isinstance(getattr(device, name), str):
            raise StoreError(f"device {device.id!r}: {name} must be a string")


def _write_labels(conn: sqlite3.Connection, device_id: str, labels: Mapping[str, str]) -> None:
    conn.execute("DELETE FROM device_labels WHERE device_id = ?", (device_id,))
    conn.executemany(
        "INSERT INTO device_labels (device_id, key, value) VALUES (?, ?, ?)",
        [(device_id, k, v) for k, v in labels.items()],
    )


def insert_devices(conn: sqlite3.Connection, devices: Iterable[DeviceRecord]) -> None:
    """Insert devices as they are.

    Raises:
        ConflictError: a device id or public key that is stored already.
        StoreError: a record that cannot be stored.
    """
    for device in devices:
        _check_device(device)
        labels = labels_map(device.labels)
        try:
            conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device.id,
                    device.region,
                    device.profile,
                    device.public_key,
                    device.arch,
                    dumps(labels),
                    dumps(device.facts),
                    device.enrolled_at_ms,
                    device.token_id,
                    device.mqtt_username,
                    device.status,
                    device.last_seen_ms,
                ),
            )
        except sqlite3.IntegrityError as exc:
            if "public_key" in str(exc):
                raise ConflictError(
                    "device",
                    device.public_key,
                    f"device public key of {device.id!r} is enrolled already",
                ) from exc
            raise ConflictError("device", device.id) from exc
        _write_labels(conn, device.id, labels)


def set_device_labels(
    conn: sqlite3.Connection, device_id: str, labels: Mapping[str, str]
) -> DeviceRecord:
    """See :meth:`cloud_hub.store.Store.set_device_labels`."""
    clean = labels_map(labels)
    cur = conn.execute("UPDATE devices SET labels = ? WHERE id = ?", (dumps(clean), device_id))
    if cur.rowcount == 0:
        raise NotFoundError("device", device_id)
    _write_labels(conn, device_id, clean)
    return get_device(conn, device_id)


def update_device_status(conn: sqlite3.Connection, updates: Sequence[DeviceStatusUpdate]) -> None:
    """See :meth:`cloud_hub.store.Store.update_device_status`.

    ``last_seen_ms`` is never lowered; None leaves it as it is.
    """
    rows = []
    for u in updates:
        if u.status not in STATUSES:
            raise StoreError(f"device {u.device_id!r}: unknown status {u.status!r}")
        rows.append((u.status, u.last_seen_ms, u.device_id))
    conn.executemany(
        "UPDATE devices SET status = ?1, last_seen_ms = CASE WHEN ?2 IS NULL THEN last_seen_ms "
        "ELSE MAX(COALESCE(last_seen_ms, ?2), ?2) END WHERE id = ?3",
        rows,
    )


def delete_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord:
    """See :meth:`cloud_hub.store.Store.delete_device`.

    The device's labels, events and stream cursors go with it; its assignments
    and its replicated scope are the controller's and the replica's to clear.
    """
    device = get_device(conn, device_id)
    for table, column in (
        ("devices", "id"),
        ("device_labels", "device_id"),
        ("events", "device_id"),
        ("event_counts", "device_id"),
        ("stream_cursors", "device_id"),
    ):
        conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (device_id,))
    return device


# -- enrollment tokens -----------------------------------------------------------------------

_TOKEN_COLS: Final = (
    "id, secret_hash, name, region, labels, max_uses, uses, expires_at_ms, created_at_ms, "
    "created_by, revoked_at_ms"
)


def _token(row: tuple[Any, ...]) -> EnrollTokenRecord:
    (
        token_id,
        secret_hash,
        name,
        region,
        labels,
        max_uses,
        uses,
        expires_at_ms,
        created_at_ms,
        created_by,
        revoked_at_ms,
    ) = row
    return EnrollTokenRecord(
        id=token_id,
        secret_hash=secret_hash,
        name=name,
        region=region,
        labels=json.loads(labels),
        max_uses=max_uses,
        uses=uses,
        expires_at_ms=expires_at_ms,
        created_at_ms=created_at_ms,
        created_by=created_by,
        revoked_at_ms=revoked_at_ms,
    )


def _token_row(conn: sqlite3.Connection, token_id: str) -> tuple[Any, ...] | None:
    row = conn.execute(f"SELECT {_TOKEN_COLS} FROM enroll_tokens WHERE id = ?", (token_id,))
    return cast("tuple[Any, ...] | None", row.fetchone())


def get_enroll_token(conn: sqlite3.Connection, token_id: str) -> EnrollTokenRecord:
    """See :meth:`cloud_hub.store.Store.get_enroll_token`."""
    row = _token_row(conn, token_id)
    if row is None:
        raise NotFoundError("enroll_token", token_id)
    return _token(row)


def create_enroll_token(conn: sqlite3.Connection, token: EnrollTokenRecord) -> EnrollTokenRecord:
    """See :meth:`cloud_hub.store.Store.create_enroll_token`."""
    if type(token.max_uses) is not int or token.max_uses < 1:
        raise StoreError(f"enroll token {token.id!r}: max_uses must be an int >= 1")
    try:
        conn.execute(
            f"INSERT INTO enroll_tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                token.id,
                token.secret_hash,
                token.name,
                token.region,
                dumps(labels_map(token.labels)),
                token.max_uses,
                token.uses,
                token.expires_at_ms,
                token.created_at_ms,
                token.created_by,
                token.revoked_at_ms,
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise ConflictError("enroll_token", token.id) from exc
    return get_enroll_token(conn, token.id)


def list_enroll_tokens(
    conn: sqlite3.Connection, cursor: str | None, limit: int
) -> Page[EnrollTokenRecord]:
    """See :meth:`cloud_hub.store.Store.list_enroll_tokens`."""
    check_limit(limit)
    after = decode_cursor(cursor, "enroll_tokens", None)
    rows = conn.execute(
        f"SELECT {_TOKEN_COLS} FROM enroll_tokens WHERE id > ? ORDER BY id LIMIT ?",
        ("" if after is None else after, limit + 1),
    ).fetchall()
    return page(rows, limit, make=_token, key=lambda t: t.id, kind="enroll_tokens", query=None)


def revoke_enroll_token(conn: sqlite3.Connection, token_id: str, now_ms: int) -> EnrollTokenRecord:
    """See :meth:`cloud_hub.store.Store.revoke_enroll_token`."""
    conn.execute(
        "UPDATE enroll_tokens SET revoked_at_ms = ? WHERE id = ? AND revoked_at_ms IS NULL",
        (now_ms, token_id),
    )
    return get_enroll_token(conn, token_id)


def redeem_enroll_token(
    conn: sqlite3.Connection,
    token_id: str,
    secret_hash: str,
    now_ms: int,
    make_device: Callable[[EnrollTokenRecord], DeviceRecord],
) -> DeviceRecord:
    """See :meth:`cloud_hub.store.Store.redeem_enroll_token` (run in a BEGIN IMMEDIATE)."""
    row = _token_row(conn, token_id) if isinstance(token_id, str) else None
    # Compare even when the id is unknown, so that timing does not tell which exist.
    stored = _DUMMY_HASH if row is None else str(row[1])
    given = secret_hash.encode() if isinstance(secret_hash, str) else b""
    matches = hmac.compare_digest(stored.encode(), given)
    if row is None or not matches:
        raise TokenRefusedError("unknown", "unknown enrollment token or wrong secret")
    token = _token(row)
    if token.revoked_at_ms is not None:
        raise TokenRefusedError("revoked", f"enrollment token {token.id} was revoked")
    if token.expires_at_ms is not None and now_ms >= token.expires_at_ms:
        raise TokenRefusedError("expired", f"enrollment token {token.id} has expired")
    if token.uses >= token.max_uses:
        raise TokenRefusedError(
            "spent", f"enrollment token {token.id} is used up ({token.uses} of {token.max_uses})"
        )
    device = make_device(token)
    if conn.execute("SELECT 1 FROM devices WHERE id = ?", (device.id,)).fetchone() is not None:
        raise TokenRefusedError("duplicate_key", f"device id {device.id!r} is enrolled already")
    if (
        conn.execute("SELECT 1 FROM devices WHERE public_key = ?", (device.public_key,)).fetchone()
        is not None
    ):
        raise TokenRefusedError("duplicate_key", "this device public key is enrolled already")
    insert_devices(conn, [device])
    conn.execute("UPDATE enroll_tokens SET uses = uses + 1 WHERE id = ?", (token.id,))
    return get_device(conn, device.id)


# -- deployments -------------------------------------------------------------------------------

_DEPLOYMENT_COLS: Final = "name, version, document, created_at_ms, actor, deleted"


def _deployment(row: tuple[Any, ...]) -> DeploymentRecord:
    name, version, document, created_at_ms, actor, deleted = row
    return DeploymentRecord(
        name, version, json.loads(document), created_at_ms, actor, bool(deleted)
    )


def _version_row(conn: sqlite3.Connection, name: str, version: int) -> tuple[Any, ...] | None:
    cur = conn.execute(
        f"SELECT {_DEPLOYMENT_COLS} FROM deployment_versions WHERE name = ? AND version = ?",
        (name, version),
    )
    return cast("tuple[Any, ...] | None", cur.fetchone())


def _head(conn: sqlite3.Connection, name: str) -> tuple[int, bool] | None:
    row = conn.execute(
        "SELECT version, deleted FROM deployments WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else (int(row[0]), bool(row[1]))


def _add_version(
    conn: sqlite3.Connection,
    name: str,
    version: int,
    *,
    document: str,
    actor: str,
    now_ms: int,
    deleted: bool,
) -> DeploymentRecord:
    conn.execute(
        f"INSERT INTO deployment_versions ({_DEPLOYMENT_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
        (name, version, document, now_ms, actor, int(deleted)),
    )
    conn.execute(
        "INSERT INTO deployments (name, version, deleted) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET version = excluded.version, deleted = excluded.deleted",
        (name, version, int(deleted)),
    )
    return DeploymentRecord(name, version, json.loads(document), now_ms, actor, deleted)


def put_deployment(
    conn: sqlite3.Connection, name: str, document: Mapping[str, Any], actor: str, now_ms: int
) -> tuple[DeploymentRecord, bool]:
    """See :meth:`cloud_hub.store.Store.put_deployment`."""
    text = dumps(document)
    head = _head(conn, name)
    if head is not None and not head[1]:
        latest = _version_row(conn, name, head[0])
        if latest is not None and latest[2] == text:
            return _deployment(latest), False
    version = 1 if head is None else head[0] + 1
    return _add_version(
        conn, name, version, document=text, actor=actor, now_ms=now_ms, deleted=False
    ), True


def get_deployment(
    conn: sqlite3.Connection, name: str, version: int | None = None
) -> DeploymentRecord:
    """See :meth:`cloud_hub.store.Store.get_deployment` (the latest may be a deleted one)."""
    if version is None:
        head = _head(conn, name)
        if head is None:
            raise NotFoundError("deployment", name)
        version = head[0]
    row = _version_row(conn, name, version)
    if row is None:
        raise NotFoundError("deployment", f"{name}@{version}")
    return _deployment(row)


def list_deployments(
    conn: sqlite3.Connection, cursor: str | None, limit: int, include_deleted: bool
) -> Page[DeploymentRecord]:
    """See :meth:`cloud_hub.store.Store.list_deployments`."""
    check_limit(limit)
    query = {"include_deleted": bool(include_deleted)}
    after = decode_cursor(cursor, "deployments", query)
    deleted_clause = "" if include_deleted else "AND h.deleted = 0"
    cols = ", ".join(f"v.{c.strip()}" for c in _DEPLOYMENT_COLS.split(","))
    rows = conn.execute(
        f"SELECT {cols} FROM deployments h JOIN deployment_versions v "
        f"ON v.name = h.name AND v.version = h.version "
        f"WHERE h.name > ? {deleted_clause} ORDER BY h.name LIMIT ?",
        ("" if after is None else after, limit + 1),
    ).fetchall()
    return page(
        rows, limit, make=_deployment, key=lambda d: d.name, kind="deployments", query=query
    )


def deployment_history(conn: sqlite3.Connection, name: str) -> list[DeploymentRecord]:
    """See :meth:`cloud_hub.store.Store.deployment_history`."""
    rows = conn.execute(
        f"SELECT {_DEPLOYMENT_COLS} FROM deployment_versions WHERE name = ? ORDER BY version",
        (name,),
    ).fetchall()
    if not rows:
        raise NotFoundError("deployment", name)
    return [_deployment(r) for r in rows]


def delete_deployment(
    conn: sqlite3.Connection, name: str, actor: str, now_ms: int
) -> DeploymentRecord:
    """See :meth:`cloud_hub.store.Store.delete_deployment` (a deleted one is not found)."""
    head = _head(conn, name)
    latest = None if head is None or head[1] else _version_row(conn, name, head[0])
    if head is None or latest is None:
        raise NotFoundError("deployment", name)
    return _add_version(
        conn, name, head[0] + 1, document=latest[2], actor=actor, now_ms=now_ms, deleted=True
    )


# -- rollouts and assignments ----------------------------------------------------------------

_ROLLOUT_COLS: Final = "deployment, version, phase, state, updated_at_ms"


def _rollout(row: tuple[Any, ...]) -> RolloutRecord:
    deployment, version, phase, state, updated_at_ms = row
    return RolloutRecord(deployment, version, phase, json.loads(state), updated_at_ms)


def save_rollout(conn: sqlite3.Connection, rollout: RolloutRecord) -> None:
    """See :meth:`cloud_hub.store.Store.save_rollout`."""
    conn.execute(
        f"INSERT OR REPLACE INTO rollouts ({_ROLLOUT_COLS}) VALUES (?, ?, ?, ?, ?)",
        (
            rollout.deployment,
            rollout.version,
            rollout.phase,
            dumps(rollout.state),
            rollout.updated_at_ms,
        ),
    )


def get_rollout(conn: sqlite3.Connection, deployment: str) -> RolloutRecord:
    """See :meth:`cloud_hub.store.Store.get_rollout`."""
    row = conn.execute(
        f"SELECT {_ROLLOUT_COLS} FROM rollouts WHERE deployment = ?", (deployment,)
    ).fetchone()
    if row is None:
        raise NotFoundError("rollout", deployment)
    return _rollout(row)


def list_rollouts(
    conn: sqlite3.Connection, phase: str | None, cursor: str | None, limit: int
) -> Page[RolloutRecord]:
    """See :meth:`cloud_hub.store.Store.list_rollouts`."""
    check_limit(limit)
    query = {"phase": phase}
    after = decode_cursor(cursor, "rollouts", query)
    phase_clause = "" if phase is None else "AND phase = ?"
    args: tuple[Any, ...] = ("" if after is None else after,)
    if phase is not None:
        args += (phase,)
    rows = conn.execute(
        f"SELECT {_ROLLOUT_COLS} FROM rollouts WHERE deployment > ? {phase_clause} "
        "ORDER BY deployment LIMIT ?",
        (*args, limit + 1),
    ).fetchall()
    return page(
        rows, limit, make=_rollout, key=lambda r: r.deployment, kind="rollouts", query=query
    )


def set_assignments(
    conn: sqlite3.Connection, deployment: str, device_ids: Sequence[str], now_ms: int
) -> list[AssignmentRecord]:
    """See :meth:`cloud_hub.store.Store.set_assignments` (a repeated id counts once)."""
    if isinstance(device_ids, str):
        raise StoreError("device_ids must be a sequence of ids, not one string")
    wanted = list(dict.fromkeys(device_ids))
    kept = {
        device_id
        for (device_id,) in conn.execute(
            "SELECT device_id FROM assignments WHERE deployment = ?", (deployment,)
        )
    }
    conn.executemany(
        "DELETE FROM assignments WHERE deployment = ? AND device_id = ?",
        [(deployment, d) for d in kept.difference(wanted)],
    )
    conn.executemany(
        "INSERT INTO assignments (deployment, device_id, assigned_at_ms) VALUES (?, ?, ?)",
        [(deployment, d, now_ms) for d in wanted if d not in kept],
    )
    return list_assignments(conn, deployment, None)


def list_assignments(
    conn: sqlite3.Connection, deployment: str | None, device_id: str | None
) -> list[AssignmentRecord]:
    """See :meth:`cloud_hub.store.Store.list_assignments`."""
    where, args = [], []
    if deployment is not None:
        where.append("deployment = ?")
        args.append(deployment)
    if device_id is not None:
        where.append("device_id = ?")
        args.append(device_id)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(
        f"SELECT deployment, device_id, assigned_at_ms FROM assignments {clause} "
        "ORDER BY deployment, device_id",
        args,
    )
    return [AssignmentRecord(*r) for r in rows]


# -- replicated state and events -------------------------------------------------------------


def load_scopes(conn: sqlite3.Connection) -> dict[str, bytes]:
    """See :meth:`cloud_hub.store.Store.load_scopes`."""
    return {scope: bytes(state) for scope, state in conn.execute("SELECT scope, state FROM scopes")}


def get_scope(conn: sqlite3.Connection, scope: str) -> bytes | None:
    """See :meth:`cloud_hub.store.Store.get_scope`."""
    row = conn.execute("SELECT state FROM scopes WHERE scope = ?", (scope,)).fetchone()
    return None if row is None else bytes(row[0])


def save_scopes(conn: sqlite3.Connection, scopes: Mapping[str, bytes]) -> None:
    """See :meth:`cloud_hub.store.Store.save_scopes`."""
    rows = []
    for scope, state in scopes.items():
        if not isinstance(scope, str) or not isinstance(state, bytes | bytearray):
            raise StoreError("scopes must map names to bytes")
        rows.append((scope, bytes(state)))
    conn.executemany(
        "INSERT INTO scopes (scope, state) VALUES (?, ?) "
        "ON CONFLICT (scope) DO UPDATE SET state = excluded.state",
        rows,
    )


def load_cursors(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """See :meth:`cloud_hub.store.Store.load_cursors`."""
    return {
        (device_id, stream): next_seq
        for device_id, stream, next_seq in conn.execute(
            "SELECT device_id, stream, next_seq FROM stream_cursors"
        )
    }


@dataclass(frozen=True, slots=True)
class IngestCounts:
    """What one :func:`commit_ingest` did to the events table."""

    stored: int = 0
    duplicate: int = 0
    pruned: int = 0


def _check_event(e: EventRecord) -> None:
    if not (
        isinstance(e.device_id, str)
        and isinstance(e.stream, str)
        and type(e.seq) is int
        and e.seq >= 1
        and type(e.ingested_at_ms) is int
    ):
        raise StoreError(f"invalid event {e.device_id!r:.80}/{e.stream!r:.80}/{e.seq!r:.20}")


def commit_ingest(
    conn: sqlite3.Connection, commit: IngestCommit, max_per_stream: int
) -> IngestCounts:
    """See :meth:`cloud_hub.store.Store.commit_ingest`; then prune each stream written
    to down to its newest ``max_per_stream`` events.

    Cursors only move forward, like ``seen``: an older value never replaces a newer one.
    """
    save_scopes(conn, commit.scopes)
    groups: dict[tuple[str, str], list[tuple[str, str, int, int, str]]] = {}
    for e in commit.events:
        _check_event(e)
        groups.setdefault((e.device_id, e.stream), []).append(
            (e.device_id, e.stream, e.seq, e.ingested_at_ms, dumps_body(e.body))
        )
    stored = pruned = 0
    for (device_id, stream), rows in groups.items():
        cur = conn.executemany(
            "INSERT OR IGNORE INTO events (device_id, stream, seq, ingested_at_ms, body) "
            "VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        added = max(cur.rowcount, 0)
        if not added:
            continue
        stored += added
        (n,) = conn.execute(
            "INSERT INTO event_counts (device_id, stream, n) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id, stream) DO UPDATE SET n = n + excluded.n RETURNING n",
            (device_id, stream, added),
        ).fetchone()
        if n > max_per_stream:
            pruned += _prune(conn, device_id, stream, n - max_per_stream)
    cursor_rows = []
    for (device_id, stream), seq in commit.cursors.items():
        if type(seq) is not int or seq < 1:
            raise StoreError(f"invalid cursor {device_id!r:.80}/{stream!r:.80}: {seq!r:.20}")
        cursor_rows.append((device_id, stream, seq))
    conn.executemany(
        "INSERT INTO stream_cursors (device_id, stream, next_seq) VALUES (?, ?, ?) "
        "ON CONFLICT (device_id, stream) DO UPDATE SET next_seq = MAX(next_seq, excluded.next_seq)",
        cursor_rows,
    )
    conn.executemany(
        "UPDATE devices SET last_seen_ms = MAX(COALESCE(last_seen_ms, ?1), ?1) WHERE id = ?2",
        [(ms, device_id) for device_id, ms in commit.seen.items()],
    )
    return IngestCounts(stored, len(commit.events) - stored, pruned)


def _prune(conn: sqlite3.Connection, device_id: str, stream: str, excess: int) -> int:
    cur = conn.execute(
        "DELETE FROM events WHERE device_id = ?1 AND stream = ?2 AND seq <= ("
        "SELECT seq FROM events WHERE device_id = ?1 AND stream = ?2 "
        "ORDER BY seq LIMIT 1 OFFSET ?3)",
        (device_id, stream, excess - 1),
    )
    removed = cur.rowcount
    conn.execute(
        "UPDATE event_counts SET n = n - ? WHERE device_id = ? AND stream = ?",
        (removed, device_id, stream),
    )
    return removed


def list_events(
    conn: sqlite3.Connection, device_id: str, stream: str | None, after_seq: int, limit: int
) -> list[EventRecord]:
    """See :meth:`cloud_hub.store.Store.list_events` (``after_seq`` applies in every stream)."""
    check_limit(limit)
    stream_clause = "" if stream is None else "AND stream = ?"
    args: tuple[Any, ...] = (device_id,) if stream is None else (device_id, stream)
    rows = conn.execute(
        "SELECT device_id, stream, seq, ingested_at_ms, body FROM events "
        f"WHERE device_id = ? {stream_clause} AND seq > ? ORDER BY stream, seq LIMIT ?",
        (*args, after_seq, limit),
    )
    return [EventRecord(d, s, q, at, json.loads(body)) for d, s, q, at, body in rows]
