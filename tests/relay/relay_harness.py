"""A region for relay tests: real brokers, a relay, agents, and a hub side (a
test sink, or the hub's reconciler on a real SQLite store); and
:func:`collect_until`, for broker ACL tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import yaml

from cloud_hub._sqlite_store import SQLiteStore, open_sqlite_store
from cloud_hub.ingest import BatchIngestor, BatchRefusedError
from cloud_hub.reconciler import BrokerAddress, FleetObserver, Reconciler, ReconcilerSettings
from cloud_hub.store import DeviceRecord
from edge_agent._mqtt import connected
from edge_agent.agent import Agent, relay_peer_id
from edge_agent.config import AgentConfig
from edge_agent.identity import load_or_create_device_key
from firmware_profiles import FirmwareProfile, load_profile
from regional_relay.config import RelayConfig, load_relay_config
from sync.envelope import decode_envelope_unverified
from sync.hlc import HybridLogicalClock, SystemClock
from sync.keys import KeyRing, Signer
from sync.models import WorkloadSpec
from sync.protocol import SyncSession
from sync.relaying import BATCH
from sync.replica import Replica
from sync.signed import signed_write
from sync.topics import hub_topic
from tests.fixtures_mqtt import MosquittoBroker, relay_broker
from tests.helpers import serve_session

REGION = "north"
RELAY_PASSWORD = "relay-secret"
SLEEPER = (sys.executable, "-c", "import time; time.sleep(3600)")


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@dataclass
class Region:
    """Brokers, keys and configs of one test region."""

    root: Path
    devices: list[str]
    relay_overrides: dict[str, Any] = field(default_factory=dict)
    region_broker: MosquittoBroker = field(init=False)
    hub_broker: MosquittoBroker = field(init=False)
    hub: Signer = field(default_factory=Signer.generate)
    relay_key: Signer = field(init=False)
    device_keys: dict[str, Signer] = field(default_factory=dict)
    relay_config: RelayConfig = field(init=False)
    profile: FirmwareProfile = field(init=False)

    def __post_init__(self) -> None:
        users = {"relay": RELAY_PASSWORD, **{d: f"pw-{d}" for d in self.devices}}
        self.region_broker = relay_broker(self.root / "region-broker", users)
        self.hub_broker = MosquittoBroker(self.root / "hub-broker")
        self.profile = load_profile("generic-x86_64")
        relay_dir = self.root / "relay"
        relay_dir.mkdir(parents=True)
        (relay_dir / "hub.pub").write_text(b64(self.hub.public_key_bytes) + "\n")
        (relay_dir / "relay.password").write_text(RELAY_PASSWORD + "\n")
        for device in self.devices:
            data_dir = self.root / "agents" / device
            data_dir.mkdir(parents=True)
            self.device_keys[device] = load_or_create_device_key(data_dir / "device.key")
            (data_dir / "hub.pub").write_text(b64(self.hub.public_key_bytes) + "\n")
            (data_dir / "mqtt.password").write_text(f"pw-{device}\n")
        (relay_dir / "devices.yaml").write_text(
            yaml.safe_dump({d: b64(k.public_key_bytes) for d, k in self.device_keys.items()})
        )
        self.relay_config_path = relay_dir / "relay.yaml"
        self.relay_config_path.write_text(
            yaml.safe_dump(
                {
                    "relay_id": "relay-1",
                    "region": REGION,
                    "data_dir": str(relay_dir),
                    "devices_file": str(relay_dir / "devices.yaml"),
                    "downstream": {
                        "url": self.region_broker.url,
                        "credentials": {
                            "username": "relay",
                            "password_file": str(relay_dir / "relay.password"),
                        },
                    },
                    "upstream": {"url": self.hub_broker.url},
                    "batch": {"max_delay_ms": 50},
                    "resend": {"ack_timeout_s": 1.0, "backoff_initial_s": 0.2},
                    "reconnect": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
                    "presence": {"summary_interval_s": 0.5},
                    **self.relay_overrides,
                }
            )
        )
        self.relay_config = load_relay_config(self.relay_config_path)
        self.relay_key = load_or_create_device_key(relay_dir / "relay.key")
        for device in self.devices:
            data_dir = self.root / "agents" / device
            (data_dir / "relays.pub").write_text(b64(self.relay_key.public_key_bytes) + "\n")

    def agent_config(self, device: str) -> AgentConfig:
        data_dir = self.root / "agents" / device
        return AgentConfig.for_profile(
            {
                "device_id": device,
                "region": REGION,
                "data_dir": str(data_dir),
                "profile": self.profile.name,
                "relays": [self.region_broker.url],
                "credentials": {
                    "username": device,
                    "password_file": str(data_dir / "mqtt.password"),
                },
                "drivers": ["process"],
                "supervisor": {"reconcile_interval_s": 0.2},
                "link": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
            },
            self.profile,
        )

    def agent(self, device: str) -> Agent:
        return Agent(self.agent_config(device), self.profile)


class HubSink:
    """The hub side of a region: ingests batches (deduped), acks them, and
    syncs signed desired state down to the relay."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.relay_keys = KeyRing()
        self.relay_keys.add(region.relay_key.public_key_bytes)
        self.device_keys = {d: _ring(k) for d, k in region.device_keys.items()}
        self.replica = Replica("hub", HybridLogicalClock(SystemClock()))
        self.scopes = [f"desired/{d}" for d in region.devices]
        for scope in self.scopes:
            self.replica.scope(scope)
        self.ingestor = BatchIngestor(
            self.replica,
            relays={region.relay_config.relay_id: (REGION, self.relay_keys)},
            device_keys=self.device_keys,
        )
        # (scope, origin, counter): each dot counted once, when first merged
        # (entries, and context-only dots of superseded writes).
        self.dots: Counter[tuple[str, str, int]] = Counter()
        self.events: dict[tuple[str, str], list[int]] = defaultdict(list)  # ingest order
        self.presence: list[dict[str, Any]] = []
        self.aggregates: list[dict[str, Any]] = []
        self.batches = 0
        self.rejected = 0
        self.session: SyncSession | None = None
        self.connected = asyncio.Event()
        self._pending: list[bytes] = []

    def unique_events(self, device: str, stream: str = "events") -> list[int]:
        return self.events[(device, stream)]

    def set_desired(self, device: str, spec: WorkloadSpec) -> None:
        delta = signed_write(
            self.replica,
            f"desired/{device}",
            spec.name,
            spec.model_dump(mode="json"),
            self.region.hub,
        )
        if self.session is not None:
            self._pending += self.session.local_update(f"desired/{device}", delta)

    async def run(self) -> None:
        while True:
            try:
                await self._connected()
            except* aiomqtt.MqttError:
                self.connected.clear()
                self.session = None
            await asyncio.sleep(0.2)

    async def _connected(self) -> None:
        up, down = hub_topic(REGION, "up"), hub_topic(REGION, "down")
        port = self.region.hub_broker.port
        async with connected(aiomqtt.Client("127.0.0.1", port, identifier="test-hub")) as client:
            await client.subscribe(up, qos=1)
            session = SyncSession(
                self.replica,
                relay_peer_id(REGION),
                self.region.hub,
                self.relay_keys,
                SystemClock(),
                scopes=self.scopes,
            )
            self.session = session
            self.connected.set()

            def handle(payload: bytes) -> list[bytes]:
                if decode_envelope_unverified(payload).type == BATCH:
                    return self._ingest(payload)
                return session.receive(payload)

            await serve_session(client, session, down, pending=self._pending, handle=handle)

    def _ingest(self, data: bytes) -> list[bytes]:
        """What the hub does with a batch: :class:`BatchIngestor` verifies, dedupes
        and keeps streams in order (an EVENTS item that does not follow on is
        held, not acknowledged, so the relay sends it again after the missing one).
        """
        try:
            result = self.ingestor.ingest(data, SystemClock().now_ms())
        except BatchRefusedError:
            self.rejected += 1
            return []
        self.batches += 1
        self.rejected += result.rejected.total()
        for scope, dots in result.merged_dots.items():
            for origin, counter in dots:  # small vectors in these tests
                self.dots[(scope, origin, counter)] += 1
        for key, run in result.events.items():
            self.events[key].extend(range(run.start, run.end))
        self.presence += [
            {"presence": p.report.to_wire(), "counters": p.counters} for p in result.presence
        ]
        self.aggregates += [a.to_wire() for a in result.aggregates]
        if not result.acked:
            return []
        return [self.ingestor.ack(result, self.region.hub, seq=self.batches, ts=1)]


