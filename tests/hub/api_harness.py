"""A real hub app over real SQLite files for the API tests.

:func:`running_hub` builds every service the app needs -- the SQLite store, the
SQLite token store and audit log in ``tmp_path``, the real fleet controller over
an in-memory desired-state writer, the enrollment service and the event bus --
serves :func:`cloud_hub.app.make_app` on 127.0.0.1:0 with aiohttp's
``TestServer`` and hands back a :class:`Hub` with a client and one API token per
role. :class:`HubThread` serves the same app from a thread with its own loop,
for callers that run their own event loop or block (the agent's CLI,
schemathesis).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from cloud_hub._sqlite_store import open_sqlite_store
from cloud_hub.app import REQUESTS_KEY, HubContext, make_app
from cloud_hub.audit import AuditLog
from cloud_hub.auth import Role, SQLiteTokenStore
from cloud_hub.broker_accounts import BrokerAccountsError
from cloud_hub.controller import FleetController
from cloud_hub.enrollment import Enrollment, RegionInfo
from cloud_hub.events import EventBus
from cloud_hub.health import HealthTracker
from cloud_hub.store import DeviceQuery, DeviceRecord
from cloud_hub.testing import InMemoryDesiredWriter
from edge_agent.identity import load_or_create_device_key
from firmware_profiles import load_profile
from sync.keys import Signer

REGION = "eu-west"
OTHER_REGION = "us-east"
PROFILE = "generic-x86_64"
PROBLEM = "application/problem+json"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@dataclass
class Clock:
    """The hub clock (ms); real time plus an offset the test can move."""

    offset_ms: int = 0

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.offset_ms


@dataclass
class Stats:
    """Ingest counters the /metrics test controls."""

    values: dict[str, Any] = field(
        default_factory=lambda: {"batches": 3, "events": 7, "rejected": {"bad_signature": 2}}
    )

    def __call__(self) -> Mapping[str, Any]:
        return self.values


@dataclass
class Services:
    """Everything behind the app, for assertions on stored state."""

    ctx: HubContext
    controller: FleetController
    writer: InMemoryDesiredWriter
    clock: Clock
    stats: Stats
    hub_key: Signer
    relay_keys: tuple[str, ...]
    tokens: dict[Role, str]
    device_token_device: str


class RecordingBroker:
    """A BrokerAccounts keeping accounts in memory, or failing on demand."""

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[str, str, str]] = {}
        self.fail = False

    async def provision(self, username: str, password: str, device_id: str, region: str) -> None:
        if self.fail:
            raise BrokerAccountsError("broker reload failed (test)", username=username)
        self.accounts[username] = (password, device_id, region)

    async def revoke(self, username: str) -> None:
        self.accounts.pop(username, None)


async def build_services(
    tmp_path: Path, *, max_body_bytes: int = 1 << 20, broker: RecordingBroker | None = None
) -> Services:
    """Open every service in ``tmp_path`` (close with :func:`close_services`)."""
    store = await asyncio.to_thread(open_sqlite_store, tmp_path / "hub.db")
    tokens = await asyncio.to_thread(SQLiteTokenStore.open, tmp_path / "tokens.db")
    audit = await asyncio.to_thread(AuditLog.open, tmp_path / "audit.db")
    clock = Clock()
    stats = Stats()
    health = HealthTracker()
    events = EventBus(queue_size=64)
    writer = InMemoryDesiredWriter()
    controller = FleetController(store, writer, health, clock=clock, publish=events.publish)
    await controller.start()
    hub_key = Signer.generate()
    relay_keys = (b64(Signer.generate().public_key_bytes),)
    regions = {
        REGION: RegionInfo(
            ("mqtt://127.0.0.1:1884", "mqtts://relay-2.example.net:8883"), relay_keys
        ),
        OTHER_REGION: RegionInfo(("mqtt://127.0.0.1:1885",)),
    }
    enrollment = Enrollment(
        store,
        audit,
        regions=regions,
        hub_public_key=b64(hub_key.public_key_bytes),
        clock=clock,
        broker=broker,
        on_enrolled=[controller.device_enrolled],
        publish=events.publish,
    )
    ctx = HubContext(
        store=store,
        tokens=tokens,
        audit=audit,
        controller=controller,
        enrollment=enrollment,
        events=events,
        health=health,
        stats=stats,
        clock=clock,
        max_body_bytes=max_body_bytes,
    )
    role_tokens: dict[Role, str] = {}
    for role in ("admin", "operator", "viewer"):
        raw, _ = tokens.create(f"test-{role}", role)
        role_tokens[role] = raw
    device_id = "dev-0000000000000001"
    raw, _ = tokens.create("test-device", "device", device_id=device_id)
    role_tokens["device"] = raw
    return Services(
        ctx, controller, writer, clock, stats, hub_key, relay_keys, role_tokens, device_id
    )


async def close_services(services: Services) -> None:
    ctx = services.ctx
    await ctx.store.aclose()
    ctx.tokens.close()
    ctx.audit.close()


@dataclass
class Hub:
    """A served hub and a client."""

    client: TestClient[web.Request, web.Application]
    services: Services

    @property
    def ctx(self) -> HubContext:
        return self.services.ctx

    def auth(self, role: Role | None) -> dict[str, str]:
        if role is None:
            return {}
        return {"Authorization": f"Bearer {self.services.tokens[role]}"}

    async def call(
        self,
        method: str,
        path: str,
        role: Role | None = "admin",
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
    ) -> ClientResponse:
        all_headers = self.auth(role) | dict(headers or {})
        return await self.client.request(
            method, path, json=json, data=data, headers=all_headers, params=params
        )

    async def ok(self, method: str, path: str, role: Role | None = "admin", **kw: Any) -> Any:
        """Call and return the JSON body of a 2xx answer."""
        resp = await self.call(method, path, role, **kw)
        text = await resp.text()
        assert resp.status < 300, f"{method} {path}: {resp.status} {text}"
        return await resp.json()

    async def problem(
        self, status: int, method: str, path: str, role: Role | None = "admin", **kw: Any
    ) -> dict[str, Any]:
        """Call, check the status and problem body, return the body."""
        resp = await self.call(method, path, role, **kw)
        text = await resp.text()
        assert resp.status == status, f"{method} {path}: {resp.status} {text}"
        assert resp.content_type == PROBLEM, text
        body: dict[str, Any] = await resp.json(content_type=PROBLEM)
        assert body["status"] == status
        assert {"type", "title", "detail"} <= set(body)
        return body

    async def enrollment_token(self, **fields: Any) -> str:
        body = {"name": "batch-1", "region": REGION} | fields
        answer = await self.ok("POST", "/api/v1/enrollment-tokens", "operator", json=body)
        token: str = answer["token"]
        return token

    async def enroll(
        self, token: str, key_dir: Path | None = None, *, profile: str = PROFILE
    ) -> tuple[int, dict[str, Any]]:
        """Enroll a device with a new (or the given directory's) key."""
        return await self.client_enroll(self.client, token, key_dir, profile=profile)

    @staticmethod
    async def client_enroll(
        client: TestClient[web.Request, web.Application],
        token: str,
        key_dir: Path | None,
        *,
        profile: str = PROFILE,
    ) -> tuple[int, dict[str, Any]]:
        key = (
            Signer.generate()
            if key_dir is None
            else load_or_create_device_key(key_dir / "device.key")
        )
        body = enroll_body(token, key.public_key_bytes, profile=profile)
        resp = await client.post("/api/v1/enroll", json=body)
        payload: dict[str, Any] = await resp.json(content_type=None)
        return resp.status, payload


def enroll_body(token: str, public_key: bytes, *, profile: str = PROFILE) -> dict[str, Any]:
    drivers = list(load_profile(PROFILE).drivers)
    return {
        "token": token,
        "public_key": b64(public_key),
        "facts": {
            "hostname": "gw-test",
            "arch": "x86_64",
            "cpu_cores": 4,
            "memory_mb": 4096,
            "storage_mb": 32000,
            "drivers": drivers,
        },
        "profile": profile,
    }


@asynccontextmanager
async def running_hub(tmp_path: Path, **options: Any) -> AsyncIterator[Hub]:
    """Serve the hub on 127.0.0.1:0 with a client."""
    services = await build_services(tmp_path, **options)
    try:
        server = TestServer(make_app(services.ctx), host="127.0.0.1", port=0)
        async with TestClient(server) as client:
            yield Hub(client, services)
    finally:
        await close_services(services)


class HubThread:
    """Serves the real hub app from a thread with its own loop (for blocking callers)."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.tmp_path = tmp_path
        self.options = options
        self.url = ""
        self.app: web.Application | None = None
        self.services: Services | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hub", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.services = await build_services(self.tmp_path, **self.options)
        self.app = make_app(self.services.ctx)
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await close_services(self.services)

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the hub's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def requests_to(self, method: str, path: str) -> int:
        """How many calls of ``method path`` the app answered (any status)."""
        assert self.app is not None
        counts = self.app[REQUESTS_KEY].counts
        return sum(n for (m, p, _), n in counts.items() if (m, p) == (method, path))

    def devices(self) -> list[DeviceRecord]:
        """Every enrolled device."""
        assert self.services is not None
        page = self.run(self.services.ctx.store.list_devices(DeviceQuery(limit=1000)))
        return list(page.items)

    def token_uses(self, token: str) -> int:
        """How many devices an enrollment token admitted."""
        assert self.services is not None
        record = self.run(self.services.ctx.store.get_enroll_token(token.split("_")[1]))
        uses: int = record.uses
        return uses

    def token(self, role: Role) -> str:
        assert self.services is not None
        return self.services.tokens[role]

    def enrollment_token(self, **fields: Any) -> str:
        """Make an enrollment token through the service (as an operator would)."""
        assert self.services is not None
        enrollment = self.services.ctx.enrollment
        args = {"name": "test", "region": REGION, "actor": "test"} | fields
        raw, _ = self.run(enrollment.create_token(**args))
        token: str = raw
        return token

    def __enter__(self) -> HubThread:
        self._thread.start()
        assert self._ready.wait(20), "hub did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()
