"""Issue #5's bad-input acceptance: each refused call answers a problem and changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.auth import Role
from cloud_hub.store import DeviceQuery
from tests.hub.api_harness import REGION, Hub, running_hub
from tests.hub.test_api import enroll_devices, manifest

LIMIT = 64 * 1024


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with running_hub(tmp_path, max_body_bytes=LIMIT) as served:
        await enroll_devices(served, 2, labels={"site": "a"})
        await served.ok("POST", "/api/v1/deployments", "operator", json=manifest())
        yield served


async def snapshot(hub: Hub) -> dict[str, Any]:
    """Everything the hub stores, to compare before and after a refused call."""
    store = hub.ctx.store
    devices = await store.list_devices(DeviceQuery(limit=1000))
    deployments = await store.list_deployments(limit=1000, include_deleted=True)
    history = {d.name: await store.deployment_history(d.name) for d in deployments.items}
    return {
        "devices": devices.items,
        "deployments": history,
        "rollouts": (await store.list_rollouts(limit=1000)).items,
        "assignments": await store.list_assignments(),
        "enroll_tokens": (await store.list_enroll_tokens(limit=1000)).items,
        "api_tokens": await asyncio.to_thread(hub.ctx.tokens.list),
        "audit_head": await asyncio.to_thread(hub.ctx.audit.head),
        "desired_writes": len(hub.services.writer.writes),
    }


async def test_oversized_body_is_413(hub: Hub) -> None:
    before = await snapshot(hub)
    big = manifest() | {"padding": "x" * (LIMIT + 1)}
    body = await hub.problem(413, "POST", "/api/v1/deployments", "operator", json=big)
    assert body["type"].endswith("/content-too-large")
    big_yaml = "kind: Deployment\n# " + "x" * (LIMIT + 10) + "\n"
    await hub.problem(
        413,
        "POST",
        "/api/v1/deployments",
        "operator",
        data=big_yaml,
        headers={"Content-Type": "application/yaml"},
    )
    await hub.problem(
        413,
        "POST",
        "/api/v1/enroll",
        None,
        data=b"{" * (LIMIT + 1),
        headers={"Content-Type": "application/json"},
    )
    assert await snapshot(hub) == before


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/api/v1/deployments", '{"kind": "Deployment",'),
        ("/api/v1/deployments", '{"kind": "Deployment", "kind": "Deployment"}'),
        ("/api/v1/deployments", '{"x": NaN}'),
        ("/api/v1/enrollment-tokens", "{name: b}"),
        ("/api/v1/enroll", "\xff\xfe"),
        ("/api/v1/tokens", ""),
    ],
)
async def test_malformed_json_is_400(hub: Hub, path: str, text: str) -> None:
    before = await snapshot(hub)
    role: Role | None = None if path == "/api/v1/enroll" else "admin"
    body = await hub.problem(
        400,
        "POST",
        path,
        role,
        data=text.encode("latin-1"),
        headers={"Content-Type": "application/json"},
    )
    assert body["type"].endswith("/bad-json")
    assert body["detail"].startswith("malformed JSON")
    assert await snapshot(hub) == before


async def test_malformed_yaml_is_400(hub: Hub) -> None:
    before = await snapshot(hub)
    for text in ("kind: [Deployment\n", "a: 1\na: 2\n", "\t- x"):
        body = await hub.problem(
            400,
            "POST",
            "/api/v1/deployments",
            "operator",
            data=text,
            headers={"Content-Type": "application/yaml"},
        )
        assert body["type"].endswith("/bad-yaml")
    assert await snapshot(hub) == before


@pytest.mark.parametrize(
    ("method", "path", "payload", "loc"),
    [
        ("POST", "/api/v1/deployments", manifest() | {"surprise": 1}, ["surprise"]),
        ("POST", "/api/v1/deployments", manifest(replicas=-1), ["spec", "replicas"]),
        ("POST", "/api/v1/enrollment-tokens", {"name": "t", "region": REGION, "x": 1}, ["x"]),
        (
            "POST",
            "/api/v1/enrollment-tokens",
            {"name": "t", "region": REGION, "max_uses": 0},
            ["max_uses"],
        ),
        ("POST", "/api/v1/tokens", {"name": "t", "role": "viewer", "admin": True}, ["admin"]),
        ("PATCH", "/api/v1/devices/{device}", {"labels": {}, "region": "x"}, ["region"]),
        ("PATCH", "/api/v1/devices/{device}", {"labels": {"bad key": "v"}}, ["labels", "bad key"]),
        ("POST", "/api/v1/deployments", [1, 2], []),
    ],
)
async def test_unknown_or_invalid_field_is_422(
    hub: Hub, method: str, path: str, payload: Any, loc: list[str]
) -> None:
    device = (await hub.ctx.store.list_devices(DeviceQuery())).items[0].id
    before = await snapshot(hub)
    body = await hub.problem(422, method, path.format(device=device), json=payload)
    assert body["errors"], body
    if loc:
        assert any(e["loc"][: len(loc)] == loc for e in body["errors"]), body["errors"]
    if "surprise" in loc or "x" in loc or "admin" in loc or "region" in loc:
        assert body["type"].endswith("/unknown-field")
    assert await snapshot(hub) == before


async def test_unsupported_content_type_is_415(hub: Hub) -> None:
    before = await snapshot(hub)
    text = json.dumps(manifest(command="9"))
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/json; charset=latin-1",
    ):
        await hub.problem(
            415,
            "POST",
            "/api/v1/deployments",
            "operator",
            data=text,
            headers={"Content-Type": content_type},
        )
    await hub.problem(
        415,
        "POST",
        "/api/v1/enrollment-tokens",
        data=yaml_text({"name": "t", "region": REGION}),
        headers={"Content-Type": "application/yaml"},
    )
    assert await snapshot(hub) == before


def yaml_text(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data)


async def test_viewer_cannot_mutate(hub: Hub) -> None:
    device = (await hub.ctx.store.list_devices(DeviceQuery())).items[0].id
    before = await snapshot(hub)
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/api/v1/deployments", manifest(command="7")),
        ("DELETE", "/api/v1/deployments/web", None),
        ("POST", "/api/v1/rollouts/web/pause", None),
        ("POST", "/api/v1/rollouts/web/undo", None),
        ("PATCH", f"/api/v1/devices/{device}", {"labels": {"x": "y"}}),
        ("DELETE", f"/api/v1/devices/{device}", None),
        ("POST", "/api/v1/enrollment-tokens", {"name": "t", "region": REGION}),
        ("POST", "/api/v1/tokens", {"name": "t", "role": "admin"}),
    ]
    for method, path, payload in calls:
        body = await hub.problem(403, method, path, "viewer", json=payload)
        assert "viewer" in body["detail"]
    assert await snapshot(hub) == before


async def test_device_token_cannot_read_another_device(hub: Hub) -> None:
    other = (await hub.ctx.store.list_devices(DeviceQuery())).items[0].id
    before = await snapshot(hub)
    for path in (f"/api/v1/devices/{other}", f"/api/v1/devices/{other}/events"):
        body = await hub.problem(404, "GET", path, "device")
        assert body["detail"] == f"no device {other!r}"  # as if it did not exist
    await hub.problem(404, "PATCH", f"/api/v1/devices/{other}", "device", json={"labels": {}})
    await hub.problem(403, "GET", "/api/v1/devices", "device")
    await hub.problem(403, "POST", "/api/v1/deployments", "device", json=manifest())
    assert await snapshot(hub) == before


async def test_workload_name_conflicts_are_422_before_storing(hub: Hub) -> None:
    before = await snapshot(hub)
    taken = manifest("web2")
    taken["spec"]["workload"]["name"] = "web"  # the name "web" uses
    body = await hub.problem(422, "POST", "/api/v1/deployments", "operator", json=taken)
    assert body["errors"][0]["loc"] == ["spec", "workload", "name"]
    renamed = manifest("web")
    renamed["spec"]["workload"]["name"] = "web-2"
    await hub.problem(422, "POST", "/api/v1/deployments", "operator", json=renamed)
    assert await snapshot(hub) == before
