"""The real stack in one process: a hub, one relay per region, simulated devices.

``novacron demo`` and ``novacron sim run`` compose the product's own parts
exactly as an installation would, only on loopback and in one event loop:

* the hub (:class:`cloud_hub.server.Hub`) with its SQLite store in a data
  directory, connected straight to the MQTT broker;
* per region a :class:`regional_relay.relay.Relay` whose *downstream* is the
  same broker (where the region's agents publish) and whose *upstream* (the hub
  topics) goes through a :class:`~simulator.netproxy.TcpProxy` to that broker,
  so cutting the proxy cuts the region from the hub and nothing else;
* devices: real :class:`edge_agent.agent.Agent` instances, enrolled through the
  hub's enrollment API with enrollment tokens (the code path of ``novacron
  agent enroll``), running their workloads on the ``sim`` driver.

Workloads and placement: the firmware profiles list the runtimes a real device
of that class has (``process``, ``podman``, ``libvirt``) and the hub places by
them, so sample deployments name the ``process`` driver, and each simulated
device serves that driver name with a :class:`edge_agent.drivers.sim.SimDriver`
(nothing is started on the host).

Timings are shortened for a live run (:class:`Tuning`): relays reconnect within
a couple of seconds and summarise presence every two; batch resends keep the
production timeout (a shorter one turns a busy hub into a resend storm).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import yaml

from cloud_hub.client import HubClient
from cloud_hub.config import HubConfig
from cloud_hub.server import Hub
from edge_agent._mqtt import connected
from edge_agent._service import Service
from edge_agent.agent import Agent
from edge_agent.config import load_agent_config
from edge_agent.drivers.sim import SimDriver
from edge_agent.enroll import EnrollOptions, enroll
from edge_agent.identity import load_or_create_device_key
from firmware_profiles import FirmwareProfile, load_profile
from regional_relay.config import RelayConfig
from regional_relay.relay import Relay
from simulator.netproxy import TcpProxy
from sync.crdt import LwwMap
from sync.topics import device_topic

__all__ = [
    "DeviceSetup",
    "FleetStack",
    "SimDevice",
    "SkewedClock",
    "Tuning",
    "create_tokens",
    "enroll_devices",
    "relay_id_for",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tuning:
    """Timings of a simulated run (shorter than production defaults)."""

    hub_tick_s: float = 0.5
    relay_batch_delay_ms: int = 100
    relay_ack_timeout_s: float = 10.0
    """Batch resend timeout: the production default. Shorter makes a busy hub's slow
    acks look like losses and the resends a storm (measured at 1,000 devices)."""
    relay_resend_backoff_max_s: float = 30.0
    relay_backoff_max_s: float = 2.0
    """Reconnect backoff cap: a healed region is back within a couple of seconds."""
    relay_summary_s: float = 2.0
    relay_keepalive_s: int = 10
    agent_backoff_initial_s: float = 0.2
    agent_backoff_max_s: float = 5.0
    agent_ack_timeout_s: float = 5.0
    agent_reconcile_s: float = 5.0
    agent_keepalive_s: int = 15


def relay_id_for(region: str) -> str:
    """The relay id of a region's (single) relay."""
    return f"relay-{region}-1"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _broker_hostport(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


class FleetStack(Service):
    """A hub and one relay per region on one broker, as an async context manager.

    Args:
        root: working directory (relays' data; the hub's unless ``hub_data_dir``).
        broker_url: ``mqtt://host:port`` of the broker every part uses.
        regions: region names.
        listen: the hub API's ``HOST:PORT`` (port 0: any free one).
        hub_data_dir: where the hub keeps its store and keys.
        tuning: timings.

    Attributes:
        hub: the running hub (once entered).
        relays: region -> running relay (absent while killed).
        proxies: region -> the proxy on the relay's upstream link.
        admin_token: an admin API token made at start.
    """

    def __init__(
        self,
        root: Path,
        broker_url: str,
        regions: Sequence[str],
        *,
        listen: str = "127.0.0.1:0",
        hub_data_dir: Path | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.broker_url = broker_url
        self.broker_host, self.broker_port = _broker_hostport(broker_url)
        self.regions = tuple(regions)
        self.listen = listen
        self.hub_data_dir = hub_data_dir or root / "hub"
        self.tuning = tuning or Tuning()
        self.hub: Hub | None = None
        self.relays: dict[str, Relay] = {}
        self.proxies: dict[str, TcpProxy] = {}
        self.admin_token = ""
        self._hub_url = ""
        self._relay_configs: dict[str, RelayConfig] = {}
        self._relay_keys: dict[str, str] = {}

    # -- lifecycle -----------------------------------------------------------------

    def _hub_config(self) -> HubConfig:
        return HubConfig.model_validate(
            {
                "listen": self.listen,
                "data_dir": str(self.hub_data_dir),
                "broker": {"url": self.broker_url},
                "regions": {
                    region: {
                        "relay_id": relay_id_for(region),
                        "relay_public_key": self._relay_keys[region],
                        "relays": [self.broker_url],
                    }
                    for region in self.regions
                },
                "tick_interval_s": self.tuning.hub_tick_s,
            }
        )

    def _relay_config(self, region: str, upstream_port: int) -> RelayConfig:
        t = self.tuning
        data_dir = self.root / "relays" / region
        return RelayConfig.model_validate(
            {
                "relay_id": relay_id_for(region),
                "region": region,
                "data_dir": str(data_dir),
                "downstream": {"url": self.broker_url, "keepalive_s": t.relay_keepalive_s},
                "upstream": {
                    "url": f"mqtt://127.0.0.1:{upstream_port}",
                    "keepalive_s": t.relay_keepalive_s,
                },
                "batch": {"max_delay_ms": t.relay_batch_delay_ms},
                "resend": {
                    "ack_timeout_s": t.relay_ack_timeout_s,
                    "backoff_initial_s": 0.2,
                    "backoff_max_s": t.relay_resend_backoff_max_s,
                },
                "reconnect": {"backoff_initial_s": 0.2, "backoff_max_s": t.relay_backoff_max_s},
                "presence": {"summary_interval_s": t.relay_summary_s},
                "outbox": {"integrity_check": "quick"},
            }
        )

    def _prepare_relay_dirs(self) -> None:
        for region in self.regions:
            data_dir = self.root / "relays" / region
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = load_or_create_device_key(data_dir / "relay.key")
            self._relay_keys[region] = _b64(key.public_key_bytes)

    def _share_hub_key(self) -> None:
        text = (self.hub_data_dir / "hub.pub").read_text(encoding="ascii")
        for region in self.regions:
            (self.root / "relays" / region / "hub.pub").write_text(text, encoding="ascii")

    async def _start(self) -> None:
        await asyncio.to_thread(self._prepare_relay_dirs)
        for region in self.regions:
            proxy = TcpProxy(self.broker_host, self.broker_port, name=f"{region}-to-hub")
            self.proxies[region] = await self._stack.enter_async_context(proxy)
        self._stack.push_async_callback(self.stop_hub)
        await self.start_hub()
        assert self.hub is not None and self.hub.tokens is not None
        self.admin_token, _ = await asyncio.to_thread(self.hub.tokens.create, "sim-admin", "admin")
        await asyncio.to_thread(self._share_hub_key)
        for region in self.regions:
            self._relay_configs[region] = self._relay_config(region, self.proxies[region].port)
        self._stack.push_async_callback(self._stop_relays)
        await asyncio.gather(*(self.start_relay(region) for region in self.regions))

    async def _stop_relays(self) -> None:
        await asyncio.gather(*(self.stop_relay(r) for r in list(self.relays)))

    # -- controls ------------------------------------------------------------------

    @property
    def hub_url(self) -> str:
        """The hub API's base URL (kept while the hub is stopped: it restarts there)."""
        if self.hub is not None:
            self._hub_url = self.hub.url
        return self._hub_url

    def client(self) -> HubClient:
        """An API client with the admin token (the caller closes it)."""
        return HubClient(self.hub_url, self.admin_token)

    async def start_hub(self) -> None:
        """Start (or restart, on the same port and data) the hub; a no-op when running."""
        if self.hub is not None:
            return
        hub = Hub(self._hub_config())
        await hub.__aenter__()
        self.hub = hub
        host, _, _ = self.listen.rpartition(":")
        self.listen = f"{host}:{hub.port}"  # a restart comes back where agents know it

    async def stop_hub(self) -> None:
        """Stop the hub (its store stays on disk for the restart)."""
        hub, self.hub = self.hub, None
        if hub is not None:
            await hub.aclose()

    async def start_relay(self, region: str) -> None:
        """Start (or restart) the region's relay; a no-op when running."""
        if region in self.relays:
            return
        relay = Relay(self._relay_configs[region])
        await relay.__aenter__()
        self.relays[region] = relay

    async def stop_relay(self, region: str) -> None:
        """Stop the region's relay (its outbox stays on disk for the restart)."""
        relay = self.relays.pop(region, None)
        if relay is not None:
            await relay.aclose()

    def partition(self, region: str) -> None:
        """Cut the region's relay from the hub."""
        self.proxies[region].partition("cut")

    def heal(self, region: str) -> None:
        """Reconnect the region's relay to the hub."""
        self.proxies[region].heal()

    async def hub_scopes(self, names: Sequence[str]) -> dict[str, LwwMap]:
        """The hub store's copy of some scopes (missing ones are empty)."""
        assert self.hub is not None and self.hub.store is not None
        store = self.hub.store
        from sync._msgpack_strict import unpackb_strict  # noqa: PLC0415

        out: dict[str, LwwMap] = {}
        for name in names:
            blob = await store.get_scope(name)
            out[name] = LwwMap() if blob is None else LwwMap.from_wire(unpackb_strict(blob))
        return out


# -- devices ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceSetup:
    """A simulated device enrolled with the hub: where its files are."""

    index: int
    region: str
    profile: str
    device_id: str
    config_path: Path


def _agent_settings(tuning: Tuning) -> dict[str, Any]:
    return {
        "link": {
            "backoff_initial_s": tuning.agent_backoff_initial_s,
            "backoff_max_s": tuning.agent_backoff_max_s,
            "ack_timeout_s": tuning.agent_ack_timeout_s,
            "keepalive_s": tuning.agent_keepalive_s,
        },
        "supervisor": {"reconcile_interval_s": tuning.agent_reconcile_s},
    }


async def create_tokens(
    api: HubClient,
    plan: Sequence[tuple[str, str]],
    *,
    labels: Mapping[str, str] | None = None,
) -> dict[tuple[str, str], str]:
    """One enrollment token per ``(region, profile)`` of ``plan``, ``max_uses`` =
    how many devices of the plan it admits; each device also gets the label
    ``profile``.

    Returns:
        ``(region, profile)`` -> the secret token.
    """
    groups: dict[tuple[str, str], int] = {}
    for key in plan:
        groups[key] = groups.get(key, 0) + 1
    tokens: dict[tuple[str, str], str] = {}
    for (region, profile), count in sorted(groups.items()):
        answer = await api.create_enroll_token(
            name=f"sim-{region}-{profile}",
            region=region,
            labels={**(labels or {}), "profile": profile},
            max_uses=count,
        )
        tokens[(region, profile)] = str(answer["token"])
    return tokens


async def enroll_devices(
    hub_url: str,
    root: Path,
    plan: Sequence[tuple[int, str, str]],
    tokens: Mapping[tuple[str, str], str],
    *,
    tuning: Tuning | None = None,
    concurrency: int = 8,
) -> list[DeviceSetup]:
    """Enroll one device per ``(index, region, profile)`` of ``plan``.

    Each device runs the agent's own enrollment (:func:`edge_agent.enroll.enroll`,
    what ``novacron agent enroll`` does): key made, facts gathered, token redeemed
    at the hub's API, ``agent.yaml``, ``hub.pub`` and the broker password written.

    Args:
        hub_url: the hub's URL as devices reach it.
        root: devices' data directories go under ``root/devices``.
        plan: per device, its index (names its directory), region and profile.
        tokens: from :func:`create_tokens`.
        tuning: agent timings written into each config.
        concurrency: enrollments in flight at once.

    Returns:
        The enrolled devices, in plan order.
    """
    settings = _agent_settings(tuning or Tuning())
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int, region: str, profile: str) -> DeviceSetup:
        data_dir = root / "devices" / f"d{index:05d}"
        config_path = data_dir / "agent.yaml"
        async with slots:
            await asyncio.to_thread(_write_initial_config, config_path, settings)
            result = await enroll(
                EnrollOptions(
                    hub_url=hub_url,
                    token=tokens[(region, profile)],
                    config_path=config_path,
                    profile=profile,
                    data_dir=data_dir,
                )
            )
        return DeviceSetup(index, result.region, profile, result.device_id, config_path)

    return list(await asyncio.gather(*(one(i, r, p) for i, r, p in plan)))


def _write_initial_config(path: Path, settings: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(yaml.safe_dump(dict(settings)), encoding="utf-8")


class SkewedClock:
    """The system wall clock plus an offset (a ``clock_skew`` fault sets it).

    The agent reads wall time only through its :class:`~sync.hlc.Clock`, so
    moving this offset is, to the agent, the device's clock jumping.
    """

    def __init__(self) -> None:
        self.offset_ms = 0

    def now_ms(self) -> int:
        """System time in ms since the epoch, plus the offset."""
        return time.time_ns() // 1_000_000 + self.offset_ms


@dataclass
class SimDevice:
    """One simulated device: a real agent with the ``sim`` driver.

    Attributes:
        setup: where its files are.
        profile: its firmware profile.
        driver: its simulated runtime (shared across restarts of the agent).
        clock: its wall clock (shared across restarts, as a device's RTC is).
        agent: the running agent, or ``None`` while stopped.
        disk_full: a ``fill_disk`` fault is in force (its journal cannot grow).
    """

    setup: DeviceSetup
    profile: FirmwareProfile
    driver: SimDriver
    clock: SkewedClock = field(default_factory=SkewedClock)
    agent: Agent | None = None
    starts: int = field(default=0)
    disk_full: bool = False

    @classmethod
    async def load(cls, setup: DeviceSetup) -> SimDevice:
        """Read the enrolled config's profile and make the driver."""
        profile = await asyncio.to_thread(load_profile, setup.profile)
        return cls(setup, profile, SimDriver(setup.device_id))

    @property
    def device_id(self) -> str:
        """The hub-assigned device id."""
        return self.setup.device_id

    @property
    def running(self) -> bool:
        """Whether the agent runs."""
        return self.agent is not None

    async def start(self) -> None:
        """Start the agent (a no-op when it runs)."""
        if self.agent is not None:
            return
        config = await asyncio.to_thread(load_agent_config, self.setup.config_path)
        agent = Agent(config, self.profile, drivers={"process": self.driver}, clock=self.clock)
        await agent.__aenter__()
        self.agent = agent
        self.starts += 1
        if self.disk_full:
            await agent.journal.freeze_size(True)

    async def set_disk_full(self, full: bool) -> None:
        """Start or end a full disk (``fill_disk``): the agent's journal cannot grow.

        A real full disk would be the host's; the journal's file is frozen at its
        size instead (:meth:`~edge_agent.journal.Journal.freeze_size`), and stays
        so across a restart of the agent while the fault lasts.
        """
        self.disk_full = full
        if self.agent is not None:
            await self.agent.journal.freeze_size(full)

    async def stop(self) -> None:
        """Stop the agent (its journal stays: a restart resumes from it)."""
        agent, self.agent = self.agent, None
        if agent is not None:
            await agent.aclose()

    async def send_garbage(self, size: int) -> None:
        """Publish ``size`` random bytes on this device's upstream topic (``garbage``).

        As the device's own broker account, on a connection of its own next to
        the agent's (which goes on undisturbed): what the relay sees is a device
        sending bytes that are not an envelope. Plain MQTT only, as the
        simulator's brokers are.
        """
        config = await asyncio.to_thread(load_agent_config, self.setup.config_path)
        relay = config.relays[0]
        username = password = None
        if config.credentials is not None:
            username = config.credentials.username
            password = await asyncio.to_thread(config.credentials.read_password)
        client = aiomqtt.Client(
            relay.host,
            relay.port,
            identifier=f"nc-{self.device_id}-garbage",
            username=username,
            password=password,
        )
        async with connected(client):
            await client.publish(
                device_topic(config.region, config.device_id, "up"), os.urandom(size), qos=1
            )

    def scope(self, name: str) -> LwwMap | None:
        """The agent's replica of a scope (``None`` while stopped)."""
        if self.agent is None:
            return None
        scope: LwwMap = self.agent.replica.scope(name)
        return scope

    async def running_workloads(self) -> dict[str, str]:
        """Workload name -> version of what the simulated runtime runs now."""
        return {s.name: s.version or "?" for s in await self.driver.list() if s.phase == "running"}
