"""Helpers for agent integration tests: configs, a seeded journal, a hub peer."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt

from edge_agent._mqtt import connected
from edge_agent.agent import relay_peer_id
from edge_agent.config import AgentConfig
from edge_agent.identity import load_or_create_device_key
from edge_agent.journal import Journal
from edge_agent.state import DeviceState, desired_scope, device_scope
from firmware_profiles import FirmwareProfile, load_profile
from sync.crdt import LwwMap
from sync.hlc import HybridLogicalClock, SystemClock
from sync.keys import KeyRing, Signer
from sync.models import WorkloadSpec
from sync.protocol import Replica, SyncSession
from sync.signed import signed_write
from sync.topics import device_topic
from tests.helpers import serve_session

REGION = "eu-test"


def make_config(
    data_dir: Path,
    *,
    device_id: str = "gw-1",
    relays: Sequence[str] = ("mqtt://127.0.0.1:9",),
    drivers: Sequence[str] = ("process",),
    podman_url: str | None = None,
    reconcile_interval_s: float = 0.2,
) -> tuple[AgentConfig, FirmwareProfile]:
    """A validated agent config for tests (fast reconcile, fast reconnect)."""
    profile = load_profile("generic-x86_64")
    data: dict[str, Any] = {
        "device_id": device_id,
        "region": REGION,
        "data_dir": str(data_dir),
        "profile": profile.name,
        "relays": list(relays),
        "drivers": list(drivers),
        "supervisor": {"reconcile_interval_s": reconcile_interval_s},
        "link": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
    }
    if podman_url is not None:
        data["podman_url"] = podman_url
    return AgentConfig.for_profile(data, profile), profile


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode() + "\n"


def enroll_offline(config: AgentConfig, hub: Signer, relay: Signer | None = None) -> Signer:
    """What `agent enroll` leaves on disk: the device key, the hub's and relays' keys."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    (config.data_dir / "hub.pub").write_text(_b64(hub.public_key_bytes), encoding="ascii")
    if relay is not None:
        (config.data_dir / "relays.pub").write_text(_b64(relay.public_key_bytes), encoding="ascii")
    return load_or_create_device_key(config.key_path)


async def seed_desired(config: AgentConfig, specs: Sequence[WorkloadSpec], hub: Signer) -> None:
    """Write hub-signed desired specs into the journal, as an earlier sync would have."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    async with Journal.open(config.data_dir / "journal.db", quota_bytes=1 << 24) as journal:
        hub_replica = Replica("hub", HybridLogicalClock(SystemClock()))
        state = DeviceState(hub_replica, journal, config.device_id, None)
        for spec in specs:
            signed_write(
                hub_replica, state.desired_scope_name, spec.name, spec.model_dump(mode="json"), hub
            )
        await state.persist_remote(state.desired_scope_name, None)


class RelayPeer:
    """The upstream side of the device sync (a relay stand-in holding the hub's key),
    over a real broker; reconnects on loss."""

    def __init__(
        self, port: int, device_id: str, device_key: bytes, signer: Signer, hub: Signer
    ) -> None:
        self.port = port
        self.device_id = device_id
        self.scope = device_scope(device_id)
        self.desired = desired_scope(device_id)
        self.replica = Replica(relay_peer_id(REGION), HybridLogicalClock(SystemClock()))
        self.replica.scope(self.scope)
        self.replica.scope(self.desired)
        self.signer = signer
        self.hub = hub
        self.keyring = KeyRing()
        self.keyring.add(device_key)
        self.session: SyncSession | None = None
        self.received: list[bytes] = []
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._pending: list[bytes] = []

    @property
    def map(self) -> LwwMap:
        return self.replica.scope(self.scope)

    def events(self, stream: str) -> list[Any]:
        inbound = self.replica.inbox.get((self.device_id, stream))
        return [] if inbound is None else list(inbound.items)

    def set_desired(self, spec: WorkloadSpec) -> None:
        delta = signed_write(
            self.replica, self.desired, spec.name, spec.model_dump(mode="json"), self.hub
        )
        if self.session is not None:
            self._pending += self.session.local_update(self.desired, delta)

    async def run(self) -> None:
        while True:
            try:
                await self._connected()
            except* aiomqtt.MqttError:
                self.connected.clear()
                self.session = None
            await asyncio.sleep(0.2)

    async def _connected(self) -> None:
        up = device_topic(REGION, self.device_id, "up")
        down = device_topic(REGION, self.device_id, "down")
        async with connected(
            aiomqtt.Client("127.0.0.1", self.port, identifier="test-hub")
        ) as client:
            await client.subscribe(up, qos=1)
            session = SyncSession(
                self.replica,
                self.device_id,
                self.signer,
                self.keyring,
                SystemClock(),
                scopes=[self.scope, self.desired],
            )
            self.session = session
            self.connected.set()

            def handle(payload: bytes) -> list[bytes]:
                self.received.append(payload)
                return session.receive(payload)

            await serve_session(client, session, down, pending=self._pending, handle=handle)
