"""Support for ``relay_bench.py``: brokers, a relay process, simulated devices, a hub sink.

* :func:`broker` — a private anonymous Mosquitto on a free loopback port, with
  the queue limits of the shipped ``examples/mosquitto/relay.conf`` (a default
  Mosquitto drops QoS 1 messages beyond 1,000 queued per client, which a burst
  of thousands of envelopes would hit) and persistence off;
* :func:`prepare_region` — relay key, hub key, device registry and relay config;
* :class:`RelayProcess` — ``python -m novacron relay run --config FILE`` as a
  child process, optionally under ``cProfile``;
* :class:`SimDevice` / :func:`make_fleet` — one real :class:`SyncSession` per
  simulated device (no agent): it says HELLO to the relay over MQTT, then
  produces signed ``DELTAS`` envelopes exactly as an agent's session does;
* :class:`Fleet` — drives the device sessions over one MQTT connection
  (publishes their uplinks, answers the relay's downlinks);
* :class:`HubSink` — the hub side: verifies each batch (relay signature) and
  each device envelope inside it (device signature), counts distinct dots and
  answers ``BATCH_ACK``;
* :func:`passthrough_main` — the baseline: a bare aiomqtt loop that republishes
  every uplink from the region broker to the hub broker, run as its own
  process (``python bench/_relay_support.py passthrough REGION_PORT HUB_PORT``).

Ideas copied from ``tests/relay/relay_harness.py`` and ``tests/fixtures_mqtt.py``:
the bench must not import from ``tests/``. Every process started here is
stopped by the context manager that started it, on errors too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import _support  # bench/_support.py, next to this script
import aiomqtt

from edge_agent.agent import relay_peer_id
from edge_agent.identity import load_or_create_device_key
from sync._exceptions import NovaCronError
from sync.envelope import decode_envelope_unverified, unpackb_strict
from sync.hlc import HybridLogicalClock, SystemClock
from sync.keys import KeyRing, Signer
from sync.protocol import DELTAS, SyncSession
from sync.relaying import BATCH, decode_batch, encode_batch_ack, open_device_envelope
from sync.replica import Replica
from sync.topics import (
    device_topic,
    hub_topic,
    parse_topic,
    region_downlink_filter,
    region_uplink_filter,
)

REGION = "bench"
RELAY_ID = "relay-bench"
PASSTHROUGH_TOPIC = "bench/passthrough"
BenchError = _support.BenchError
# aiomqtt warns for every publish beyond ten pending: a burst is the point here.
MQTT_LOG = logging.getLogger("relay_bench.mqtt")
MQTT_LOG.setLevel(logging.ERROR)


def b64(key: bytes) -> str:
    """Base64 of raw key bytes, as the key files hold them."""
    return base64.b64encode(key).decode()


def stop_process(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, wait ``grace_s``, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far, from ``/proc/<pid>/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def broker(workdir: Path) -> Iterator[int]:
    """A private anonymous Mosquitto with queue limits raised for the load; yield its port."""
    with _support.mosquitto(
        workdir,
        "max_queued_messages 1000000\n"
        "max_queued_bytes 0\n"
        "max_inflight_messages 100\n"
        "message_size_limit 1048576\n",
    ) as port:
        yield port


# -- simulated devices ----------------------------------------------------------------------


@dataclass(slots=True)
class SimDevice:
    """One simulated device: its key, replica and session with the relay."""

    id: str
    signer: Signer
    replica: Replica
    session: SyncSession
    up: str

    @property
    def scope(self) -> str:
        """The device's own scope, which its DELTAS write."""
        return f"device/{self.id}"


def make_fleet(count: int, relay_public_key: bytes, deltas_per_envelope: int) -> list[SimDevice]:
    """``count`` devices with fresh keys, each with a session towards the relay."""
    ring = KeyRing()
    ring.add(relay_public_key)
    fleet = []
    for n in range(count):
        device = f"gw-{n:05d}"
        signer = Signer.generate()
        replica = Replica(device, HybridLogicalClock(SystemClock()))
        scopes = [f"device/{device}", f"desired/{device}"]
        for scope in scopes:
            replica.scope(scope)
        session = SyncSession(
            replica,
            relay_peer_id(REGION),
            signer,
            ring,
            SystemClock(),
            scopes=scopes,
            max_batch=max(deltas_per_envelope, 1),
        )
        fleet.append(
            SimDevice(device, signer, replica, session, device_topic(REGION, device, "up"))
        )
    return fleet


