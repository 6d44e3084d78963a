"""Routes of ``/api/v1/devices``: list, detail, labels, decommission, events."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Annotated, Any, Final, get_args

from pydantic import Field

from cloud_hub._api_common import (
    Call,
    Frozen,
    QueryParam,
    Reply,
    Route,
    cursor_param,
    device_json,
    iso_ms,
    limit_param,
    list_reply,
    list_schema,
    page_query,
)
from cloud_hub._problems import (
    Problem,
    parse_json,
    query_int,
    query_one,
    read_body,
    validate_model,
)
from cloud_hub.manifests import LabelKey, LabelValue
from cloud_hub.store import MAX_PAGE_LIMIT, DeviceQuery, DeviceStatus
from sync._exceptions import NovaCronError

__all__ = ["ROUTES", "LabelsPatch"]

logger = logging.getLogger(__name__)

_STATUSES: Final = get_args(DeviceStatus)
_MAX_LABELS: Final = 64
# Query parameter patterns (ASCII: the whole request line must stay under 8 KiB)
_LABEL: Final = "[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
_REGION: Final = "^[A-Za-z0-9._:@-]{1,64}$"
_PROFILE: Final = "^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_STREAM: Final = "^[A-Za-z0-9._-]{1,128}$"


class LabelsPatch(Frozen):
    """Body of ``PATCH /api/v1/devices/{id}``: the device's new labels (replaced whole)."""

    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=_MAX_LABELS)]


def _jsonable(value: Any) -> Any:
    """Replicated values as JSON: bytes become base64, other odd types their repr."""
    match value:
        case None | bool() | int() | str():
            return value
        case float():
            return value if math.isfinite(value) else None
        case bytes() | bytearray() | memoryview():
            return base64.b64encode(bytes(value)).decode()
        case Mapping():
            return {str(k): _jsonable(v) for k, v in value.items()}
        case list() | tuple():
            return [_jsonable(v) for v in value]
    return repr(value)


