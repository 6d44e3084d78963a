"""The hub's OpenAPI 3.1 document, built from the route table the app registers.

:func:`build_openapi` walks the same :class:`~cloud_hub._api_common.Route` tuple
that :func:`cloud_hub.app.make_app` registers, so every path, method, parameter,
body schema (JSON Schema from the pydantic models) and response status in the
document is the one the app serves; a test checks that both sets of operations
are equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from cloud_hub._api_common import Route
from cloud_hub._problems import PROBLEM_TYPE

__all__ = ["OPENAPI_VERSION", "PROBLEM_SCHEMA", "build_openapi"]

OPENAPI_VERSION: Final = "3.1.0"
_PATH_PARAM: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REF: Final = "#/components/schemas/{model}"

PROBLEM_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
            },
        },
        "reason": {"type": "string"},
    },
}

_DESCRIPTIONS: Final = {
    200: "OK",
    201: "Created",
    400: "Malformed body, bad query parameter or cursor",
    401: "Missing or invalid API token",
    403: "The token's role does not allow this (or an enrollment token is refused)",
    404: "No such resource",
    409: "Conflict: duplicate, or not allowed in the rollout's phase",
    413: "Body larger than the limit",
    415: "Unsupported content type",
    422: "Well-formed but invalid",
    503: "Temporarily unavailable",
}


def _hoist(schema: Mapping[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """Move a pydantic schema's ``$defs`` into the components and fix its refs."""
    out = dict(schema)
    defs = out.pop("$defs", {})
    for name, sub in defs.items():
        components.setdefault(name, _rewrite_refs(sub))
    rewritten: dict[str, Any] = _rewrite_refs(out)
    return rewritten


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                v.replace("#/$defs/", "#/components/schemas/")
                if k == "$ref" and isinstance(v, str)
                else _rewrite_refs(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def _body_schema(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    if route.body_schema is not None:
        return _hoist(route.body_schema, components)
    assert route.body is not None  # has_body
    name = route.body.__name__
    if name not in components:
        components[name] = {}  # reserve first: a model may refer to itself
        components[name] = _hoist(route.body.model_json_schema(ref_template=_REF), components)
    return {"$ref": _REF.format(model=name)}


def _operation(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^/]+$"},
        }
        for name in _PATH_PARAM.findall(route.path)
    ]
    for q in route.query:
        schema: Mapping[str, Any] = q.schema
        param: dict[str, Any] = {
            "name": q.name,
            "in": "query",
            "required": False,
            "description": q.description,
        }
        if q.repeated:
            param |= {
                "schema": {"type": "array", "items": dict(schema), "maxItems": 8},
                "style": "form",
                "explode": True,
            }
        else:
            param["schema"] = dict(schema)
        params.append(param)
    responses: dict[str, Any] = {}
    for status in route.status:
        if route.response is not None:
            content = {route.media_type: {"schema": _hoist(route.response, components)}}
        else:
            content = {route.media_type: {"schema": {"type": "string"}}}
        responses[str(status)] = {
            "description": _DESCRIPTIONS.get(status, "OK"),
            "content": content,
        }
    problem_ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for status in route.problem_statuses():
        responses[str(status)] = {
            "description": _DESCRIPTIONS.get(status, "Error"),
            "content": {PROBLEM_TYPE: problem_ref},
        }
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": responses,
        "security": [] if route.kind is None else [{"bearer": []}],
    }
    if route.kind is not None:
        op["x-novacron-authorization"] = {"kind": route.kind, "action": route.action}
    if params:
        op["parameters"] = params
    if route.has_body:
        schema_ref = _body_schema(route, components)
        op["requestBody"] = {
            "required": True,
            "content": {t: {"schema": schema_ref} for t in route.body_types},
        }
    return op


def build_openapi(
    routes: Iterable[Route], *, title: str = "NovaCron Edge hub", version: str = "1"
) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document of ``routes``."""
    components: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "Fleet API of the NovaCron Edge cloud hub. Errors are "
            "application/problem+json; lists are {items, next_cursor}; times are RFC 3339 UTC.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