def _ring(key: Signer) -> KeyRing:
    ring = KeyRing()
    ring.add(key.public_key_bytes)
    return ring


def phase(agent: Agent, name: str) -> str:
    """The supervisor phase of ``name`` on ``agent`` ("" if it has no record)."""
    return getattr(agent.supervisor.record(name), "phase", "")


@contextlib.asynccontextmanager
async def brokers(region: Region) -> AsyncIterator[None]:
    """The region's and the hub's brokers running."""
    region.region_broker.start()
    region.hub_broker.start()
    try:
        yield
    finally:
        region.region_broker.stop()
        region.hub_broker.stop()


def device_record(region: Region, device: str) -> DeviceRecord:
    """The hub's record of ``device`` enrolled in the region."""
    return DeviceRecord(
        id=device,
        region=REGION,
        profile=region.profile.name,
        public_key=b64(region.device_keys[device].public_key_bytes),
        arch="x86_64",
    )


@contextlib.asynccontextmanager
async def hub_store(region: Region, enrolled: list[str]) -> AsyncIterator[SQLiteStore]:
    """Both brokers running and a hub store with ``enrolled`` devices."""
    async with brokers(region):
        store = await asyncio.to_thread(open_sqlite_store, region.root / "hub.db")
        async with store:
            await store.add_devices([device_record(region, d) for d in enrolled])
            yield store


def reconciler(
    region: Region, store: SQLiteStore, observer: FleetObserver | None = None
) -> Reconciler:
    """The hub's reconciler for the region, with short test timings."""
    return Reconciler(
        store,
        region.hub,
        BrokerAddress("127.0.0.1", region.hub_broker.port),
        {region.relay_config.relay_id: (REGION, _ring(region.relay_key))},
        observer=observer,
        settings=ReconcilerSettings(backoff_initial_s=0.05, backoff_max_s=0.5, tick_s=0.1),
    )


async def collect_until(
    c: aiomqtt.Client, marker: bytes, *, within: float = 15.0
) -> list[tuple[str, bytes]]:
    """Every ``(topic, payload)`` that ``c`` receives up to and including ``marker``.

    How "does not arrive" is shown without sleeping: after the forbidden
    messages, a marker goes the same way on an allowed topic; Mosquitto delivers
    one publisher's messages to a subscriber in order, so once the marker is in,
    anything that was going to arrive has arrived.
    """
    seen: list[tuple[str, bytes]] = []
    async with asyncio.timeout(within):
        async for msg in c.messages:
            payload = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
            seen.append((str(msg.topic), payload))
            if payload == marker:
                return seen
    raise AssertionError("message stream ended")  # pragma: no cover
