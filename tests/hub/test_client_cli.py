"""The operator CLI (``apply``, ``get``, ``describe``, ``rollout``, ``enroll-token``).

Most tests run ``novacron`` (``cli.main`` in a worker thread, which runs its own
event loop as the console script does) against a small aiohttp stand-in of the
hub API on port 0: it serves the documented routes with documented-shaped
bodies and records every request, so the tests check both what the CLI sends
and how it prints the answers. The last test runs against the real hub app
(``cloud_hub.app.make_app``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from cloud_hub.client import HubApiError, HubClient, HubResponseError, HubUnreachableError
from novacron import cli
from tests.fixtures_mqtt import free_port

TOKEN = "t0k-operator"
MANIFEST = """\
kind: Deployment
apiVersion: novacron.io/v1
metadata: {name: camera-ingest}
spec:
  workload: {name: ingest, driver: podman, image: "registry.local/ingest:2"}
  selector: {labels: {site: plant-1}, drivers: [podman]}
  mode: replicas
  replicas: 2
"""


# -- the stand-in hub -------------------------------------------------------------------------


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    body = {"type": "https://novacron.io/problems/x", "title": title, "status": status}
    body |= {"detail": detail, **extra}
    return web.json_response(body, status=status, content_type="application/problem+json")


def device(i: int) -> dict[str, Any]:
    return {
        "id": f"gw-{i:02d}",
        "region": "eu-west" if i % 2 else "us-east",
        "profile": "raspberry-pi-4",
        "public_key": "A" * 43 + "=",
        "arch": "aarch64",
        "labels": {"site": "plant-1"} if i < 3 else {"site": "plant-22", "tier": "edge"},
        "facts": {},
        "enrolled_at": "2026-11-26T06:00:00.000Z",
        "token_id": "et-1",
        "mqtt_username": f"gw-{i:02d}",
        "status": "online",
        "last_seen": None if i == 4 else "2026-11-26T06:30:00.000Z",
    }


def rollout_of(name: str, version: int, phase: str) -> dict[str, Any]:
    return {
        "deployment": name,
        "version": version,
        "phase": phase,
        "state": {
            "phase": phase,
            "waves": [1, 2],
            "current": 0,
            "outcome": ["succeeded", "pending"],
            "previous_version": version - 1 or None,
            "reason": "",
        },
        "updated_at": "2026-11-26T06:31:00.000Z",
    }


@dataclass
class StandIn:
    """What the stand-in holds and what it was asked."""

    url: str = ""
    requests: list[tuple[str, str, list[tuple[str, str]]]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=lambda: [device(i) for i in range(5)])
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)


def page(items: list[dict[str, Any]], request: web.Request) -> web.Response:
    start = int(request.query.get("cursor", "0"))
    limit = int(request.query.get("limit", "100"))
    chunk = items[start : start + limit]
    more = start + limit < len(items)
    return web.json_response({"items": chunk, "next_cursor": str(start + limit) if more else None})


def standin_app(state: StandIn) -> web.Application:
    routes = web.RouteTableDef()

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        state.requests.append((request.method, request.path, list(request.query.items())))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return problem(401, "Unauthorized", "missing or invalid API token")
        response: web.StreamResponse = await handler(request)
        return response

    @routes.get("/api/v1/devices")
    async def list_devices(request: web.Request) -> web.Response:
        items = state.devices
        for label in request.query.getall("label", []):
            k, _, v = label.partition("=")
            items = [d for d in items if d["labels"].get(k) == v]
        if "region" in request.query:
            items = [d for d in items if d["region"] == request.query["region"]]
        return page(items, request)

    @routes.get("/api/v1/devices/{id}")
    async def get_device(request: web.Request) -> web.Response:
        wanted = request.match_info["id"]
        for d in state.devices:
            if d["id"] == wanted:
                return web.json_response(
                    {
                        "device": d,
                        "health": {"state": "online", "last_seen": d["last_seen"]},
                        "state": {"desired": {"ingest": {"version": "2"}}, "reported": {}},
                        "assignments": [{"deployment": "camera-ingest", "device_id": d["id"]}],
                    }
                )
        return problem(404, "Not Found", f"no device {wanted!r}")

    @routes.post("/api/v1/deployments")
    async def apply(request: web.Request) -> web.Response:
        doc = await request.json()
        state.bodies.append(doc)
        name = doc["metadata"]["name"]
        if name == "unplaceable":
            return problem(
                422,
                "Unprocessable Content",
                "placement impossible",
                errors=[{"loc": ["spec", "replicas"], "msg": "only 1 device matches"}],
            )
        old = state.deployments.get(name)
        if old is not None and old["document"] == doc:
            return web.json_response({"deployment": old, "rollout": state.rollouts.get(name)})
        version = 1 if old is None else old["version"] + 1
        record = {
            "name": name,
            "version": version,
            "document": doc,
            "created_at": "2026-11-26T06:40:00.000Z",
            "actor": "token:ops",
            "deleted": False,
        }
        state.deployments[name] = record
        state.rollouts[name] = rollout_of(name, version, "progressing")
        return web.json_response(
            {"deployment": record, "rollout": state.rollouts[name]}, status=201
        )

    @routes.get("/api/v1/deployments")
    async def list_deployments(request: web.Request) -> web.Response:
        return page(list(state.deployments.values()), request)

    @routes.get("/api/v1/deployments/{name}")
    async def get_deployment(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in state.deployments:
            return problem(404, "Not Found", f"no deployment {name!r}")
        return web.json_response(
            {
                "deployment": state.deployments[name],
                "rollout": state.rollouts.get(name),
                "assignments": [{"deployment": name, "device_id": "gw-01"}],
            }
        )

    @routes.get("/api/v1/rollouts")
    async def list_rollouts(request: web.Request) -> web.Response:
        items = list(state.rollouts.values())
        if "phase" in request.query:
            items = [r for r in items if r["phase"] == request.query["phase"]]
        return page(items, request)

    @routes.get("/api/v1/rollouts/{name}")
    async def get_rollout(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in state.rollouts:
            return problem(404, "Not Found", f"no rollout {name!r}")
        return web.json_response(state.rollouts[name])

    @routes.post("/api/v1/rollouts/{name}/{command}")
    async def command(request: web.Request) -> web.Response:
        name, cmd = request.match_info["name"], request.match_info["command"]
        rollout = state.rollouts.get(name)
        if rollout is None:
            return problem(404, "Not Found", f"no rollout {name!r}")
        allowed = {"pause": "progressing", "resume": "paused", "undo": "progressing"}
        if rollout["phase"] != allowed.get(cmd):
            return problem(
                409,
                "Not allowed in this rollout phase",
                f"cannot {cmd} a rollout that is {rollout['phase']}",
                command=cmd,
                phase=rollout["phase"],
            )
        new_phase = {"pause": "paused", "resume": "progressing", "undo": "rolled_back"}[cmd]
        rollout["phase"] = rollout["state"]["phase"] = new_phase
        return web.json_response(rollout)

    @routes.post("/api/v1/enrollment-tokens")
    async def create_token(request: web.Request) -> web.Response:
        body = await request.json()
        state.bodies.append(body)
        token_id = f"et-{len(state.tokens) + 1}"
        record = {
            "id": token_id,
            "name": body["name"],
            "region": body["region"],
            "labels": body.get("labels", {}),
            "max_uses": body.get("max_uses", 1),
            "uses": 0,
            "expires_at": "2026-11-27T06:00:00.000Z" if "ttl_s" in body else None,
            "created_at": "2026-11-26T06:00:00.000Z",
            "created_by": "token:ops",
            "revoked_at": None,
        }
        state.tokens[token_id] = record
        return web.json_response(record | {"token": f"nce_{token_id}_secret"}, status=201)

    @routes.get("/api/v1/enrollment-tokens")
    async def list_tokens(request: web.Request) -> web.Response:
        return page(list(state.tokens.values()), request)

    @routes.delete("/api/v1/enrollment-tokens/{id}")
    async def revoke_token(request: web.Request) -> web.Response:
        token = state.tokens.get(request.match_info["id"])
        if token is None:
            return problem(404, "Not Found", f"no enrollment token {request.match_info['id']!r}")
        token["revoked_at"] = "2026-11-26T07:00:00.000Z"
        return web.Response(status=204)

    app = web.Application(middlewares=[auth])
    app.add_routes(routes)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def hub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StandIn]:
    monkeypatch.delenv("NOVACRON_HUB", raising=False)
    monkeypatch.delenv("NOVACRON_TOKEN", raising=False)
    state = StandIn()
    runner, state.url = await serve(standin_app(state))
    try:
        yield state
    finally:
        await runner.cleanup()


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Any]


@pytest.fixture
def run(hub: StandIn, capsys: pytest.CaptureFixture[str]) -> Run:
    """``await run("get", "devices", ...)`` -> Result; adds --hub and --token."""

    async def go(*argv: str, auth: bool = True) -> Result:
        capsys.readouterr()
        args = [*argv, "--hub", hub.url]
        if auth:
            args += ["--token", TOKEN]
        code = await asyncio.to_thread(_main, args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return go


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse refuses bad arguments with exit status 2
        return int(exc.code or 0)


def write_manifest(tmp_path: Path, text: str = MANIFEST, name: str = "deploy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- apply ----------------------------------------------------------------------------------


async def test_apply_creates_then_reports_unchanged(hub: StandIn, run: Run, tmp_path: Path) -> None:
    path = write_manifest(tmp_path)
    first = await run("apply", "-f", str(path))
    assert first.code == 0, first.err
    assert first.out.splitlines()[0] == "deployment/camera-ingest created (version 1)"
    again = await run("apply", "-f", str(path))
    assert again.code == 0
    assert again.out.strip() == "deployment/camera-ingest unchanged (version 1)"
    changed = write_manifest(tmp_path, MANIFEST.replace("replicas: 2", "replicas: 3"))
    third = await run("apply", "--filename", str(changed), "-o", "json")
    assert third.code == 0
    assert third.json()["deployment"]["version"] == 2
    # What was sent is the validated manifest as JSON, defaults filled in.
    assert hub.bodies[0]["metadata"]["name"] == "camera-ingest"
    assert hub.bodies[0]["spec"]["rollout"]["on_failure"] in ("pause", "rollback")


async def test_apply_reads_json_manifests(run: Run, tmp_path: Path) -> None:
    doc = yaml.safe_load(MANIFEST)
    path = write_manifest(tmp_path, json.dumps(doc), "deploy.json")
    result = await run("apply", "-f", str(path))
    assert result.code == 0, result.err
    assert "created (version 1)" in result.out


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (MANIFEST.replace("replicas: 2", "replicas: two"), "spec.replicas"),
        (MANIFEST + "  colour: blue\n", "spec.colour"),
        (MANIFEST.replace("kind: Deployment", "kind: Pod"), "kind"),
        ("kind: [unclosed\n", "line"),
    ],
)
async def test_an_invalid_manifest_exits_2_without_calling_the_hub(
    hub: StandIn, run: Run, tmp_path: Path, text: str, field: str
) -> None:
    path = write_manifest(tmp_path, text)
    result = await run("apply", "-f", str(path))
    assert result.code == 2
    assert str(path) in result.err
    assert field in result.err
    assert hub.requests == []


async def test_a_missing_manifest_file_exits_2(hub: StandIn, run: Run, tmp_path: Path) -> None:
    result = await run("apply", "-f", str(tmp_path / "nope.yaml"))
    assert result.code == 2
    assert "nope.yaml" in result.err
    assert hub.requests == []


async def test_a_refused_apply_exits_1_with_the_problem(run: Run, tmp_path: Path) -> None:
    path = write_manifest(tmp_path, MANIFEST.replace("camera-ingest", "unplaceable"))
    result = await run("apply", "-f", str(path))
    assert result.code == 1
    assert "422 Unprocessable Content: placement impossible" in result.err
    assert "spec.replicas: only 1 device matches" in result.err


# -- get ----------------------------------------------------------------------------------------


async def test_get_devices_table_is_aligned(run: Run) -> None:
    result = await run("get", "devices")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["ID", "REGION", "PROFILE", "STATUS", "LAST", "SEEN", "LABELS"]
    assert len(lines) == 6
    # Every column starts at the same offset on every line.
    for header in ("REGION", "PROFILE", "STATUS", "LAST SEEN", "LABELS"):
        col = lines[0].index(header)
        for line in lines[1:]:
            assert line[col - 2 : col] == "  " and line[col] != " ", (header, line)
    assert "gw-04" in lines[5] and " - " in lines[5]  # never seen
    assert "site=plant-22,tier=edge" in lines[5]


async def test_get_devices_sends_the_filters(hub: StandIn, run: Run) -> None:
    result = await run(
        "get", "devices", "-l", "site=plant-22", "--label", "tier=edge", "--region", "eu-west",
        "--profile", "raspberry-pi-4", "--status", "online", "-o", "json",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert [d["id"] for d in result.json()["items"]] == ["gw-03"]
    _, path, query = hub.requests[-1]
    assert path == "/api/v1/devices"
    assert query == [
        ("label", "site=plant-22"),
        ("label", "tier=edge"),
        ("region", "eu-west"),
        ("profile", "raspberry-pi-4"),
        ("status", "online"),
    ]


async def test_get_all_follows_next_cursor(hub: StandIn, run: Run) -> None:
    one = await run("get", "devices", "--limit", "2", "-o", "json")
    assert one.code == 0
    assert [d["id"] for d in one.json()["items"]] == ["gw-00", "gw-01"]
    assert one.json()["next_cursor"] == "2"
    hub.requests.clear()
    every = await run("get", "devices", "--limit", "2", "--all", "-o", "json")
    assert every.code == 0
    assert [d["id"] for d in every.json()["items"]] == [f"gw-{i:02d}" for i in range(5)]
    assert every.json()["next_cursor"] is None
    assert [dict(q).get("cursor") for _, _, q in hub.requests] == [None, "2", "4"]
    table = await run("get", "devices", "--limit", "2")
    assert "(more: add --all, or --cursor 2)" in table.err
    rest = await run("get", "devices", "--limit", "2", "--cursor", "2", "--all", "-o", "yaml")
    assert [d["id"] for d in yaml.safe_load(rest.out)["items"]] == ["gw-02", "gw-03", "gw-04"]


async def test_get_deployments_and_rollouts(run: Run, tmp_path: Path) -> None:
    assert (await run("apply", "-f", str(write_manifest(tmp_path)))).code == 0
    deployments = await run("get", "deployments")
    assert deployments.code == 0, deployments.err
    header, row = deployments.out.splitlines()
    assert header.split()[:4] == ["NAME", "VERSION", "WORKLOAD", "MODE"]
    assert row.split()[:4] == ["camera-ingest", "1", "registry.local/ingest:2", "replicas=2"]
    rollouts = await run("get", "rollouts", "--status", "progressing")
    assert rollouts.code == 0
    assert rollouts.out.splitlines()[1].split()[:5] == [
        "camera-ingest", "1", "progressing", "1/2", "1/2",
    ]  # fmt: skip
    none = await run("get", "rollouts", "--status", "paused")
    assert none.code == 0 and none.out == ""
    assert "No resources found." in none.err


@pytest.mark.parametrize(
    "argv",
    [
        ("get", "things"),
        ("get", "devices", "--label", "novalue"),
        ("get", "devices", "--label", "=x"),
        ("get", "devices", "--limit", "0"),
        ("get", "devices", "--limit", "1001"),
        ("get", "devices", "--limit", "ten"),
        ("get", "devices", "-o", "xml"),
        ("get", "deployments", "--region", "eu-west"),
        ("get", "rollouts", "--label", "a=b"),
        ("get", "deployments", "--status", "online"),
        ("get", "devices", "--status", "sleepy"),
        ("get", "rollouts", "--status", "online"),
        ("describe", "device"),
        ("rollout", "restart", "camera-ingest"),
        ("enroll-token", "create"),
        ("enroll-token", "create", "--region", "eu", "--ttl", "soon"),
        ("enroll-token", "create", "--region", "eu", "--ttl", "0s"),
        ("enroll-token", "create", "--region", "eu", "--uses", "0"),
        ("apply",),
        ("get", "devices", "--timeout", "0"),
    ],
)
async def test_bad_arguments_exit_2(hub: StandIn, run: Run, argv: tuple[str, ...]) -> None:
    result = await run(*argv)
    assert result.code == 2
    assert "error" in result.err
    assert hub.requests == []


async def test_a_bad_hub_url_exits_2(run: Run) -> None:
    result = await _run_raw(["get", "devices", "--hub", "ftp://hub"])
    assert result == 2


async def _run_raw(argv: list[str]) -> int:
    return await asyncio.to_thread(_main, argv)


# -- errors and connection ------------------------------------------------------------------


async def test_no_token_exits_1_with_the_problem_and_a_hint(run: Run) -> None:
    result = await run("get", "devices", auth=False)
    assert result.code == 1
    assert "401 Unauthorized: missing or invalid API token" in result.err
    assert "NOVACRON_TOKEN" in result.err


async def test_environment_gives_hub_and_token(
    hub: StandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOVACRON_HUB", hub.url)
    monkeypatch.setenv("NOVACRON_TOKEN", TOKEN)
    assert await _run_raw(["get", "devices", "-o", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 5
    # Flags win over the environment.
    monkeypatch.setenv("NOVACRON_TOKEN", "wrong")
    assert await _run_raw(["get", "devices", "--token", TOKEN]) == 0
    assert await _run_raw(["get", "devices"]) == 1


async def test_an_unreachable_hub_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOVACRON_HUB", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    assert await _run_raw(["get", "devices", "--hub", url, "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the hub at {url}: connection refused" in err


async def test_client_errors_are_typed(hub: StandIn) -> None:
    async with HubClient(hub.url, TOKEN) as client:
        with pytest.raises(HubApiError) as caught:
            await client.get_device("gw-99")
        assert (caught.value.status, caught.value.title) == (404, "Not Found")
        assert caught.value.detail == "no device 'gw-99'"
        # An id with a slash stays one path segment.
        with pytest.raises(HubApiError) as caught:
            await client.get_device("../deployments")
        assert caught.value.status == 404
    async with HubClient(f"http://127.0.0.1:{free_port()}", TOKEN) as client:
        with pytest.raises(HubUnreachableError, match="connection refused"):
            await client.list_devices()
    with pytest.raises(ValueError, match="http"):
        HubClient("hub.example.net")


async def test_client_refuses_odd_answers() -> None:
    """A cursor loop, a non-JSON success and a bare (non-problem) error body."""

    async def loop(request: web.Request) -> web.Response:
        return web.json_response({"items": [{"id": "x"}], "next_cursor": "same"})

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="upstream down")

    app = web.Application()
    app.router.add_get("/api/v1/devices", loop)
    app.router.add_get("/api/v1/deployments", text)
    app.router.add_get("/api/v1/rollouts", gateway)
    runner, url = await serve(app)
    try:
        async with HubClient(url) as client:
            with pytest.raises(HubResponseError, match="repeated cursor"):
                [d async for d in client.iter_pages(lambda c: client.list_devices(cursor=c))]
            with pytest.raises(HubResponseError, match="not JSON"):
                await client.list_deployments()
            with pytest.raises(HubApiError) as caught:
                await client.list_rollouts()
            assert (caught.value.status, caught.value.title) == (502, "Bad Gateway")
            assert caught.value.detail == "upstream down"
    finally:
        await runner.cleanup()


# -- describe -----------------------------------------------------------------------------------


async def test_describe_device(run: Run) -> None:
    result = await run("describe", "device", "gw-01")
    assert result.code == 0, result.err
    assert "ID:        gw-01" in result.out
    assert "Labels:    site=plant-1" in result.out
    assert "Assignments:" in result.out and "camera-ingest" in result.out
    as_yaml = await run("describe", "device", "gw-01", "-o", "yaml")
    assert yaml.safe_load(as_yaml.out)["device"]["id"] == "gw-01"
    missing = await run("describe", "device", "gw-99")
    assert missing.code == 1
    assert "404 Not Found: no device 'gw-99'" in missing.err


async def test_describe_deployment(run: Run, tmp_path: Path) -> None:
    assert (await run("apply", "-f", str(write_manifest(tmp_path)))).code == 0
    result = await run("describe", "deployment", "camera-ingest", "-o", "table")
    assert result.code == 0, result.err
    assert "Name:      camera-ingest" in result.out
    assert "Rollout:   progressing" in result.out
    assert "Succeeded: 1/2" in result.out
    assert "Assignments (1):" in result.out
    assert "image: registry.local/ingest:2" in result.out
    as_json = await run("describe", "deployment", "camera-ingest", "-o", "json")
    assert as_json.json()["deployment"]["version"] == 1


# -- rollout ----------------------------------------------------------------------------------


async def test_rollout_commands(run: Run, tmp_path: Path) -> None:
    assert (await run("apply", "-f", str(write_manifest(tmp_path)))).code == 0
    status = await run("rollout", "status", "camera-ingest")
    assert status.code == 0, status.err
    assert "Phase:      progressing" in status.out
    assert "Wave:       1/2" in status.out
    paused = await run("rollout", "pause", "camera-ingest")
    assert paused.code == 0
    assert paused.out.startswith("rollout/camera-ingest paused\n")
    again = await run("rollout", "pause", "camera-ingest")
    assert again.code == 1
    assert "409 Not allowed in this rollout phase: cannot pause a rollout that is paused" in (
        again.err
    )
    resumed = await run("rollout", "resume", "camera-ingest", "-o", "json")
    assert resumed.code == 0 and resumed.json()["phase"] == "progressing"
    undone = await run("rollout", "undo", "camera-ingest")
    assert undone.code == 0 and "Phase:      rolled_back" in undone.out
    missing = await run("rollout", "status", "nope")
    assert missing.code == 1 and "404" in missing.err


# -- enrollment tokens ----------------------------------------------------------------------


async def test_enroll_tokens(hub: StandIn, run: Run) -> None:
    created = await run(
        "enroll-token", "create", "--region", "eu-west", "-l", "site=plant-1",
        "--label", "tier=edge", "--uses", "5", "--ttl", "1h30m",
    )  # fmt: skip
    assert created.code == 0, created.err
    assert "Token:   nce_et-1_secret" in created.out
    assert "shown once" in created.err
    assert hub.bodies[-1] == {
        "name": "enroll-eu-west",
        "region": "eu-west",
        "labels": {"site": "plant-1", "tier": "edge"},
        "max_uses": 5,
        "ttl_s": 5400,
    }
    as_json = await run("enroll-token", "create", "--region", "us", "--name", "n", "-o", "json")
    assert as_json.json()["token"] == "nce_et-2_secret"
    assert hub.bodies[-1] == {"name": "n", "region": "us", "max_uses": 1}
    listed = await run("enroll-token", "list")
    assert listed.code == 0
    assert [line.split()[0] for line in listed.out.splitlines()] == ["ID", "et-1", "et-2"]
    assert "secret" not in listed.out
    revoked = await run("enroll-token", "revoke", "et-1")
    assert revoked.code == 0 and revoked.out.strip() == "enrollment token et-1 revoked"
    again = await run("enroll-token", "list", "-o", "json")
    assert again.json()["items"][0]["revoked_at"] is not None
    missing = await run("enroll-token", "revoke", "et-9")
    assert missing.code == 1 and "404 Not Found" in missing.err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    from cloud_hub._client_cli import _duration

    assert _duration(text) == seconds


# -- against the real hub app -----------------------------------------------------------------


@pytest.mark.integration
async def test_operator_workflow_against_the_real_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real ``make_app`` over SQLite files: tokens, enrollment, apply, rollout."""
    import aiohttp

    from sync.keys import Signer
    from tests.hub.api_harness import REGION, build_services, close_services, enroll_body

    monkeypatch.delenv("NOVACRON_HUB", raising=False)
    services = await build_services(tmp_path)
    from cloud_hub.app import make_app

    runner, url = await serve(make_app(services.ctx))
    monkeypatch.setenv("NOVACRON_TOKEN", services.tokens["operator"])

    async def novacron(*argv: str) -> Result:
        capsys.readouterr()
        code = await _run_raw([*argv, "--hub", url])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    try:
        made = await novacron(
            "enroll-token", "create", "--region", REGION, "-l", "site=plant-1", "--uses", "3",
            "--ttl", "1h", "-o", "json",
        )  # fmt: skip
        assert made.code == 0, made.err
        token = made.json()["token"]
        assert made.json()["max_uses"] == 3
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                body = enroll_body(token, Signer.generate().public_key_bytes)
                async with session.post(f"{url}/api/v1/enroll", json=body) as resp:
                    assert resp.status == 201, await resp.text()

        devices = await novacron("get", "devices", "-l", "site=plant-1", "--limit", "2", "--all",
                                 "-o", "json")  # fmt: skip
        assert devices.code == 0, devices.err
        ids = [d["id"] for d in devices.json()["items"]]
        assert len(ids) == 3 and ids == sorted(ids)
        table = await novacron("get", "devices", "--region", REGION)
        assert table.code == 0 and len(table.out.splitlines()) == 4

        manifest = MANIFEST.replace("mode: replicas\n  replicas: 2\n", "mode: each\n")
        applied = await novacron("apply", "-f", str(write_manifest(tmp_path, manifest)))
        assert applied.code == 0, applied.err
        assert applied.out.startswith("deployment/camera-ingest created (version 1)")
        again = await novacron("apply", "-f", str(tmp_path / "deploy.yaml"))
        assert again.out.startswith("deployment/camera-ingest unchanged (version 1)")

        described = await novacron("describe", "deployment", "camera-ingest", "-o", "json")
        assert described.code == 0, described.err
        assert {a["device_id"] for a in described.json()["assignments"]} == set(ids)
        device = await novacron("describe", "device", ids[0], "-o", "table")
        assert device.code == 0, device.err
        assert f"ID:        {ids[0]}" in device.out

        status = await novacron("rollout", "status", "camera-ingest")
        assert status.code == 0, status.err
        assert "Phase:" in status.out and "WAVE" in status.out
        paused = await novacron("rollout", "pause", "camera-ingest")
        assert paused.code == 0, paused.err
        assert "Phase:      paused" in paused.out
        twice = await novacron("rollout", "pause", "camera-ingest")
        assert twice.code == 0  # idempotent
        undo = await novacron("rollout", "undo", "camera-ingest")
        assert undo.code == 1
        assert "409 Not allowed in this rollout phase" in undo.err
        assert "no previous version" in undo.err
        resumed = await novacron("rollout", "resume", "camera-ingest", "-o", "json")
        assert resumed.code == 0 and resumed.json()["phase"] != "paused"
        listed = await novacron("get", "rollouts", "-o", "yaml")
        assert [r["deployment"] for r in yaml.safe_load(listed.out)["items"]] == ["camera-ingest"]

        tokens = await novacron("enroll-token", "list", "-o", "json")
        [record] = tokens.json()["items"]
        assert record["uses"] == 3 and "token" not in record
        revoked = await novacron("enroll-token", "revoke", record["id"])
        assert revoked.code == 0, revoked.err

        bad = await novacron("apply", "-f", str(write_manifest(tmp_path, MANIFEST, "x.yaml")),
                             "--token", services.tokens["viewer"])  # fmt: skip
        assert bad.code == 1
        assert "403" in bad.err
        missing = await novacron("describe", "device", "nope")
        assert missing.code == 1 and "404" in missing.err
    finally:
        await runner.cleanup()
        await close_services(services)
