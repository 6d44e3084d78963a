"""The edge agent: journal, supervisor, local control and upstream link.

:class:`Agent` is an async context manager owning a task group of named
tasks. Its start order is the point of the design: the journal opens (and
quarantines a corrupt file), the device scope is rebuilt from it, and the
supervisor reconciles at once — before, and without, any network. The link
to the relay starts last and only if the device is enrolled (the hub's public
key is on disk); without it the agent runs fully offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from edge_agent._exceptions import AgentError, NotEnrolledError
from edge_agent._runtime import child_watcher, io_executor
from edge_agent._service import Service
from edge_agent.config import AgentConfig
from edge_agent.control import ControlServer
from edge_agent.drivers import WorkloadDriver
from edge_agent.identity import (
    load_hub_public_key,
    load_or_create_device_key,
    load_relay_public_keys,
)
from edge_agent.journal import EventIn, Journal
from edge_agent.state import OVERRIDE, REPORTED, DeviceState, device_scope, is_signed_scope
from edge_agent.supervisor import Supervisor
from edge_agent.sysmetrics import CpuSampler, sample_device_metrics
from firmware_profiles import FirmwareProfile, load_profile
from sync.envelope import packb
from sync.hlc import Clock, HybridLogicalClock, SystemClock
from sync.keys import KeyRing
from sync.models import WorkloadPhase, WorkloadStatus
from sync.protocol import Replica, SyncSession
from sync.signed import EntryVerifier

log = logging.getLogger(__name__)

EVENTS_STREAM = "events"


def relay_peer_id(region: str) -> str:
    """The sync peer id an agent expects: every relay of its region signs as it."""
    return f"relay.{region}"


METRICS_STREAM = "metrics"
STREAM_WINDOW = 20_000


class Agent(Service):
    """One edge agent; use as ``async with Agent(config, profile) as agent``.

    Args:
        config: the validated agent config.
        profile: its firmware profile.
        drivers: drivers to use instead of building them from the config
            (the simulator passes its ``sim`` driver).
        clock: wall clock for the HLC and the protocol.
    """

    def __init__(
        self,
        config: AgentConfig,
        profile: FirmwareProfile,
        *,
        drivers: dict[str, WorkloadDriver] | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.profile = profile
        self._given_drivers = drivers
        self.clock = clock or SystemClock()
        self.drivers: dict[str, WorkloadDriver] = {}
        self.started_at = time.monotonic()
        self._changed: dict[str, set[str] | None] = {}
        self.journal: Journal
        self.state: DeviceState
        self.supervisor: Supervisor
        self.link: Any = None

    # -- lifecycle -----------------------------------------------------------------------

    async def _start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            cfg.data_dir.chmod(0o700)
        self.journal = await self._stack.enter_async_context(
            Journal.open(
                cfg.data_dir / "journal.db", quota_bytes=cfg.quotas.journal_quota_mb * 1024 * 1024
            )
        )
        if self.journal.quarantined_path is not None:
            log.warning(
                "journal was corrupt and moved to %s; starting empty, will ask for a snapshot",
                self.journal.quarantined_path,
            )
        self.signer = await asyncio.to_thread(load_or_create_device_key, cfg.key_path)
        self.replica = Replica(cfg.device_id, HybridLogicalClock(self.clock))
        hub_key = await asyncio.to_thread(self._hub_key)
        self.hub_keys: KeyRing | None = None
        self._hub_key_bytes = b""
        if hub_key is not None:
            self.hub_keys = KeyRing()
            self.hub_keys.add(hub_key)
            self._hub_key_bytes = hub_key
        self.state = DeviceState(self.replica, self.journal, cfg.device_id, self.hub_keys)
        keys = await self.state.load()
        await self._restore_streams()
        log.info(
            "agent %s starting: %d state keys, %d desired workloads",
            cfg.device_id,
            keys,
            len(self.state.desired()),
        )
        self.drivers = self._given_drivers or await self._open_drivers()
        self.supervisor = Supervisor(self.drivers, self.state, self, settings=cfg.supervisor)
        for driver in self.drivers.values():
            if hasattr(driver, "on_exit"):  # drivers that can tell: react to exits at once
                driver.on_exit = lambda _name: self.supervisor.notify()
        await self._open_task_group()
        # Reconcile from the journal now: no network needed for workloads to run.
        self._spawn(self.supervisor.run(), name="supervisor")
        await self._stack.enter_async_context(ControlServer(cfg.control_socket, self))
        self._spawn(self._metrics_loop(), name="metrics")
        if self.hub_keys is None:
            log.warning("not enrolled (no hub key in %s): running offline only", cfg.data_dir)
        else:
            self._start_link(self.hub_keys)

    async def _open_drivers(self) -> dict[str, WorkloadDriver]:
        from edge_agent import drivers as d  # noqa: PLC0415

        cfg = self.config
        out: dict[str, WorkloadDriver] = {}
        for name in cfg.drivers:
            driver: Any
            match name:
                case "process":
                    driver = d.ProcessDriver(cfg.device_id, cfg.data_dir / "logs")
                case "podman":
                    driver = d.PodmanDriver(cfg.device_id, url=cfg.podman_url)
                case "libvirt":
                    driver = d.LibvirtDriver(cfg.device_id, uri=cfg.libvirt_uri)
                case "sim":
                    driver = d.SimDriver(cfg.device_id)
            driver = await self._stack.enter_async_context(driver)
            cap = await driver.probe()
            if not cap.available:
                log.warning("driver %s unavailable: %s", name, cap.reason)
                continue
            out[name] = driver
        return out

    def _hub_key(self) -> bytes | None:
        try:
            return load_hub_public_key(self.config.data_dir)
        except NotEnrolledError:
            return None

    def _start_link(self, hub_keys: KeyRing) -> None:
        from edge_agent.link import UpstreamLink  # noqa: PLC0415

        # Envelopes come from the region's relays (or the hub itself); desired
        # entries inside them must carry the hub's own signature as well.
        keyring = KeyRing()
        for key in [*load_relay_public_keys(self.config.data_dir), self._hub_key_bytes]:
            keyring.add(key)
        self.link = UpstreamLink(
            self.config,
            self.replica,
            self.signer,
            keyring,
            self.clock,
            bd_seq=self.journal.bd_seq,
            scopes=self.state.scopes,
            streams=(EVENTS_STREAM, METRICS_STREAM),
            on_change=self._on_remote_change,
            after_receive=self._after_receive,
            validate=EntryVerifier(hub_keys, is_signed_scope),
            peer_id=relay_peer_id(self.config.region),
        )
        self._spawn(self.link.run(), name="link")

    # -- events --------------------------------------------------------------------------

    async def _restore_streams(self) -> None:
        """Put unacknowledged journal events back into the send window."""
        for name in (EVENTS_STREAM, METRICS_STREAM):
            stream = self.replica.stream(name, STREAM_WINDOW)
            acked = await self.journal.acked_seq(name)
            stream.first_seq = acked + 1
            for event in await self.journal.read_events(name, after_seq=acked, limit=STREAM_WINDOW):
                while stream.next_seq < event.seq:  # seqs the journal dropped for quota
                    stream.append(None)
                stream.append([event.kind, event.ts_ms, event.payload])

    async def record_event(self, stream_name: str, kind: str, payload: dict[str, Any]) -> int:
        """Append an event durably, then offer it to the link; return its seq."""
        data = packb(payload)
        ts = self.clock.now_ms()
        (seq,) = await self.journal.append_events(stream_name, [EventIn(kind, data, ts)])
        stream = self.replica.stream(stream_name, STREAM_WINDOW)
        while stream.next_seq < seq:
            stream.append(None)
        if stream.next_seq == seq:
            stream.append([kind, ts, data])
        return seq

    async def _metrics_loop(self) -> None:
        cpu = CpuSampler()
        interval = self.profile.telemetry_interval_s
        while True:
            figures = await asyncio.to_thread(sample_device_metrics, cpu, self.config.data_dir)
            if figures:
                try:
                    await self.record_event(METRICS_STREAM, "metric", figures)
                except AgentError as exc:  # the journal refused a metric: counted there
                    log.debug("metric not recorded: %s", exc)
            await asyncio.sleep(interval)

    # -- supervisor sink ------------------------------------------------------------------

    async def on_transition(self, status: WorkloadStatus, previous: WorkloadPhase | None) -> None:
        """Journal a workload transition and publish it as reported state."""
        payload = status.model_dump(mode="json")
        payload["previous"] = previous
        await self.record_event(EVENTS_STREAM, "workload", payload)
        await self.write_state(REPORTED + status.name, status.model_dump(mode="json"))

    async def write_state(self, key: str, value: Any | None) -> None:
        """Write a key of the device scope (``None`` deletes it): durable in the
        journal first, then offered to the link (re-sent by anti-entropy if the
        link is down or its queue is full)."""
        delta = await self.state.write_local(key, value)
        if self.link is not None and self.link.session is not None:
            self.link.submit(self.link.session.local_update(self.state.scope_name, delta))

    # -- sync callbacks -------------------------------------------------------------------

    def _on_remote_change(self, scope: str, entries: list[list[Any]] | None) -> None:
        if scope not in self.state.scopes:
            return
        if entries is None:
            self._changed[scope] = None  # a snapshot chunk: persist everything
        else:
            keys = self._changed.setdefault(scope, set())
            if keys is not None:
                keys.update(e[0] for e in entries)

    async def _after_receive(self, session: SyncSession) -> None:
        changed, self._changed = self._changed, {}
        for scope, keys in changed.items():
            await self.state.persist_remote(scope, keys)
        if changed:
            self.supervisor.notify()
        # Release what upstream has acknowledged at the application level.
        peer = session.peer_vv.get(self.state.scope_name)
        if peer is not None:
            mine = peer.contiguous(self.config.device_id)
            if mine:
                await self.journal.ack_deltas_through(
                    self.state.scope_name, {self.config.device_id: mine}
                )
        for name in (EVENTS_STREAM, METRICS_STREAM):
            stream = self.replica.streams.get(name)
            if stream is not None and stream.first_seq > 1:
                await self.journal.ack_events(name, stream.first_seq - 1)

    # -- AgentControl ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Agent-wide status for ``novacron agent status``."""
        j = self.journal.stats()
        link: dict[str, Any] = {"enrolled": self.link is not None}
        if self.link is not None:
            s = self.link.stats
            link.update(
                connected=self.link.connected.is_set(),
                relay=s.connected_to,
                connects=s.connects,
                messages_out=s.messages_out,
                bytes_out=s.bytes_out,
                messages_in=s.messages_in,
                rejected_in=s.rejected_in,
                outbox_overflows=s.outbox_overflows,
            )
        return {
            "device_id": self.config.device_id,
            "region": self.config.region,
            "profile": self.profile.name,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "drivers": sorted(self.drivers),
            "workloads": len(self.state.desired()),
            "link": link,
            "journal": {
                "bd_seq": j.bd_seq,
                "event_bytes": j.event_bytes,
                "quota_bytes": j.quota_bytes,
                "dropped_metrics": j.dropped_metrics,
                "refused_metrics": j.refused_metrics,
                "quarantined": str(self.journal.quarantined_path or ""),
                # Workload transitions the journal refused (a full disk); each is
                # reported again once it takes writes.
                "unrecorded_transitions": self.supervisor.unrecorded,
            },
        }

    def workloads(self) -> list[dict[str, Any]]:
        """Every workload's status, with the override in force."""
        overrides = self.state.overrides()
        out = []
        for st in self.supervisor.statuses():
            row = st.model_dump(mode="json")
            row["override"] = overrides.get(st.name)
            out.append(row)
        return out

    async def logs(self, name: str, tail: int) -> str:
        """The tail of a workload's log (process driver)."""
        spec = self.state.desired().get(name)
        driver = self.drivers.get(getattr(spec, "driver", ""))
        logs = getattr(driver, "logs", None)
        if spec is None or logs is None:
            raise AgentError(f"no logs for workload {name!r} on this agent")
        text: str = await logs(name, tail)
        return text

    async def set_override(self, name: str, action: Literal["stop", "start"] | None) -> None:
        """Set or clear a local override; durable and synced upstream."""
        if name not in self.state.desired():
            raise AgentError(f"no workload named {name!r} on this device")
        value = None if action is None else {"action": action, "at_ms": self.clock.now_ms()}
        await self.write_state(OVERRIDE + name, value)
        self.supervisor.notify()


async def run_agent(
    config: AgentConfig,
    *,
    profile_dirs: Sequence[Path] = (),
    shutdown: asyncio.Event | None = None,
) -> int:
    """Run an agent until SIGTERM/SIGINT (or ``shutdown`` is set); return an exit code.

    The loop gets the agent's thread settings (see :mod:`edge_agent._runtime`):
    subprocess exits watched through pidfds rather than a thread per child, and
    a default executor sized to the enabled drivers.
    """
    profile = load_profile(config.profile, extra_dirs=tuple(profile_dirs))
    stop = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(io_executor(config.drivers))
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with child_watcher(loop):
        async with Agent(config, profile):
            log.info("agent %s running (pid %s)", config.device_id, os.getpid())
            await stop.wait()
            log.info("agent %s stopping", config.device_id)
    return 0


__all__ = [
    "EVENTS_STREAM",
    "METRICS_STREAM",
    "Agent",
    "device_scope",
    "relay_peer_id",
    "run_agent",
]
