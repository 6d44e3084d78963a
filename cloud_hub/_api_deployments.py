"""Routes of ``/api/v1/deployments`` and ``/api/v1/rollouts``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Final, get_args

from cloud_hub._api_common import (
    Call,
    QueryParam,
    Reply,
    Route,
    cursor_param,
    deployment_json,
    iso_ms,
    limit_param,
    list_reply,
    list_schema,
    object_schema,
    page_query,
    rollout_json,
)
from cloud_hub._exceptions import RolloutDecodeError
from cloud_hub._problems import (
    JSON_TYPE,
    Problem,
    parse_json,
    parse_yaml,
    query_one,
    read_body,
    validate_model,
)
from cloud_hub.manifests import Deployment
from cloud_hub.rollout import Rollout, RolloutPhase
from cloud_hub.store import NotFoundError, RolloutRecord

__all__ = ["ROUTES"]

logger = logging.getLogger(__name__)

_PHASES: Final = (*get_args(RolloutPhase), "deleted")  # the controller's phase of a deletion
_BODY_TYPES: Final = (JSON_TYPE, "application/yaml", "application/x-yaml", "text/yaml")


def _rollout_view(record: RolloutRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    view = rollout_json(record)
    try:
        status = Rollout.from_dict(record.state).status()
    except RolloutDecodeError as exc:
        logger.warning("rollout of %s cannot be decoded: %s", record.deployment, exc)
        return view | {"status": None}
    return view | {"status": dataclasses.asdict(status)}


async def _current_rollout(call: Call, name: str) -> RolloutRecord | None:
    try:
        return await call.ctx.store.get_rollout(name)
    except NotFoundError:
        return None


def _workload_of(document: Mapping[str, Any]) -> Any:
    spec = document.get("spec")
    workload = spec.get("workload") if isinstance(spec, Mapping) else None
    return workload.get("name") if isinstance(workload, Mapping) else None


async def _check_workload_name(call: Call, manifest: Deployment) -> None:
    """Refuse before storing what the controller would refuse after: a workload name
    used by another live deployment, or changed between versions (422)."""
    workload = manifest.spec.workload.name
    cursor: str | None = None
    while True:
        page = await call.ctx.store.list_deployments(cursor=cursor, limit=1000)
        for record in page.items:
            other = _workload_of(record.document)
            if record.name == manifest.name and other not in (None, workload):
                detail = f"the workload name cannot change between versions (it is {other!r})"
            elif record.name != manifest.name and other == workload:
                detail = f"workload name {workload!r} is used by deployment {record.name!r}"
            else:
                continue
            loc = ["spec", "workload", "name"]
            raise Problem(422, detail, slug="placement", errors=[{"loc": loc, "msg": detail}])
        cursor = page.next_cursor
        if cursor is None:
            return


async def apply_deployment(call: Call) -> Reply:
    """``POST /api/v1/deployments``: a manifest as JSON or YAML."""
    media_type, raw = await read_body(call.request, _BODY_TYPES)
    data = parse_json(raw) if media_type == JSON_TYPE else parse_yaml(raw)
    manifest = validate_model(Deployment, data)
    await _check_workload_name(call, manifest)
    record, new = await call.ctx.store.put_deployment(
        manifest.name, manifest.to_document(), call.actor, call.now_ms()
    )
    if new:
        rollout = await call.ctx.controller.apply(record)
        call.ctx.events.publish(
            "deployment.applied", {"name": record.name, "version": record.version}
        )
    else:
        rollout = await _current_rollout(call, record.name)
    return Reply(
        {"deployment": deployment_json(record), "rollout": _rollout_view(rollout)},
        status=201 if new else 200,
        target=f"deployment/{record.name}",
        detail={"version": record.version, "changed": new},
    )


async def list_deployments(call: Call) -> Reply:
    """``GET /api/v1/deployments``."""
    cursor, limit = page_query(call)
    page = await call.ctx.store.list_deployments(cursor=cursor, limit=limit)
    return list_reply(map(deployment_json, page.items), page.next_cursor)


async def get_deployment(call: Call) -> Reply:
    """``GET /api/v1/deployments/{name}``: latest version, rollout, assignments."""
    name = call.path("name")
    record = await call.ctx.store.get_deployment(name)
    rollout = await _current_rollout(call, name)
    assignments = await call.ctx.store.list_assignments(deployment=name)
    return Reply(
        deployment_json(record)
        | {
            "rollout": _rollout_view(rollout),
            "assignments": [
                {"device_id": a.device_id, "assigned_at": iso_ms(a.assigned_at_ms)}
                for a in assignments
            ],
        }
    )


async def deployment_history(call: Call) -> Reply:
    """``GET /api/v1/deployments/{name}/history``: every version, oldest first."""
    records = await call.ctx.store.deployment_history(call.path("name"))
    return list_reply(map(deployment_json, records))


async def delete_deployment(call: Call) -> Reply:
    """``DELETE /api/v1/deployments/{name}``: a deleted version; workloads are removed."""
    name = call.path("name")
    latest = await call.ctx.store.get_deployment(name)
    if latest.deleted:
        raise Problem(404, f"deployment {name!r} is deleted already")
    record = await call.ctx.store.delete_deployment(name, call.actor, call.now_ms())
    await call.ctx.controller.delete(record)
    call.ctx.events.publish("deployment.deleted", {"name": name, "version": record.version})
    return Reply(
        deployment_json(record), target=f"deployment/{name}", detail={"version": record.version}
    )


async def list_rollouts(call: Call) -> Reply:
    """``GET /api/v1/rollouts``."""
    cursor, limit = page_query(call)
    phase = query_one(call.request, "phase", max_len=64)
    if phase is not None and phase not in _PHASES:
        raise Problem(400, f"phase must be one of {', '.join(_PHASES)}", slug="bad-query")
    page = await call.ctx.store.list_rollouts(phase=phase, cursor=cursor, limit=limit)
    return list_reply(map(rollout_json, page.items), page.next_cursor)


async def get_rollout(call: Call) -> Reply:
    """``GET /api/v1/rollouts/{name}``: the state and its progress summary."""
    record = await call.ctx.store.get_rollout(call.path("name"))
    return Reply(_rollout_view(record))


def _command(command: str) -> Any:
    async def handler(call: Call) -> Reply:
        name = call.path("name")
        controller = call.ctx.controller
        method = {
            "pause": controller.pause,
            "resume": controller.resume,
            "undo": controller.undo,
        }[command]
        record = await method(name, call.actor)
        call.ctx.events.publish(f"rollout.{command}", {"deployment": name, "phase": record.phase})
        return Reply(
            _rollout_view(record),
            target=f"rollout/{name}",
            detail={"command": command, "phase": record.phase, "version": record.version},
        )

    handler.__name__ = f"{command}_rollout"
    handler.__doc__ = f"``POST /api/v1/rollouts/{{name}}/{command}``."
    return handler


_DEPLOYMENT: Final = object_schema(
    ["name", "version", "document", "created_at", "actor", "deleted"],
    {
        "name": {"type": "string"},
        "version": {"type": "integer", "minimum": 1},
        "document": {"type": "object"},
        "created_at": {"type": ["string", "null"], "format": "date-time"},
        "actor": {"type": "string"},
        "deleted": {"type": "boolean"},
    },
)
_ROLLOUT: Final = object_schema(
    ["deployment", "version", "phase", "state", "updated_at"],
    {
        "deployment": {"type": "string"},
        "version": {"type": "integer"},
        "phase": {"type": "string"},
        "state": {"type": "object"},
        "updated_at": {"type": ["string", "null"], "format": "date-time"},
        "status": {"type": ["object", "null"]},
    },
)
_ROLLOUT_OR_NULL: Final = {"anyOf": [_ROLLOUT, {"type": "null"}]}


_NAME: Final = "/api/v1/deployments/{name}"
_ROLLOUT_PATH: Final = "/api/v1/rollouts/{name}"

ROUTES: Final = (
    Route(
        "POST",
        "/api/v1/deployments",
        apply_deployment,
        "applyDeployment",
        "Apply a Deployment manifest (JSON or YAML): 201 new version, 200 unchanged",
        "deployment",
        "mutate",
        body_types=_BODY_TYPES,
        body_schema=Deployment.model_json_schema(by_alias=True),
        status=(201, 200),
        response=object_schema(
            ["deployment", "rollout"], {"deployment": _DEPLOYMENT, "rollout": {}}
        ),
        problems=(409,),
    ),
    Route(
        "GET",
        "/api/v1/deployments",
        list_deployments,
        "listDeployments",
        "Latest version of each deployment",
        "deployment",
        query=(cursor_param, limit_param),
        response=list_schema(_DEPLOYMENT),
    ),
    Route(
        "GET",
        _NAME,
        get_deployment,
        "getDeployment",
        "A deployment's latest version, rollout and placement",
        "deployment",
        id_param="name",
        response={
            **_DEPLOYMENT,
            "required": [*_DEPLOYMENT["required"], "rollout", "assignments"],
        },
    ),
    Route(
        "GET",
        _NAME + "/history",
        deployment_history,
        "deploymentHistory",
        "Every version of a deployment, oldest first",
        "deployment",
        id_param="name",
        response=list_schema(_DEPLOYMENT),
    ),
    Route(
        "DELETE",
        _NAME,
        delete_deployment,
        "deleteDeployment",
        "Delete a deployment: its workloads are removed from the devices",
        "deployment",
        "mutate",
        id_param="name",
        response=_DEPLOYMENT,
    ),
    Route(
        "GET",
        "/api/v1/rollouts",
        list_rollouts,
        "listRollouts",
        "Current rollouts, filtered by phase",
        "rollout",
        query=(
            QueryParam("phase", {"type": "string", "enum": list(_PHASES)}, "rollout phase"),
            cursor_param,
            limit_param,
        ),
        response=list_schema(_ROLLOUT),
    ),
    Route(
        "GET",
        _ROLLOUT_PATH,
        get_rollout,
        "getRollout",
        "A deployment's current rollout with its progress",
        "rollout",
        id_param="name",
        response=_ROLLOUT,
    ),
    *(
        Route(
            "POST",
            f"{_ROLLOUT_PATH}/{command}",
            _command(command),
            f"{command}Rollout",
            f"{command.capitalize()} a rollout; 409 when its phase does not allow it",
            "rollout",
            "mutate",
            id_param="name",
            response=_ROLLOUT,
            problems=(409, 422),
        )
        for command in ("pause", "resume", "undo")
    ),
)