def make_envelopes(
    fleet: Sequence[SimDevice], per_device: int, deltas_per_envelope: int
) -> list[tuple[str, bytes]]:
    """Signed DELTAS envelopes, ``per_device`` from each device, round-robin.

    Each envelope writes the same ``deltas_per_envelope`` keys of the device's
    scope again (a gateway reporting its readings), so every delta has a dot
    of its own while the scope stays the same size.
    """
    out: list[tuple[str, bytes]] = []
    for round_ in range(per_device):
        for dev in fleet:
            entries = [
                dev.replica.set(
                    dev.scope, f"k{i:03d}", {"v": round_ * deltas_per_envelope + i}
                ).entries_wire()[0]
                for i in range(deltas_per_envelope)
            ]
            messages = dev.session.send_entries(dev.scope, entries)
            if len(messages) != 1:
                raise BenchError(f"{dev.id}: {len(messages)} envelopes for one batch of deltas")
            out.append((dev.up, messages[0]))
    return out


class Fleet:
    """Every simulated device over one MQTT connection to the region broker."""

    def __init__(self, devices: Sequence[SimDevice]) -> None:
        self.devices = {d.id: d for d in devices}
        self.down_types: Counter[str] = Counter()
        self.rejected = 0
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    async def run(self, port: int) -> None:
        """Connect, subscribe to every device's downlink and answer until cancelled."""
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier="bench-fleet",
            logger=MQTT_LOG,
            max_inflight_messages=256,
        ) as client:
            await client.subscribe(region_downlink_filter(REGION), qos=1)
            self.client = client
            self.connected.set()
            async for message in client.messages:
                if isinstance(message.payload, bytes):
                    await self._on_down(str(message.topic), message.payload)

    async def _on_down(self, topic: str, data: bytes) -> None:
        try:
            device = parse_topic(topic).device
            dev = self.devices[device or ""]
            self.down_types[decode_envelope_unverified(data).type] += 1
            replies = dev.session.receive(data)
        except (NovaCronError, KeyError):
            self.rejected += 1
            return
        await self.publish([(dev.up, r) for r in replies])

    async def publish(self, messages: Sequence[tuple[str, bytes]], window: int = 256) -> None:
        """Publish QoS 1, up to ``window`` at a time."""
        client = self.client
        if client is None:
            raise BenchError("the fleet is not connected")
        for start in range(0, len(messages), window):
            await asyncio.gather(
                *(client.publish(t, d, qos=1) for t, d in messages[start : start + window])
            )

    async def handshake(self, timeout_s: float) -> None:
        """HELLO from every device; wait until each session is confirmed both ways."""
        await self.publish([(d.up, m) for d in self.devices.values() for m in d.session.start()])
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = [
                d
                for d in self.devices.values()
                if not d.session.hello_confirmed or d.session.peer_session is None
            ]
            if not waiting:
                return
            if time.monotonic() > deadline:
                unconfirmed = sum(not d.session.hello_confirmed for d in waiting)
                raise BenchError(
                    f"{len(waiting)} devices got no HELLO through in {timeout_s} s "
                    f"({unconfirmed} unconfirmed; downlinks {dict(self.down_types)}, "
                    f"{self.rejected} rejected)"
                )
            await asyncio.sleep(0.5)
            # Resends the HELLO of a device when its backoff is due.
            await self.publish([(d.up, m) for d in waiting for m in d.session.tick()])


# -- the region on disk ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionSetup:
    """Keys and the relay config of one bench region."""

    config_path: Path
    hub: Signer
    relay_public_key: bytes


