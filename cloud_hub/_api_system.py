"""Routes open without an API token (health, metrics, OpenAPI, enroll) and the event stream."""

from __future__ import annotations

import json
import logging
from typing import Any, Final

from aiohttp import web

from cloud_hub._api_common import Call, Reply, Route
from cloud_hub._problems import Problem, parse_json, read_body, validate_model
from cloud_hub.enrollment import (
    BrokerUnavailableError,
    RegionNotServedError,
    UnknownProfileError,
)
from cloud_hub.metrics import CONTENT_TYPE as METRICS_TYPE
from cloud_hub.metrics import render
from cloud_hub.store import RolloutRecord
from edge_agent._enroll_wire import ENROLL_PATH, EnrollRequest, EnrollResponse

__all__ = ["HEARTBEAT_S", "OPENAPI_PATH", "ROUTES"]

logger = logging.getLogger(__name__)

OPENAPI_PATH: Final = "/api/v1/openapi.json"
HEARTBEAT_S: Final = 15.0
_MAX_ROLLOUT_PAGES: Final = 100


async def healthz(call: Call) -> Reply:
    """``GET /healthz``: the process answers."""
    return Reply({"status": "ok"})


async def metrics(call: Call) -> web.Response:
    """``GET /metrics``: Prometheus text."""
    from cloud_hub.app import REQUESTS_KEY  # noqa: PLC0415 - app imports this module

    ctx = call.ctx
    rollouts: list[RolloutRecord] = []
    cursor: str | None = None
    for _ in range(_MAX_ROLLOUT_PAGES):
        page = await ctx.store.list_rollouts(cursor=cursor, limit=1000)
        rollouts.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    text = render(
        device_counts=await ctx.store.count_devices(),
        ingest=ctx.stats(),
        rollouts=rollouts,
        requests=call.request.app[REQUESTS_KEY],
        events_published=ctx.events.published_total,
        events_dropped=ctx.events.dropped_total,
        event_subscribers=ctx.events.subscribers,
    )
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_TYPE})


async def openapi(call: Call) -> web.Response:
    """``GET /api/v1/openapi.json``."""
    from cloud_hub.app import OPENAPI_KEY  # noqa: PLC0415

    return web.json_response(call.request.app[OPENAPI_KEY])


async def enroll(call: Call) -> Reply:
    """``POST /api/v1/enroll``: a device redeems an enrollment token (no API token)."""
    _, raw = await read_body(call.request, ("application/json",))
    request = validate_model(EnrollRequest, parse_json(raw))
    try:
        answer = await call.ctx.enrollment.redeem(request)
    except UnknownProfileError as exc:
        raise Problem(
            422, str(exc), slug="unknown-profile", errors=[{"loc": ["profile"], "msg": str(exc)}]
        ) from exc
    except (RegionNotServedError, BrokerUnavailableError) as exc:
        raise Problem(503, str(exc), slug="enroll-unavailable") from exc
    # Enrollment audits itself (the caller has no API token); no target here.
    body: dict[str, Any] = answer.model_dump(mode="json", context={"reveal_secrets": True})
    return Reply(body, status=201)


async def event_stream(call: Call) -> web.StreamResponse:
    """``GET /api/v1/events/stream``: fleet events as server-sent events."""
    bus = call.ctx.events
    try:
        sub = bus.subscribe()
    except OverflowError as exc:
        raise Problem(503, str(exc), slug="too-many-streams") from exc
    with sub:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(call.request)
        await response.write(b": connected\n\n")
        try:
            while True:
                event = await sub.get(timeout=HEARTBEAT_S)
                if event is None:
                    if sub.closed:
                        break
                    await response.write(b": heartbeat\n\n")
                    continue
                data = json.dumps(dict(event.data), separators=(",", ":"), default=str)
                lines = f"event: {event.kind}\n"
                if event.seq:
                    lines += f"id: {event.seq}\n"
                await response.write(f"{lines}data: {data}\n\n".encode())
        except ConnectionResetError:
            logger.debug("event stream of %s closed by the client", call.actor)
            return response
    await response.write_eof()
    return response


_PROBLEM_503: Final = (503,)

ROUTES: Final = (
    Route(
        "GET",
        "/healthz",
        healthz,
        "healthz",
        "Liveness: 200 while the hub answers",
        None,
        response={
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string", "const": "ok"}},
        },
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "metrics",
        "Prometheus text exposition of fleet, ingest, rollout and API metrics",
        None,
        media_type="text/plain",
    ),
    Route(
        "GET",
        OPENAPI_PATH,
        openapi,
        "openapi",
        "This OpenAPI 3.1 document",
        None,
        response={"type": "object"},
    ),
    Route(
        "POST",
        ENROLL_PATH,
        enroll,
        "enroll",
        "A device redeems an enrollment token (no API token); refusals are 403 with a reason",
        None,
        "mutate",
        body=EnrollRequest,
        status=(201,),
        response=EnrollResponse.model_json_schema(mode="serialization"),
        problems=(403, *_PROBLEM_503),
    ),
    Route(
        "GET",
        "/api/v1/events/stream",
        event_stream,
        "eventStream",
        "Fleet events as server-sent events (event: kind, data: JSON); heartbeat comments",
        "event",
        media_type="text/event-stream",
        problems=_PROBLEM_503,
    ),
)
