"""The route table's types, shared by the route modules, the app and the OpenAPI builder.

A :class:`Route` declares everything the app needs to serve one operation --
method, path, handler, the resource kind and action that
:func:`cloud_hub.auth.authorize` checks, the request body model, query
parameters, success status and schema, and the problem statuses it can return --
and :mod:`cloud_hub.openapi` builds the document from the same table, so the two
cannot drift.

Handlers take a :class:`Call` and return a :class:`Reply` (JSON, audited by the
app when the route mutates) or any aiohttp response (metrics text, SSE).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from cloud_hub._problems import Problem, query_int, query_one
from cloud_hub.auth import Action, Principal, ResourceKind
from cloud_hub.store import (
    DEFAULT_PAGE_LIMIT,
    MAX_PAGE_LIMIT,
    DeploymentRecord,
    DeviceRecord,
    EnrollTokenRecord,
    RolloutRecord,
)

if TYPE_CHECKING:
    from cloud_hub.app import HubContext

__all__ = [
    "CTX_KEY",
    "Call",
    "Frozen",
    "QueryParam",
    "Reply",
    "Route",
    "cursor_param",
    "deployment_json",
    "device_json",
    "enroll_token_json",
    "iso_ms",
    "limit_param",
    "list_reply",
    "list_schema",
    "object_schema",
    "page_query",
    "rollout_json",
]

MAX_CURSOR_CHARS: Final = 2048
CTX_KEY: Final[web.AppKey[HubContext]] = web.AppKey("novacron_hub_context")


class Frozen(BaseModel):
    """Base of request models: frozen, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True, slots=True)
class Call:
    """One authorized API call, as a handler sees it.

    Attributes:
        request: the aiohttp request.
        ctx: the hub's services.
        principal: the caller (None on routes that need no token).
    """

    request: web.Request
    ctx: HubContext
    principal: Principal | None

    @property
    def actor(self) -> str:
        """The caller's audit name (``anonymous`` without a token)."""
        return self.principal.actor if self.principal is not None else "anonymous"

    def path(self, name: str) -> str:
        """A path parameter."""
        return self.request.match_info[name]

    def now_ms(self) -> int:
        """The hub clock, in ms."""
        return self.ctx.clock()


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON answer; for mutating routes, what to audit.

    Attributes:
        body: JSON-ready body.
        status: HTTP status.
        target: the audit target (``deployment/web``).
        detail: the audit detail; never secrets.
    """

    body: Any
    status: int = 200
    target: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueryParam:
    """A documented query parameter (the handler reads and checks it)."""

    name: str
    schema: Mapping[str, Any]
    description: str
    repeated: bool = False


Handler = Callable[[Call], Awaitable[Reply | web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One operation of the API.

    Attributes:
        method: HTTP method.
        path: aiohttp path pattern (``/api/v1/devices/{id}``).
        handler: the handler.
        operation_id: the OpenAPI operationId.
        summary: one line for the document.
        kind: resource kind authorized against; None for routes open without a token.
        action: the action authorized.
        id_param: the path parameter naming the resource, if any.
        body: the JSON request body model, if any.
        body_types: accepted media types of the body.
        body_schema: the body's JSON Schema when it is not ``body``'s (manifests).
        query: documented query parameters.
        status: the success status(es); the first is the usual one.
        response: JSON Schema of the success body (None: not JSON, see media_type).
        media_type: the success media type.
        problems: problem statuses besides those implied (401/403 with a kind,
            400/413/415/422 with a body, 404 with an id, 400 with a query).
    """

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    kind: ResourceKind | None
    action: Action = "read"
    id_param: str | None = None
    body: type[BaseModel] | None = None
    body_types: tuple[str, ...] = ("application/json",)
    body_schema: Mapping[str, Any] | None = None
    query: tuple[QueryParam, ...] = ()
    status: tuple[int, ...] = (200,)
    response: Mapping[str, Any] | None = None
    media_type: str = "application/json"
    problems: tuple[int, ...] = ()

    @property
    def has_body(self) -> bool:
        """Whether the operation takes a request body."""
        return self.body is not None or self.body_schema is not None

    def problem_statuses(self) -> tuple[int, ...]:
        """Every problem status this operation can answer with, ascending."""
        out = set(self.problems)
        if self.kind is not None:
            out |= {401, 403}
        if self.has_body:
            out |= {400, 413, 415, 422}
        if self.id_param is not None and self.kind is not None:
            out.add(404)
        if self.query:
            out.add(400)
        return tuple(sorted(out))


