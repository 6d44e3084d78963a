"""The hub's aiohttp application: the fleet REST API, metrics, health and events.

:func:`make_app` registers every :class:`~cloud_hub._api_common.Route` of the
route table (:data:`ROUTES`) with one wrapper that

1. authenticates the ``Authorization: Bearer`` token (routes with a resource
   kind; the token store is blocking, so it runs in a worker thread) -- 401
   without a valid token;
2. authorizes the route's action on its resource
   (:func:`cloud_hub.auth.authorize`) -- 403, except that a device token asking
   for another device gets 404, so it cannot learn which devices exist;
3. runs the handler, and for a successful mutating call (any method but GET)
   appends an audit entry (actor, role, ``METHOD /path/pattern``, target,
   status, a detail without secrets) and logs it at INFO. Refused calls
   change nothing and are not audited; they are logged.

Around it, :func:`cloud_hub._problems.error_middleware` answers every error with
a problem body and a request counter feeds ``/metrics``. Bodies are capped at
``max_body_bytes`` (aiohttp's ``client_max_size``; 413). On shutdown the event
bus is closed so that open SSE streams end.

The OpenAPI document (``/api/v1/openapi.json``) is built from the same table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web

from cloud_hub import _api_deployments, _api_devices, _api_system, _api_tokens
from cloud_hub._api_common import CTX_KEY, Call, Reply, Route
from cloud_hub._problems import Handler, Problem, error_middleware
from cloud_hub.audit import AuditLog
from cloud_hub.auth import Principal, Resource, TokenStore, authorize
from cloud_hub.enrollment import Enrollment
from cloud_hub.events import EventBus
from cloud_hub.health import HealthTracker
from cloud_hub.metrics import RequestCounter
from cloud_hub.openapi import build_openapi
from cloud_hub.store import DeploymentRecord, RolloutRecord, Store

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "OPENAPI_KEY",
    "REQUESTS_KEY",
    "ROUTES",
    "Controller",
    "HubContext",
    "make_app",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES: Final = 1 << 20
_MAX_AUTH_HEADER: Final = 512

ROUTES: Final[tuple[Route, ...]] = (
    *_api_system.ROUTES,
    *_api_devices.ROUTES,
    *_api_deployments.ROUTES,
    *_api_tokens.ROUTES,
)
"""Every operation the app serves, in document order."""

REQUESTS_KEY: Final = web.AppKey("novacron_hub_requests", RequestCounter)
OPENAPI_KEY: Final = web.AppKey("novacron_hub_openapi", dict[str, Any])


class Controller(Protocol):
    """What the API needs of :class:`cloud_hub.controller.FleetController`."""

    async def apply(self, record: DeploymentRecord) -> RolloutRecord | None:
        """Place a new deployment version and start its rollout."""
        ...

    async def delete(self, record: DeploymentRecord) -> None:
        """Remove a deleted deployment's workloads."""
        ...

    async def pause(self, name: str, actor: str) -> RolloutRecord:
        """Pause a rollout (RolloutStateError when not allowed)."""
        ...

    async def resume(self, name: str, actor: str) -> RolloutRecord:
        """Resume a rollout."""
        ...

    async def undo(self, name: str, actor: str) -> RolloutRecord:
        """Roll a deployment back to its previous version."""
        ...


@dataclass(frozen=True, slots=True)
class HubContext:
    """The services the API calls.

    Attributes:
        store: the fleet store.
        tokens: API tokens (blocking; called from worker threads).
        audit: the audit log (blocking; called from worker threads).
        controller: deployments, placement and rollouts.
        enrollment: enrollment tokens and device enrollment.
        events: fleet events for SSE.
        health: device and region health.
        stats: ingest counters for ``/metrics`` (numbers, or mappings by reason).
        clock: hub clock, ms since the epoch.
        max_body_bytes: request bodies larger than this are refused (413).
    """

    store: Store
    tokens: TokenStore
    audit: AuditLog
    controller: Controller
    enrollment: Enrollment
    events: EventBus
    health: HealthTracker
    stats: Callable[[], Mapping[str, Any]]
    clock: Callable[[], int]
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


async def _authenticate(request: web.Request, ctx: HubContext) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="novacron-hub"'}
    if not header:
        raise Problem(
            401, "an API token is required (Authorization: Bearer <token>)", headers=challenge
        )
    if scheme.lower() != "bearer" or not raw.strip() or len(header) > _MAX_AUTH_HEADER:
        raise Problem(401, "the Authorization header must be 'Bearer <token>'", headers=challenge)
    principal = await asyncio.to_thread(ctx.tokens.authenticate, raw.strip())
    if principal is None:
        raise Problem(401, "the API token is invalid, expired or revoked", headers=challenge)
    return principal


def _authorize(route: Route, principal: Principal, request: web.Request) -> None:
    assert route.kind is not None
    resource_id = request.match_info.get(route.id_param) if route.id_param else None
    if authorize(principal, route.action, Resource(route.kind, resource_id)):
        return
    logger.warning(
        "refused %s %s to %s (role %s)",
        request.method,
        request.path,
        principal.actor,
        principal.role,
    )
    if (
        principal.role == "device"
        and route.kind == "device"
        and resource_id is not None
        and resource_id != principal.device_id
    ):
        raise Problem(404, f"no device {resource_id!r}")
    raise Problem(403, f"role {principal.role!r} may not {route.action} {route.kind} resources")


def _clean(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _bind(route: Route) -> Handler:
    action = f"{route.method} {route.path}"

    async def handle(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CTX_KEY]
        principal: Principal | None = None
        if route.kind is not None:
            principal = await _authenticate(request, ctx)
            _authorize(route, principal, request)
        result = await route.handler(Call(request, ctx, principal))
        if not isinstance(result, Reply):
            return result
        if principal is not None and route.method != "GET" and result.status < 400:
            target = _clean(result.target)
            await asyncio.to_thread(
                ctx.audit.append,
                actor=principal.actor,
                role=principal.role,
                action=action,
                target=target,
                outcome=result.status,
                detail=result.detail,
            )
            logger.info(
                "%s %s by %s (%s) -> %d",
                action,
                target,
                principal.actor,
                principal.role,
                result.status,
            )
        return web.json_response(result.body, status=result.status)

    handle.__name__ = route.operation_id
    return handle


def _count(requests: RequestCounter) -> Any:
    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        pattern = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            requests.add(request.method, pattern, exc.status)
            raise
        requests.add(request.method, pattern, response.status)
        return response

    return count


async def _close_streams(app: web.Application) -> None:
    app[CTX_KEY].events.close()


def make_app(ctx: HubContext) -> web.Application:
    """Build the hub's application around its services.

    Args:
        ctx: the services; the app owns none of them (the caller closes them)
            except that shutting the app down closes ``ctx.events``.
    """
    requests = RequestCounter()
    app = web.Application(
        client_max_size=ctx.max_body_bytes,
        middlewares=[_count(requests), error_middleware],
    )
    app[CTX_KEY] = ctx
    app[REQUESTS_KEY] = requests
    app[OPENAPI_KEY] = build_openapi(ROUTES)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _bind(route))
    app.on_shutdown.append(_close_streams)
    return app
