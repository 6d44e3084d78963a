"""Routes of enrollment tokens, API tokens (admin) and the audit log (admin)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated, Any, Final

from pydantic import Field, StringConstraints

from cloud_hub._api_common import (
    Call,
    Frozen,
    QueryParam,
    Reply,
    Route,
    cursor_param,
    enroll_token_json,
    iso_ms,
    limit_param,
    list_reply,
    list_schema,
    object_schema,
    page_query,
)
from cloud_hub._problems import Problem, parse_json, query_int, read_body, validate_model
from cloud_hub.auth import Role
from cloud_hub.enrollment import UnknownRegionError
from cloud_hub.manifests import LabelKey, LabelValue, RegionName

__all__ = ["ROUTES", "ApiTokenCreate", "EnrollTokenCreate"]

_MAX_TTL_S: Final = 10 * 366 * 24 * 3600
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class EnrollTokenCreate(Frozen):
    """Body of ``POST /api/v1/enrollment-tokens``."""

    name: Name
    region: RegionName
    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] = Field(
        default_factory=dict
    )
    max_uses: int = Field(default=1, ge=1, le=1_000_000)
    ttl_s: int | None = Field(default=None, ge=1, le=_MAX_TTL_S)


class ApiTokenCreate(Frozen):
    """Body of ``POST /api/v1/tokens``."""

    name: Name
    role: Role
    device_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    ttl_s: int | None = Field(default=None, ge=1, le=_MAX_TTL_S)


async def create_enroll_token(call: Call) -> Reply:
    """``POST /api/v1/enrollment-tokens``: the token is shown once."""
    _, raw = await read_body(call.request, ("application/json",))
    body = validate_model(EnrollTokenCreate, parse_json(raw))
    try:
        token, record = await call.ctx.enrollment.create_token(
            name=body.name,
            region=body.region,
            actor=call.actor,
            labels=body.labels,
            max_uses=body.max_uses,
            ttl_s=body.ttl_s,
        )
    except UnknownRegionError as exc:
        raise Problem(
            422, str(exc), slug="unknown-region", errors=[{"loc": ["region"], "msg": str(exc)}]
        ) from exc
    view = enroll_token_json(record)
    return Reply(
        view | {"token": token},
        status=201,
        target=f"enrollment_token/{record.id}",
        detail={k: view[k] for k in ("name", "region", "labels", "max_uses", "expires_at")},
    )


async def list_enroll_tokens(call: Call) -> Reply:
    """``GET /api/v1/enrollment-tokens``."""
    cursor, limit = page_query(call)
    page = await call.ctx.store.list_enroll_tokens(cursor=cursor, limit=limit)
    return list_reply(map(enroll_token_json, page.items), page.next_cursor)


async def revoke_enroll_token(call: Call) -> Reply:
    """``DELETE /api/v1/enrollment-tokens/{id}``: revoke (idempotent)."""
    token_id = call.path("id")
    record = await call.ctx.enrollment.revoke_token(token_id)
    return Reply(enroll_token_json(record), target=f"enrollment_token/{token_id}")


async def create_api_token(call: Call) -> Reply:
    """``POST /api/v1/tokens`` (admin): the token is shown once."""
    _, raw = await read_body(call.request, ("application/json",))
    body = validate_model(ApiTokenCreate, parse_json(raw))
    ttl = None if body.ttl_s is None else dt.timedelta(seconds=body.ttl_s)
    token, info = await asyncio.to_thread(
        call.ctx.tokens.create, body.name, body.role, device_id=body.device_id, ttl=ttl
    )
    view = info.to_dict()
    return Reply(
        view | {"token": token},
        status=201,
        target=f"token/{info.id}",
        detail={"name": info.name, "role": info.role, "device_id": info.device_id},
    )


async def list_api_tokens(call: Call) -> Reply:
    """``GET /api/v1/tokens`` (admin): every token, oldest first, never a secret."""
    infos = await asyncio.to_thread(call.ctx.tokens.list)
    return list_reply(i.to_dict() for i in infos)


async def revoke_api_token(call: Call) -> Reply:
    """``DELETE /api/v1/tokens/{id}`` (admin): revoke (idempotent)."""
    token_id = call.path("id")
    info = await asyncio.to_thread(call.ctx.tokens.revoke, token_id)
    return Reply(info.to_dict(), target=f"token/{token_id}")


async def list_audit(call: Call) -> Reply:
    """``GET /api/v1/audit`` (admin): entries after a seq, oldest first."""
    after = query_int(call.request, "after", 0, 0, 2**62)
    limit = query_int(call.request, "limit", 100, 1, 1000)
    entries = await asyncio.to_thread(call.ctx.audit.entries, after_seq=after, limit=limit)
    items: list[dict[str, Any]] = [
        {
            "seq": e.seq,
            "ts": iso_ms(e.ts_ms),
            "actor": e.actor,
            "role": e.role,
            "action": e.action,
            "target": e.target,
            "outcome": e.outcome,
            "detail": e.detail_obj(),
            "prev_hash": e.prev_hash,
            "hash": e.hash,
        }
        for e in entries
    ]
    next_cursor = str(entries[-1].seq) if len(entries) == limit else None
    return list_reply(items, next_cursor)


_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_ENROLL_TOKEN: Final = object_schema(
    ["id", "name", "region", "labels", "max_uses", "uses", "expires_at"],
    {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "region": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "max_uses": {"type": "integer"},
        "uses": {"type": "integer"},
        "expires_at": _TIME,
        "created_at": _TIME,
        "created_by": {"type": "string"},
        "revoked_at": _TIME,
    },
)
_API_TOKEN: Final = object_schema(
    ["id", "name", "role", "device_id", "created_at", "expires_at", "revoked_at"],
    {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "role": {"type": "string", "enum": ["admin", "operator", "viewer", "device"]},
        "device_id": {"type": ["string", "null"]},
        "created_at": {"type": "string"},
        "expires_at": {"type": ["string", "null"]},
        "revoked_at": {"type": ["string", "null"]},
    },
)


def _with_secret(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        **schema,
        "required": [*schema["required"], "token"],
        "properties": {**schema["properties"], "token": {"type": "string"}},
    }


_AUDIT_ENTRY: Final = object_schema(
    ["seq", "ts", "actor", "role", "action", "target", "outcome", "detail", "hash"],
    {
        "seq": {"type": "integer"},
        "ts": _TIME,
        "actor": {"type": "string"},
        "role": {"type": "string"},
        "action": {"type": "string"},
        "target": {"type": "string"},
        "outcome": {"type": "integer"},
        "detail": {},
        "prev_hash": {"type": "string"},
        "hash": {"type": "string"},
    },
)

ROUTES: Final = (
    Route(
        "POST",
        "/api/v1/enrollment-tokens",
        create_enroll_token,
        "createEnrollmentToken",
        "Make an enrollment token (the secret is shown once)",
        "enrollment_token",
        "mutate",
        body=EnrollTokenCreate,
        status=(201,),
        response=_with_secret(_ENROLL_TOKEN),
        problems=(409,),
    ),
    Route(
        "GET",
        "/api/v1/enrollment-tokens",
        list_enroll_tokens,
        "listEnrollmentTokens",
        "Enrollment tokens (never their secrets)",
        "enrollment_token",
        query=(cursor_param, limit_param),
        response=list_schema(_ENROLL_TOKEN),
    ),
    Route(
        "DELETE",
        "/api/v1/enrollment-tokens/{id}",
        revoke_enroll_token,
        "revokeEnrollmentToken",
        "Revoke an enrollment token",
        "enrollment_token",
        "mutate",
        id_param="id",
        response=_ENROLL_TOKEN,
    ),
    Route(
        "POST",
        "/api/v1/tokens",
        create_api_token,
        "createApiToken",
        "Make an API token (admin; the secret is shown once)",
        "token",
        "admin",
        body=ApiTokenCreate,
        status=(201,),
        response=_with_secret(_API_TOKEN),
    ),
    Route(
        "GET",
        "/api/v1/tokens",
        list_api_tokens,
        "listApiTokens",
        "API tokens (admin; never their secrets)",
        "token",
        "admin",
        response=list_schema(_API_TOKEN),
    ),
    Route(
        "DELETE",
        "/api/v1/tokens/{id}",
        revoke_api_token,
        "revokeApiToken",
        "Revoke an API token (admin)",
        "token",
        "admin",
        id_param="id",
        response=_API_TOKEN,
    ),
    Route(
        "GET",
        "/api/v1/audit",
        list_audit,
        "listAudit",
        "Audit log entries after a seq (admin)",
        "audit",
        "admin",
        query=(
            QueryParam("after", {"type": "integer", "minimum": 0, "maximum": 2**62}, "seq"),
            QueryParam(
                "limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "size"
            ),
        ),
        response=list_schema(_AUDIT_ENTRY),
    ),
)