# -- query parameters --------------------------------------------------------------------

limit_param: Final = QueryParam(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_LIMIT, "default": DEFAULT_PAGE_LIMIT},
    "page size",
)
cursor_param: Final = QueryParam(
    "cursor",
    {"type": "string", "pattern": "^[A-Za-z0-9_-]+={0,2}$", "maxLength": MAX_CURSOR_CHARS},
    "next_cursor of the previous page",
)


def page_query(call: Call) -> tuple[str | None, int]:
    """Read ``cursor`` and ``limit``.

    Raises:
        Problem: 400 for a bad value.
    """
    cursor = query_one(call.request, "cursor", max_len=MAX_CURSOR_CHARS)
    if cursor == "":
        raise Problem(400, "query parameter 'cursor' must not be empty", slug="bad-cursor")
    return cursor, query_int(call.request, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)


def list_reply(items: Iterable[Any], next_cursor: str | None = None) -> Reply:
    """A list answer, ``{"items": [...], "next_cursor": ...}`` (None: nothing more)."""
    return Reply({"items": list(items), "next_cursor": next_cursor})


# -- response schemas ----------------------------------------------------------------------


def object_schema(required: list[str], props: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON Schema of an object with these properties, ``required`` among them."""
    return {"type": "object", "required": required, "properties": dict(props)}


def list_schema(item: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a list answer (see :func:`list_reply`) of ``item``."""
    return object_schema(
        ["items", "next_cursor"],
        {"items": {"type": "array", "items": item}, "next_cursor": {"type": ["string", "null"]}},
    )


# -- JSON views of records ----------------------------------------------------------------


def iso_ms(ms: int | None) -> str | None:
    """Milliseconds since the epoch as an RFC 3339 UTC string (None stays None)."""
    if ms is None:
        return None
    try:
        when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def device_json(d: DeviceRecord) -> dict[str, Any]:
    """A device as the API shows it."""
    return {
        "id": d.id,
        "region": d.region,
        "profile": d.profile,
        "public_key": d.public_key,
        "arch": d.arch,
        "labels": dict(d.labels),
        "facts": dict(d.facts),
        "enrolled_at": iso_ms(d.enrolled_at_ms),
        "token_id": d.token_id,
        "mqtt_username": d.mqtt_username,
        "status": d.status,
        "last_seen": iso_ms(d.last_seen_ms),
    }


def enroll_token_json(t: EnrollTokenRecord) -> dict[str, Any]:
    """An enrollment token as the API shows it (never its secret or hash)."""
    return {
        "id": t.id,
        "name": t.name,
        "region": t.region,
        "labels": dict(t.labels),
        "max_uses": t.max_uses,
        "uses": t.uses,
        "expires_at": iso_ms(t.expires_at_ms),
        "created_at": iso_ms(t.created_at_ms),
        "created_by": t.created_by,
        "revoked_at": iso_ms(t.revoked_at_ms),
    }


def deployment_json(r: DeploymentRecord) -> dict[str, Any]:
    """One version of a deployment."""
    return {
        "name": r.name,
        "version": r.version,
        "document": dict(r.document),
        "created_at": iso_ms(r.created_at_ms),
        "actor": r.actor,
        "deleted": r.deleted,
    }


def rollout_json(r: RolloutRecord) -> dict[str, Any]:
    """A deployment's current rollout."""
    return {
        "deployment": r.deployment,
        "version": r.version,
        "phase": r.phase,
        "state": dict(r.state),
        "updated_at": iso_ms(r.updated_at_ms),
    }
