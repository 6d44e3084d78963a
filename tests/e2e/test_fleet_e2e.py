"""End to end: hub, relay, three real agents, a partition, an override, a change.

Everything real on loopback: two Mosquitto brokers (the region's, with the account
and ACL files the hub provisions, and the hub's), the hub (:class:`cloud_hub.server.Hub`
with its SQLite store), a regional relay whose link to the hub broker goes through a
TCP proxy the test can cut, and three ``novacron agent`` processes that enroll with
tokens, one per driver (process, Podman, libvirt's test driver).

The story (issue #5's first acceptance point):

1. an operator makes three enrollment tokens (labels ``kind=proc|pod|vm``); each
   agent enrolls with ``novacron agent enroll`` and runs;
2. three deployments, one per kind, land on their devices as placed;
3. the region's relay is cut from the hub;
4. meanwhile an operator stops the process workload on its device (a local
   override, through the agent's control socket) and the hub changes the process
   and Podman deployments (version 2);
5. the link heals: the override shows at the hub, every device converges on the
   hub's desired state, and the hub, the relay and each agent hold the same
   ``desired/<id>`` and ``device/<id>`` scopes;
6. no workload is duplicated: one container, one domain, and (once the override is
   cleared) one process, each at the version the hub asked for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_hub.client import HubClient
from cloud_hub.config import HubConfig
from cloud_hub.server import Hub
from edge_agent.identity import load_or_create_device_key
from edge_agent.journal import Journal
from regional_relay.config import load_relay_config
from regional_relay.relay import Relay
from simulator.netproxy import TcpProxy
from sync._msgpack_strict import unpackb_strict
from sync.crdt import LwwMap
from tests.fixtures_mqtt import MosquittoBroker, relay_broker
from tests.fixtures_runtime import PodmanService

pytestmark = pytest.mark.integration

REGION = "north"
RELAY_ID = "relay-north-1"
RELAY_PASSWORD = "relay-secret"
KINDS = ("proc", "pod", "vm")
TIMEOUT_S = 90.0

Entries = dict[str, tuple[int, str, int, bool, Any]]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def _eventually(
    what: str, check: Callable[[], Awaitable[bool]], within: float = TIMEOUT_S
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


async def _novacron(*args: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "novacron",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if check and proc.returncode != 0:
        raise AssertionError(f"novacron {' '.join(args)} exited {proc.returncode}: {err.decode()}")
    return out.decode()


def _manifest(name: str, kind: str, workload: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "apiVersion": "novacron.io/v1",
        "metadata": {"name": name},
        "spec": {
            "workload": {"name": name, **workload},
            "selector": {"labels": {"kind": kind}},
            "mode": "each",
            "rollout": {
                "waves": [{"percent": 100}],
                "wave_timeout_s": 600,
                "offline_deadline_s": 600,
            },
        },
    }


def _count_processes(marker: str) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if marker.encode() in cmdline.split(b"\0"):
                count += 1
    return count


def _hub_entries(blob: bytes | None) -> Entries:
    if blob is None:
        return {}
    scope = LwwMap.from_wire(unpackb_strict(blob))
    return dict(scope.entries())


async def _agent_entries(data_dir: Path, scope: str) -> Entries:
    async with Journal.open(data_dir / "journal.db", quota_bytes=64 << 20) as journal:
        rows = await journal.read_state(scope)
    return {r.key: (r.hlc, r.origin, r.counter, r.tombstone, unpackb_strict(r.value)) for r in rows}


class Agent:
    """One ``novacron agent run`` process and its files."""

    def __init__(self, root: Path, kind: str) -> None:
        self.kind = kind
        self.dir = root / f"agent-{kind}"
        self.dir.mkdir(parents=True)
        self.config = self.dir / "agent.yaml"
        self.device_id = ""
        self.proc: asyncio.subprocess.Process | None = None

    async def enroll(self, hub_url: str, token: str) -> None:
        out = await _novacron(
            "agent",
            "enroll",
            "--hub",
            hub_url,
            "--token",
            token,
            "--config",
            str(self.config),
            "--data-dir",
            str(self.dir),
            "--profile",
            "generic-x86_64",
        )
        self.device_id = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("device:")
        )

    def configure(self, extra: dict[str, Any]) -> None:
        data = yaml.safe_load(self.config.read_text())
        data.update(extra)
        data["supervisor"] = {"reconcile_interval_s": 0.5, "backoff_initial_s": 0.2}
        data["link"] = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5}
        self.config.write_text(yaml.safe_dump(data))

    async def start(self) -> None:
        log = (self.dir / "agent.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "novacron",
            "--log-level",
            "DEBUG",
            "agent",
            "run",
            "--config",
            str(self.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def ctl(self, *args: str) -> str:
        return await _novacron("agent", *args, "--config", str(self.config))


@contextlib.asynccontextmanager
async def _agents(root: Path) -> AsyncIterator[dict[str, Agent]]:
    agents = {kind: Agent(root, kind) for kind in KINDS}
    try:
        yield agents
    finally:
        for agent in agents.values():
            await agent.stop()


def _region_broker(root: Path) -> tuple[MosquittoBroker, Path]:
    broker = relay_broker(root / "region-broker", {"relay": RELAY_PASSWORD})
    pid_file = root / "region-broker" / "mosquitto.pid"
    broker.conf_path.write_text(broker.conf_path.read_text() + f"pid_file {pid_file}\n")
    return broker, pid_file


async def test_enroll_deploy_partition_override_and_converge(
    tmp_path: Path, podman_service: PodmanService, libvirt_uri: str
) -> None:
    region_broker, pid_file = _region_broker(tmp_path)
    hub_broker = MosquittoBroker(tmp_path / "hub-broker")
    region_broker.start()
    hub_broker.start()
    marker = f"nc-e2e-{uuid.uuid4().hex[:8]}"
    owners: list[str] = []  # device ids: their containers are removed at the end
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    relay_key = load_or_create_device_key(relay_dir / "relay.key")
    (relay_dir / "relay.password").write_text(RELAY_PASSWORD + "\n")
    hub_config = HubConfig.model_validate(
        {
            "listen": "127.0.0.1:0",
            "data_dir": str(tmp_path / "hub"),
            "broker": {"url": hub_broker.url},
            "regions": {
                REGION: {
                    "relay_id": RELAY_ID,
                    "relay_public_key": _b64(relay_key.public_key_bytes),
                    "relays": [region_broker.url],
                }
            },
            "accounts": {
                "passwd_file": str(region_broker.workdir / "passwd"),
                "acl_file": str(region_broker.workdir / "relay.acl"),
                "pid_file": str(pid_file),
            },
            "tick_interval_s": 0.2,
        }
    )
    try:
        async with (
            TcpProxy("127.0.0.1", hub_broker.port, name="relay-to-hub") as proxy,
            Hub(hub_config) as hub,
            _agents(tmp_path) as agents,
        ):
            assert hub.tokens is not None and hub.store is not None
            admin, _ = hub.tokens.create("e2e-admin", "admin")
            (relay_dir / "hub.pub").write_text((tmp_path / "hub" / "hub.pub").read_text())
            (relay_dir / "relay.yaml").write_text(
                yaml.safe_dump(
                    {
                        "relay_id": RELAY_ID,
                        "region": REGION,
                        "data_dir": str(relay_dir),
                        "downstream": {
                            "url": region_broker.url,
                            "credentials": {
                                "username": "relay",
                                "password_file": str(relay_dir / "relay.password"),
                            },
                        },
                        "upstream": {"url": f"mqtt://127.0.0.1:{proxy.port}"},
                        "batch": {"max_delay_ms": 50},
                        "resend": {"ack_timeout_s": 1.0, "backoff_initial_s": 0.2},
                        "reconnect": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
                        "presence": {"summary_interval_s": 0.5},
                    }
                )
            )
            relay_config = load_relay_config(relay_dir / "relay.yaml")
            async with Relay(relay_config) as relay, HubClient(hub.url, admin) as api:
                world = World(hub, relay, api, agents, proxy, podman_service, libvirt_uri, marker)
                await _story(world, owners)
    finally:
        region_broker.stop()
        hub_broker.stop()
        for owner in owners:
            podman_service.remove_owned(owner)


@dataclass
class World:
    """Everything the story acts on."""

    hub: Hub
    relay: Relay
    api: HubClient
    agents: dict[str, Agent]
    proxy: TcpProxy
    podman: PodmanService
    libvirt_uri: str
    marker: str


async def _story(world: World, owners: list[str]) -> None:
    hub, relay, api, agents = world.hub, world.relay, world.api, world.agents
    proxy, podman, marker = world.proxy, world.podman, world.marker
    assert hub.store is not None
    # 1. enroll through tokens, then run
    for kind, agent in agents.items():
        token = await api.create_enroll_token(
            name=f"e2e-{kind}", region=REGION, labels={"kind": kind}
        )
        await agent.enroll(hub.url, token["token"])
    agents["proc"].configure({"drivers": ["process"]})
    agents["pod"].configure({"drivers": ["podman"], "podman_url": podman.url})
    agents["vm"].configure({"drivers": ["libvirt"], "libvirt_uri": world.libvirt_uri})
    for agent in agents.values():
        await agent.start()
    ids = {kind: agent.device_id for kind, agent in agents.items()}
    owners += ids.values()
    assert len(set(ids.values())) == 3

    # 2. one deployment per kind, placed on its device
    process_cmd = [sys.executable, "-c", "import time; time.sleep(3600)", marker]
    manifests = {
        "proc": _manifest("web-proc", "proc", {"driver": "process", "command": process_cmd}),
        "pod": _manifest(
            "web-pod",
            "pod",
            {"driver": "podman", "image": podman.image, "command": ["sleep", "3600"]},
        ),
        "vm": _manifest("web-vm", "vm", {"driver": "libvirt"}),
    }
    for manifest in manifests.values():
        result = await api.apply(manifest)
        assert result.created

    async def reported(kind: str, version: str, phase: str = "running") -> bool:
        device = await api.get_device(ids[kind])
        status = device["state"]["reported"].get(f"web-{kind}")
        return bool(status) and status["version"] == version and status["phase"] == phase

    for kind in KINDS:
        await _eventually(f"web-{kind} v1 running", functools.partial(reported, kind, "1"))
    for kind in KINDS:
        deployment = await api.get_deployment(f"web-{kind}")
        assignments = {a["device_id"] for a in deployment["assignments"]}
        assert assignments == {ids[kind]}, deployment

    # 3. cut the region's relay from the hub
    proxy.partition("cut")
    await _eventually(
        "the relay to notice the cut", _async(lambda: not relay.hub_connected.is_set())
    )

    # 4. a local override on one device, a hub change meanwhile
    await agents["proc"].ctl("stop", "web-proc")
    await _eventually("the process to stop", _async(lambda: _count_processes(marker) == 0))
    for kind in ("proc", "pod"):
        manifest = manifests[kind]
        manifest["spec"]["workload"]["env"] = {"RELEASE": "2"}
        result = await api.apply(manifest)
        assert result.created and result.version == 2
    await asyncio.sleep(2.0)  # the hub's writes are queued for the relay; nothing passes
    proc_device = await api.get_device(ids["proc"])
    assert "web-proc" not in proc_device["state"]["overrides"]

    # 5. heal: the override shows at the hub, devices converge on the hub's state
    proxy.heal()

    async def override_seen() -> bool:
        device = await api.get_device(ids["proc"])
        return bool(device["state"]["overrides"].get("web-proc", {}).get("action") == "stop")

    await _eventually("the override at the hub", override_seen)
    await _eventually("web-pod v2 running", lambda: reported("pod", "2"))
    await _eventually(
        "web-proc v2 stopped by the override", lambda: reported("proc", "2", "stopped")
    )
    await _eventually("web-vm still running", lambda: reported("vm", "1"))
    assert _count_processes(marker) == 0  # the override wins on the device

    # 6. no duplicates: one container at v2, one domain, one process once cleared
    await agents["proc"].ctl("clear", "web-proc")
    await _eventually("web-proc v2 running", lambda: reported("proc", "2"))
    await _eventually("one process", _async(lambda: _count_processes(marker) == 1))
    containers = podman.cli(
        "ps",
        "-a",
        "--filter",
        f"label=io.novacron.owner={ids['pod']}",
        "--format",
        '{{.Names}} {{.State}} {{index .Labels "io.novacron.version"}}',
    ).stdout.split("\n")
    containers = [c for c in containers if c.strip()]
    assert len(containers) == 1, containers
    name, *state, version = containers[0].split()
    assert (name, state[0], version) == ("web-pod", "Up", "2"), containers
    workloads = await agents["vm"].ctl("workloads", "--json")
    assert workloads.count('"web-vm"') >= 1
    assert _count_processes(marker) == 1

    # ... and every replica holds the same scopes: hub, relay, agents.
    await _converged(hub, relay, agents, ids)


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run


async def _converged(hub: Hub, relay: Relay, agents: dict[str, Agent], ids: dict[str, str]) -> None:
    assert hub.store is not None
    store = hub.store

    async def same() -> bool:
        for device in ids.values():
            hub_desired = _hub_entries(await store.get_scope(f"desired/{device}"))
            relay_desired = dict(relay.replica.scope(f"desired/{device}").entries())
            if hub_desired != relay_desired:
                return False
        return True

    await _eventually("hub and relay to hold the same desired state", same)
    for agent in agents.values():
        await agent.stop()
    for kind, agent in agents.items():
        device = ids[kind]
        hub_desired = _hub_entries(await store.get_scope(f"desired/{device}"))
        hub_device = _hub_entries(await store.get_scope(f"device/{device}"))
        assert hub_desired == await _agent_entries(agent.dir, f"desired/{device}"), kind
        assert hub_device == await _agent_entries(agent.dir, f"device/{device}"), kind
        assert hub_desired, kind
        assert any(key.startswith("reported/") for key in hub_device), kind
