"""The OpenAPI document matches the routes the app serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cloud_hub.app import OPENAPI_KEY, ROUTES, make_app
from tests.hub.api_harness import build_services, close_services

_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


async def _app(tmp_path: Path) -> tuple[web.Application, Any]:
    services = await build_services(tmp_path)
    return make_app(services.ctx), services


def _app_operations(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method in ("HEAD", "*"):
            continue
        out.add((route.method, str(path)))
    return out


async def test_document_operations_equal_app_routes(tmp_path: Path) -> None:
    app, services = await _app(tmp_path)
    try:
        doc = app[OPENAPI_KEY]
        documented = {
            (method.upper(), path)
            for path, item in doc["paths"].items()
            for method in item
            if method in _METHODS
        }
        assert documented == _app_operations(app)
        assert len(documented) == len(ROUTES)
    finally:
        await close_services(services)


async def test_document_shape(tmp_path: Path) -> None:
    app, services = await _app(tmp_path)
    try:
        doc: dict[str, Any] = app[OPENAPI_KEY]
    finally:
        await close_services(services)
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for path, item in doc["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, op in item.items():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == names, (method, path)
            protected = op["security"] != []
            statuses = set(op["responses"])
            if protected:
                assert {"401", "403"} <= statuses, (method, path)
            if "requestBody" in op:
                assert {"400", "413", "415", "422"} <= statuses, (method, path)
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"]
    # request bodies come from the pydantic models, $defs hoisted into components
    enroll = doc["paths"]["/api/v1/enroll"]["post"]
    assert enroll["security"] == []
    ref = enroll["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["additionalProperties"] is False
    assert set(body["required"]) == {"token", "public_key", "facts", "profile"}
    apply = doc["paths"]["/api/v1/deployments"]["post"]
    assert set(apply["requestBody"]["content"]) >= {"application/json", "application/yaml"}
    assert set(apply["responses"]) >= {"200", "201", "422"}
    text = str(doc)
    for ref_target in re.findall(r"#/components/schemas/(\w+)", text):
        assert ref_target in doc["components"]["schemas"]
    assert "#/$defs/" not in text


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/api/v1/openapi.json"])
async def test_open_routes_documented_without_security(tmp_path: Path, path: str) -> None:
    app, services = await _app(tmp_path)
    try:
        assert app[OPENAPI_KEY]["paths"][path]["get"]["security"] == []
    finally:
        await close_services(services)