def _decode_scope(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    from sync._msgpack_strict import unpackb_strict  # noqa: PLC0415
    from sync.crdt import LwwMap  # noqa: PLC0415

    return LwwMap.from_wire(unpackb_strict(raw)).to_dict()


async def _state(call: Call, device_id: str) -> dict[str, Any]:
    from sync.signed import unwrap  # noqa: PLC0415

    store = call.ctx.store
    state: dict[str, Any] = {"desired": {}, "reported": {}, "overrides": {}}
    desired_raw, own_raw = await asyncio.gather(
        store.get_scope(f"desired/{device_id}"), store.get_scope(f"device/{device_id}")
    )
    try:
        desired = _decode_scope(desired_raw)
        own = _decode_scope(own_raw)
    except (NovaCronError, ValueError, TypeError) as exc:
        logger.warning("device %s: stored state cannot be decoded: %s", device_id, exc)
        return state | {"error": "the stored state cannot be decoded"}
    state["desired"] = {k: _jsonable(unwrap(v)) for k, v in sorted(desired.items())}
    for key, value in sorted(own.items()):
        kind, _, name = key.partition("/")
        if kind == "reported":
            state["reported"][name] = _jsonable(value)
        elif kind == "override":
            state["overrides"][name] = _jsonable(value)
    return state


def _labels_query(call: Call) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in call.request.query.getall("label", []):
        key, sep, value = item.partition("=")
        if not sep or not key or len(item) > 200 or key in labels:
            raise Problem(400, f"label filter {item!r:.80} must be key=value", slug="bad-query")
        labels[key] = value
    return labels


async def list_devices(call: Call) -> Reply:
    """``GET /api/v1/devices``."""
    cursor, limit = page_query(call)
    status = query_one(call.request, "status")
    if status is not None and status not in _STATUSES:
        raise Problem(400, f"status must be one of {', '.join(_STATUSES)}", slug="bad-query")
    query = DeviceQuery(
        labels=_labels_query(call),
        region=query_one(call.request, "region"),
        profile=query_one(call.request, "profile"),
        status=status,  # type: ignore[arg-type]
        cursor=cursor,
        limit=limit,
    )
    page = await call.ctx.store.list_devices(query)
    return list_reply(map(device_json, page.items), page.next_cursor)


async def get_device(call: Call) -> Reply:
    """``GET /api/v1/devices/{id}``: record, health, replicated state, assignments."""
    device_id = call.path("id")
    # Independent reads, concurrently: the store answers each from its reader pool.
    device, assignments, state = await asyncio.gather(
        call.ctx.store.get_device(device_id),
        call.ctx.store.list_assignments(device_id=device_id),
        _state(call, device_id),
    )
    health = call.ctx.health.device(device_id, call.now_ms())
    body = device_json(device) | {
        "health": None if health is None else dataclasses.asdict(health),
        "state": state,
        "assignments": [
            {"deployment": a.deployment, "assigned_at": iso_ms(a.assigned_at_ms)}
            for a in assignments
        ],
    }
    return Reply(body)


async def patch_device(call: Call) -> Reply:
    """``PATCH /api/v1/devices/{id}``: replace the labels."""
    device_id = call.path("id")
    _, raw = await read_body(call.request, ("application/json",))
    patch = validate_model(LabelsPatch, parse_json(raw))
    device = await call.ctx.store.set_device_labels(device_id, patch.labels)
    call.ctx.events.publish("device.updated", {"id": device_id, "labels": dict(device.labels)})
    return Reply(
        device_json(device),
        target=f"device/{device_id}",
        detail={"labels": dict(device.labels)},
    )


async def delete_device(call: Call) -> Reply:
    """``DELETE /api/v1/devices/{id}``: decommission (admin)."""
    device_id = call.path("id")
    device = await call.ctx.enrollment.decommission(device_id)
    call.ctx.health.forget(device_id)
    return Reply(
        device_json(device), target=f"device/{device_id}", detail={"region": device.region}
    )


async def device_events(call: Call) -> Reply:
    """``GET /api/v1/devices/{id}/events``."""
    device_id = call.path("id")
    stream = query_one(call.request, "stream", max_len=128)
    after = query_int(call.request, "after", 0, 0, 2**62)
    limit = query_int(call.request, "limit", 100, 1, MAX_PAGE_LIMIT)
    await call.ctx.store.get_device(device_id)  # 404 for an unknown device
    events = await call.ctx.store.list_events(
        device_id, stream=stream, after_seq=after, limit=limit
    )
    items = [
        {
            "stream": e.stream,
            "seq": e.seq,
            "ingested_at": iso_ms(e.ingested_at_ms),
            "body": _jsonable(e.body),
        }
        for e in events
    ]
    return list_reply(items)


_DEVICE: Final = {
    "type": "object",
    "required": ["id", "region", "profile", "public_key", "arch", "labels", "status"],
    "properties": {
        "id": {"type": "string"},
        "region": {"type": "string"},
        "profile": {"type": "string"},
        "public_key": {"type": "string"},
        "arch": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "facts": {"type": "object"},
        "enrolled_at": {"type": ["string", "null"], "format": "date-time"},
        "token_id": {"type": ["string", "null"]},
        "mqtt_username": {"type": "string"},
        "status": {"type": "string", "enum": list(_STATUSES)},
        "last_seen": {"type": ["string", "null"], "format": "date-time"},
    },
}


DEVICE_SCHEMA: Final = _DEVICE
DEVICE_LIST_SCHEMA: Final = list_schema(_DEVICE)
_DETAIL: Final = {
    **_DEVICE,
    "required": [*_DEVICE["required"], "health", "state", "assignments"],
}
_EVENT: Final = {
    "type": "object",
    "required": ["stream", "seq", "ingested_at", "body"],
    "properties": {
        "stream": {"type": "string"},
        "seq": {"type": "integer"},
        "ingested_at": {"type": ["string", "null"]},
        "body": {},
    },
}

_ID_PATH: Final = "/api/v1/devices/{id}"

ROUTES: Final = (
    Route(
        "GET",
        "/api/v1/devices",
        list_devices,
        "listDevices",
        "List devices, filtered by labels, region, profile and status",
        "device",
        query=(
            QueryParam(
                "label",
                {"type": "string", "pattern": f"^{_LABEL}={_LABEL}?$"},
                "key=value; repeat for several (all must match)",
                repeated=True,
            ),
            QueryParam("region", {"type": "string", "pattern": _REGION}, "region"),
            QueryParam("profile", {"type": "string", "pattern": _PROFILE}, "firmware profile"),
            QueryParam("status", {"type": "string", "enum": list(_STATUSES)}, "health status"),
            cursor_param,
            limit_param,
        ),
        response=DEVICE_LIST_SCHEMA,
    ),
    Route(
        "GET",
        _ID_PATH,
        get_device,
        "getDevice",
        "A device with its health, replicated state and assignments",
        "device",
        id_param="id",
        response=_DETAIL,
    ),
    Route(
        "PATCH",
        _ID_PATH,
        patch_device,
        "patchDevice",
        "Replace a device's labels",
        "device",
        "mutate",
        id_param="id",
        body=LabelsPatch,
        response=_DEVICE,
    ),
    Route(
        "DELETE",
        _ID_PATH,
        delete_device,
        "deleteDevice",
        "Decommission a device (admin): remove it and its broker account",
        "device",
        "admin",
        id_param="id",
        response=_DEVICE,
    ),
    Route(
        "GET",
        _ID_PATH + "/events",
        device_events,
        "listDeviceEvents",
        "A device's ingested events, (stream, seq) ascending",
        "device",
        id_param="id",
        query=(
            QueryParam("stream", {"type": "string", "pattern": _STREAM}, "only this stream"),
            QueryParam(
                "after", {"type": "integer", "minimum": 0, "maximum": 2**62}, "seq to start after"
            ),
            limit_param,
        ),
        response=list_schema(_EVENT),
    ),
)