def prepare_region(workdir: Path, region_port: int, hub_port: int) -> RegionSetup:
    """Make the relay's data dir: relay key, hub key, config (devices come later)."""
    relay_dir = workdir / "relay"
    relay_dir.mkdir(parents=True, exist_ok=True)
    hub = Signer.generate()
    (relay_dir / "hub.pub").write_text(b64(hub.public_key_bytes) + "\n", encoding="ascii")
    relay_key = load_or_create_device_key(relay_dir / "relay.key")
    config_path = relay_dir / "relay.yaml"
    config = {
        "relay_id": RELAY_ID,
        "region": REGION,
        "data_dir": str(relay_dir),
        "devices_file": str(relay_dir / "devices.yaml"),
        "downstream": {"url": f"mqtt://127.0.0.1:{region_port}"},
        "upstream": {"url": f"mqtt://127.0.0.1:{hub_port}"},
        "outbox": {"integrity_check": "quick"},
        "presence": {"summary_interval_s": 5},
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return RegionSetup(config_path, hub, relay_key.public_key_bytes)


def write_device_registry(setup: RegionSetup, fleet: Sequence[SimDevice]) -> None:
    """Enroll the fleet: the relay's ``devices.yaml`` (device id to public key)."""
    registry = {d.id: b64(d.signer.public_key_bytes) for d in fleet}
    path = setup.config_path.parent / "devices.yaml"
    path.write_text(json.dumps(registry, indent=1) + "\n", encoding="utf-8")


class RelayProcess:
    """``python -m novacron relay run --config FILE`` as a child process.

    Args:
        config_path: the relay config.
        log_path: the relay's stderr.
        profile: if set, run it under ``cProfile`` and write the stats there
            (written when the relay exits on SIGTERM).
    """

    def __init__(self, config_path: Path, log_path: Path, profile: Path | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        cmd = [sys.executable]
        if self.profile is not None:
            cmd += ["-m", "cProfile", "-o", str(self.profile)]
        cmd += ["-m", "novacron", "--log-level", "INFO", "relay", "run"]
        cmd += ["--config", str(self.config_path)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=_support.REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, 60 if self.profile else 15)

    @property
    def pid(self) -> int:
        """The relay's pid."""
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise with the tail of the relay's log if it has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"relay exited with {self.proc.returncode}:\n{tail}")


# -- the hub side ---------------------------------------------------------------------------


@dataclass
class HubSink:
    """The hub end of the relay: verify, count distinct dots, acknowledge.

    Attributes:
        expected: distinct dots to wait for; :attr:`done` is set when counted.
    """

    hub: Signer
    relay_public_key: bytes
    device_keys: dict[str, bytes]
    expected: int
    dots: set[tuple[str, str, int]] = field(default_factory=set)
    batches: int = 0
    items: int = 0
    other_messages: int = 0
    done_at: float = 0.0
    relay_counters: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    relay_online: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._relay_ring = KeyRing()
        self._relay_ring.add(self.relay_public_key)
        self._device_rings: dict[str, KeyRing] = {}
        for device, key in self.device_keys.items():
            ring = KeyRing()
            ring.add(key)
            self._device_rings[device] = ring

    async def run(self, port: int) -> None:
        """Subscribe to the relay's hub topics and ingest until cancelled."""
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier="bench-hub", logger=MQTT_LOG
        ) as client:
            await client.subscribe(hub_topic(REGION, "up"), qos=1)
            await client.subscribe(hub_topic(REGION, "state"), qos=1)
            async for message in client.messages:
                if isinstance(message.payload, bytes):
                    await self._on_message(client, str(message.topic), message.payload)

    async def _on_message(self, client: aiomqtt.Client, topic: str, data: bytes) -> None:
        if topic == hub_topic(REGION, "state"):
            birth: Any = unpackb_strict(data)
            if isinstance(birth, dict) and birth.get("online"):
                self.relay_online.set()
        elif decode_envelope_unverified(data).type != BATCH:
            self.other_messages += 1  # the relay's hub session HELLO
        else:
            await client.publish(hub_topic(REGION, "down"), self.ingest(data), qos=1)

    def ingest(self, data: bytes) -> bytes:
        """Verify one batch end to end, count its dots; return the ``BATCH_ACK``."""
        batch = decode_batch(data, self._relay_ring)
        self.batches += 1
        for item in batch.items:
            self.items += 1
            if item.kind == "presence":
                report: Any = unpackb_strict(item.payload)
                self.relay_counters = report["counters"]
            if item.kind != "delta":
                continue
            env = open_device_envelope(item.payload, item.device, self._device_rings[item.device])
            if env.type != DELTAS:
                continue
            body: Any = env.decode_body()
            scope = body["sc"]
            self.dots.update((scope, e[2], e[3]) for e in body["d"])
        if len(self.dots) >= self.expected and not self.done.is_set():
            self.done_at = time.perf_counter()
            self.done.set()
        return encode_batch_ack(
            self.hub,
            src="hub",
            seq=self.batches,
            ts=int(time.time() * 1000),
            relay=batch.relay,
            ids=[i.id for i in batch.items],
        )


# -- the baseline ---------------------------------------------------------------------------


class Passthrough:
    """The baseline forwarder as a child process (see :func:`passthrough_main`)."""

    def __init__(self, region_port: int, hub_port: int) -> None:
        self.args = [str(region_port), str(hub_port)]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "passthrough", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)

    @property
    def pid(self) -> int:
        """The forwarder's pid."""
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self) -> None:
        """Block until the forwarder has subscribed (it prints one line)."""
        assert self.proc is not None and self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise BenchError(f"passthrough exited with {self.proc.wait()}")


async def _passthrough(region_port: int, hub_port: int) -> None:
    async with (
        aiomqtt.Client(
            "127.0.0.1", region_port, identifier="bench-pass-in", logger=MQTT_LOG
        ) as source,
        aiomqtt.Client("127.0.0.1", hub_port, identifier="bench-pass-out", logger=MQTT_LOG) as sink,
    ):
        await source.subscribe(region_uplink_filter(REGION), qos=1)
        print("ready", flush=True)
        async for message in source.messages:
            if isinstance(message.payload, bytes):
                await sink.publish(PASSTHROUGH_TOPIC, message.payload, qos=1)


def passthrough_main(argv: list[str]) -> int:
    """``passthrough REGION_PORT HUB_PORT``: republish every uplink until killed."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    asyncio.run(_passthrough(int(argv[1]), int(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(passthrough_main(sys.argv[1:]))
