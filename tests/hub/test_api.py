"""The hub's REST API on a real app, real SQLite files and the real fleet controller."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.hub.api_harness import OTHER_REGION, PROBLEM, REGION, Hub, running_hub


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with running_hub(tmp_path) as served:
        yield served


def manifest(name: str = "web", *, command: str = "1", **spec: Any) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "apiVersion": "novacron.io/v1",
        "metadata": {"name": name},
        "spec": {
            "workload": {"name": name, "driver": "process", "command": ["sleep", command]},
            "rollout": {"waves": [{"count": 1}, {"percent": 100}]},
        }
        | spec,
    }


async def enroll_devices(hub: Hub, n: int, **token_fields: Any) -> list[str]:
    token = await hub.enrollment_token(max_uses=n, **token_fields)
    ids = []
    for _ in range(n):
        status, body = await hub.enroll(token)
        assert status == 201, body
        ids.append(body["device_id"])
    return sorted(ids)


# -- open routes, authentication ---------------------------------------------------------


async def test_healthz_and_openapi_need_no_token(hub: Hub) -> None:
    assert await hub.ok("GET", "/healthz", None) == {"status": "ok"}
    doc = await hub.ok("GET", "/api/v1/openapi.json", None)
    assert doc["openapi"] == "3.1.0"


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic dXNlcjpwdw==", "Bearer nct_000000000000_" + "A" * 43, "Bearer x"],
)
async def test_missing_or_invalid_token_is_401(hub: Hub, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    body = await hub.problem(401, "GET", "/api/v1/devices", None, headers=headers)
    assert body["type"].endswith("/unauthorized")
    resp = await hub.call("GET", "/api/v1/devices", None, headers=headers)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_revoked_token_is_401(hub: Hub) -> None:
    created = await hub.ok("POST", "/api/v1/tokens", json={"name": "ci", "role": "viewer"})
    headers = {"Authorization": f"Bearer {created['token']}"}
    await hub.ok("GET", "/api/v1/devices", None, headers=headers)
    await hub.ok("DELETE", f"/api/v1/tokens/{created['id']}")
    await hub.problem(401, "GET", "/api/v1/devices", None, headers=headers)


async def test_unknown_route_and_method_are_problems(hub: Hub) -> None:
    await hub.problem(404, "GET", "/api/v1/nothing-here")
    resp = await hub.call("PUT", "/api/v1/devices")
    assert resp.status == 405
    assert resp.content_type == PROBLEM
    assert "GET" in resp.headers["Allow"]


# -- devices --------------------------------------------------------------------------------


async def test_device_list_filters_and_pagination(hub: Hub) -> None:
    west = await enroll_devices(hub, 3, labels={"site": "a"})
    east = await enroll_devices(hub, 2, region=OTHER_REGION, labels={"site": "b"})

    everything = await hub.ok("GET", "/api/v1/devices", "viewer")
    assert [d["id"] for d in everything["items"]] == sorted(west + east)
    assert everything["next_cursor"] is None

    by_region = await hub.ok("GET", "/api/v1/devices", params={"region": OTHER_REGION})
    assert [d["id"] for d in by_region["items"]] == east
    by_label = await hub.ok("GET", "/api/v1/devices", params={"label": "site=a"})
    assert [d["id"] for d in by_label["items"]] == west
    none = await hub.ok("GET", "/api/v1/devices", params=[("label", "site=a"), ("label", "x=y")])
    assert none["items"] == []
    by_status = await hub.ok("GET", "/api/v1/devices", params={"status": "unknown"})
    assert len(by_status["items"]) == 5
    by_profile = await hub.ok("GET", "/api/v1/devices", params={"profile": "raspberry-pi-4"})
    assert by_profile["items"] == []

    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await hub.ok("GET", "/api/v1/devices", params=params)
        assert len(page["items"]) <= 2
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(west + east)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"cursor": "garbage!!"},
        {"status": "sleepy"},
        {"label": "novalue"},
    ],
)
async def test_bad_query_parameters_are_400(hub: Hub, params: dict[str, str]) -> None:
    await hub.problem(400, "GET", "/api/v1/devices", params=params)


async def test_device_detail_patch_events_and_delete(hub: Hub) -> None:
    (device_id,) = await enroll_devices(hub, 1, labels={"site": "a"})
    detail = await hub.ok("GET", f"/api/v1/devices/{device_id}", "viewer")
    assert detail["id"] == device_id
    assert detail["labels"] == {"site": "a"}
    assert detail["region"] == REGION
    assert detail["state"] == {"desired": {}, "reported": {}, "overrides": {}}
    assert detail["assignments"] == []
    assert detail["health"] is None

    patched = await hub.ok(
        "PATCH", f"/api/v1/devices/{device_id}", "operator", json={"labels": {"site": "b"}}
    )
    assert patched["labels"] == {"site": "b"}
    events = await hub.ok("GET", f"/api/v1/devices/{device_id}/events")
    assert events == {"items": [], "next_cursor": None}

    await hub.problem(403, "DELETE", f"/api/v1/devices/{device_id}", "operator")
    removed = await hub.ok("DELETE", f"/api/v1/devices/{device_id}", "admin")
    assert removed["id"] == device_id
    await hub.problem(404, "GET", f"/api/v1/devices/{device_id}")
    await hub.problem(404, "GET", f"/api/v1/devices/{device_id}/events")
    await hub.problem(404, "PATCH", f"/api/v1/devices/{device_id}", json={"labels": {}})

    audit = await hub.ok("GET", "/api/v1/audit")
    actions = [(e["action"], e["target"]) for e in audit["items"]]
    assert ("PATCH /api/v1/devices/{id}", f"device/{device_id}") in actions
    assert ("DELETE /api/v1/devices/{id}", f"device/{device_id}") in actions


async def test_device_token_reads_only_its_own_device(hub: Hub) -> None:
    (other,) = await enroll_devices(hub, 1)
    own = hub.services.device_token_device
    body = await hub.problem(404, "GET", f"/api/v1/devices/{other}", "device")
    assert other in body["detail"]
    # its own id passes authorization (and is unknown to the store here)
    await hub.problem(404, "GET", f"/api/v1/devices/{own}", "device")
    await hub.problem(403, "GET", "/api/v1/devices", "device")
    await hub.problem(403, "GET", "/api/v1/deployments", "device")


# -- deployments and rollouts -----------------------------------------------------------


async def test_apply_json_then_yaml_versions_and_history(hub: Hub) -> None:
    devices = await enroll_devices(hub, 2)
    first = await hub.call("POST", "/api/v1/deployments", "operator", json=manifest())
    assert first.status == 201, await first.text()
    body = await first.json()
    assert body["deployment"]["version"] == 1
    assert body["rollout"]["deployment"] == "web"
    assert body["rollout"]["status"]["phase"] == body["rollout"]["phase"]
    assert hub.services.writer.devices_running("web")  # the first wave was written

    again = await hub.call("POST", "/api/v1/deployments", "operator", json=manifest())
    assert again.status == 200
    assert (await again.json())["deployment"]["version"] == 1

    text = yaml.safe_dump(manifest(command="2"))
    changed = await hub.call(
        "POST",
        "/api/v1/deployments",
        "operator",
        data=text,
        headers={"Content-Type": "application/yaml"},
    )
    assert changed.status == 201, await changed.text()
    assert (await changed.json())["deployment"]["version"] == 2

    listing = await hub.ok("GET", "/api/v1/deployments", "viewer")
    assert [(d["name"], d["version"]) for d in listing["items"]] == [("web", 2)]
    detail = await hub.ok("GET", "/api/v1/deployments/web", "viewer")
    assert detail["version"] == 2
    assert sorted(a["device_id"] for a in detail["assignments"]) == devices
    history = await hub.ok("GET", "/api/v1/deployments/web/history")
    assert [h["version"] for h in history["items"]] == [1, 2]
    assert history["items"][1]["document"]["spec"]["workload"]["command"] == ["sleep", "2"]

    deleted = await hub.ok("DELETE", "/api/v1/deployments/web", "operator")
    assert deleted["deleted"] is True
    await hub.problem(404, "DELETE", "/api/v1/deployments/web", "operator")
    await hub.problem(404, "GET", "/api/v1/deployments/nope")
    await hub.problem(404, "GET", "/api/v1/deployments/nope/history")

    audit = await hub.ok("GET", "/api/v1/audit")
    applies = [e for e in audit["items"] if e["action"] == "POST /api/v1/deployments"]
    assert [e["outcome"] for e in applies] == [201, 200, 201]
    assert all(e["target"] == "deployment/web" for e in applies)


def healthy(version: str) -> dict[str, Any]:
    return {"name": "web", "version": version, "phase": "running", "healthy": True}


async def test_rollout_commands_and_phase_conflicts(hub: Hub) -> None:
    devices = await enroll_devices(hub, 3)
    await hub.ok("POST", "/api/v1/deployments", "operator", json=manifest())
    rollout = await hub.ok("GET", "/api/v1/rollouts/web", "viewer")
    assert rollout["phase"] == "progressing"
    listing = await hub.ok("GET", "/api/v1/rollouts", params={"phase": "progressing"})
    assert [r["deployment"] for r in listing["items"]] == ["web"]
    assert (await hub.ok("GET", "/api/v1/rollouts", params={"phase": "paused"}))["items"] == []

    conflict = await hub.problem(409, "POST", "/api/v1/rollouts/web/undo", "operator")
    assert conflict["command"] == "undo"  # version 1 has nothing to return to
    paused = await hub.ok("POST", "/api/v1/rollouts/web/pause", "operator")
    assert paused["phase"] == "paused"
    resumed = await hub.ok("POST", "/api/v1/rollouts/web/resume", "operator")
    assert resumed["phase"] == "progressing"

    for _ in range(2):  # wave 1, then wave 2: every device reports version 1 healthy
        for device in devices:
            await hub.services.controller.device_reported(device, {"reported/web": healthy("1")})
    assert (await hub.ok("GET", "/api/v1/rollouts/web"))["phase"] == "succeeded"
    await hub.ok("POST", "/api/v1/deployments", "operator", json=manifest(command="2"))
    undone = await hub.ok("POST", "/api/v1/rollouts/web/undo", "operator")
    assert undone["phase"] in ("rolling_back", "rolled_back")
    assert undone["version"] == 2
    if undone["phase"] == "rolled_back":
        again = await hub.problem(409, "POST", "/api/v1/rollouts/web/undo", "operator")
        assert again["phase"] == "rolled_back"
    await hub.problem(409, "POST", "/api/v1/rollouts/web/pause", "operator")
    audit = await hub.ok("GET", "/api/v1/audit")
    commands = [e["detail"]["command"] for e in audit["items"] if e["target"] == "rollout/web"]
    assert commands == ["pause", "resume", "undo"]
    await hub.problem(403, "POST", "/api/v1/rollouts/web/pause", "viewer")
    await hub.problem(404, "POST", "/api/v1/rollouts/nope/pause", "operator")
    await hub.problem(404, "GET", "/api/v1/rollouts/nope")


# -- tokens and audit -------------------------------------------------------------------


async def test_enrollment_token_routes(hub: Hub) -> None:
    created = await hub.ok(
        "POST",
        "/api/v1/enrollment-tokens",
        "operator",
        json={"name": "b", "region": REGION, "labels": {"k": "v"}, "max_uses": 5, "ttl_s": 60},
    )
    assert created["token"].startswith(f"nce_{created['id']}_")
    assert created["uses"] == 0
    assert created["expires_at"] is not None
    listing = await hub.ok("GET", "/api/v1/enrollment-tokens", "viewer")
    assert [t["id"] for t in listing["items"]] == [created["id"]]
    assert "token" not in listing["items"][0]
    assert "secret_hash" not in listing["items"][0]
    revoked = await hub.ok("DELETE", f"/api/v1/enrollment-tokens/{created['id']}", "operator")
    assert revoked["revoked_at"] is not None
    await hub.problem(404, "DELETE", "/api/v1/enrollment-tokens/000000000000", "operator")
    unknown = await hub.problem(
        422, "POST", "/api/v1/enrollment-tokens", json={"name": "b", "region": "mars"}
    )
    assert unknown["errors"][0]["loc"] == ["region"]
    audit = await hub.ok("GET", "/api/v1/audit")
    assert created["token"] not in json.dumps(audit)


async def test_api_token_routes_are_admin_only(hub: Hub) -> None:
    for role in ("operator", "viewer"):
        await hub.problem(403, "GET", "/api/v1/tokens", role)
        await hub.problem(403, "GET", "/api/v1/audit", role)
        await hub.problem(
            403,
            "POST",
            "/api/v1/tokens",
            role,
            json={"name": "x", "role": "admin"},
        )
    created = await hub.ok(
        "POST", "/api/v1/tokens", json={"name": "gw", "role": "device", "device_id": "gw-1"}
    )
    assert created["role"] == "device"
    listing = await hub.ok("GET", "/api/v1/tokens")
    assert created["id"] in [t["id"] for t in listing["items"]]
    assert all("token" not in t for t in listing["items"])
    await hub.problem(422, "POST", "/api/v1/tokens", json={"name": "x", "role": "device"})
    await hub.problem(422, "POST", "/api/v1/tokens", json={"name": "x", "role": "root"})
    await hub.problem(404, "DELETE", "/api/v1/tokens/000000000000")
    audit = await hub.ok("GET", "/api/v1/audit", params={"after": "0", "limit": "1000"})
    assert created["token"] not in json.dumps(audit)
    entry = next(e for e in audit["items"] if e["action"] == "POST /api/v1/tokens")
    assert entry["detail"] == {"name": "gw", "role": "device", "device_id": "gw-1"}
    assert entry["outcome"] == 201


async def test_audit_pagination(hub: Hub) -> None:
    for i in range(3):
        await hub.ok("POST", "/api/v1/enrollment-tokens", json={"name": f"t{i}", "region": REGION})
    first = await hub.ok("GET", "/api/v1/audit", params={"limit": "2"})
    assert [e["seq"] for e in first["items"]] == [1, 2]
    rest = await hub.ok("GET", "/api/v1/audit", params={"after": first["next_cursor"]})
    assert [e["seq"] for e in rest["items"]] == [3]
    assert rest["next_cursor"] is None


async def test_device_detail_shows_replicated_state(hub: Hub) -> None:
    from sync._msgpack_strict import packb
    from sync.crdt import LwwMap

    (device_id,) = await enroll_devices(hub, 1)
    own = LwwMap()
    own.set("reported/web", healthy("1"), ts=1, origin=device_id)
    own.set("override/web", "stop", ts=2, origin=device_id)
    own.set("other/key", 1, ts=3, origin=device_id)
    desired = LwwMap()
    desired.set("web", {"v": {"name": "web"}, "kid": "k", "sig": b"\x00\x01"}, ts=4, origin="hub")
    await hub.ctx.store.save_scopes(
        {
            f"device/{device_id}": packb(own.to_wire()),
            f"desired/{device_id}": packb(desired.to_wire()),
        }
    )
    state = (await hub.ok("GET", f"/api/v1/devices/{device_id}"))["state"]
    assert state == {
        "desired": {"web": {"name": "web"}},
        "reported": {"web": healthy("1")},
        "overrides": {"web": "stop"},
    }

    await hub.ctx.store.save_scopes({f"device/{device_id}": b"\xc1 not msgpack"})
    broken = (await hub.ok("GET", f"/api/v1/devices/{device_id}"))["state"]
    assert broken["error"] == "the stored state cannot be decoded"
