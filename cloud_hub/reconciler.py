"""The hub's reconciler: relay batches in, signed desired state and registries out.

An async context manager over the hub's MQTT broker, the thin asyncio shell
around :class:`cloud_hub._reconciler_core.ReconcilerCore`::

    async with Reconciler(store, hub_signer, BrokerAddress("127.0.0.1", 1883),
                          relays, observer=controller, publish=bus.publish,
                          health=health) as reconciler:
        await reconciler.add_device(record)                 # enrollment
        await reconciler.set_desired("gw-1", "web", spec)   # DesiredWriter

Uplink (``nc/v1/hub/r/<region>/up``): every ``BATCH`` goes through a bounded
queue (overflow drops the batch and counts it; the relay resends it, since it
was never acknowledged) to one ingest task. The task takes every batch waiting
(up to ``max_group_batches``), ingests them in memory, commits the whole group
with one :meth:`Store.commit_ingest <cloud_hub.store.Store.commit_ingest>`
transaction, and only then publishes each batch's ``BATCH_ACK``. After that it
tells the observer (the :class:`~cloud_hub.controller.FleetController`) which
reported keys changed and which devices changed health, persists the health
changes and publishes fleet events. A commit that fails is rolled back in
memory (:meth:`ReconcilerCore.rollback`) and nothing is acknowledged: the
relays resend, and the batches are ingested again.

Other messages on the uplink belong to the hub's
:class:`~sync.protocol.SyncSession` with the region's relay (peer
``relay.<region>``), over the scopes the hub signs: ``desired/<device>`` for
every device of the region, and the region's device registry
``region/<region>`` (:mod:`regional_relay.registry`). Those scopes live in the
store (:meth:`Store.save_scopes <cloud_hub.store.Store.save_scopes>`) before
anything is sent, and a relay that reconnects later gets whatever it lacks from
its HELLO exchange.

Relay states (retained ``nc/v1/hub/r/<region>/state``) feed the
:class:`~cloud_hub.health.HealthTracker`; a periodic check turns region
reachability changes (a relay gone silent) into device health changes.

The connection to the broker is retried forever with a bounded, jittered
exponential backoff.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiomqtt

from cloud_hub._exceptions import HubError
from cloud_hub._reconciler_core import (
    DESIRED_PREFIX,
    GroupOutcome,
    IngestGroup,
    PresenceChange,
    ReconcilerCore,
    desired_scope,
    jsonable,
)
from cloud_hub.health import HealthTracker
from cloud_hub.store import (
    MAX_PAGE_LIMIT,
    DeviceQuery,
    DeviceRecord,
    DeviceStatusUpdate,
    Store,
)
from edge_agent._mqtt import connected, counted_queue
from edge_agent._service import Service, reraise_lost_cancel
from edge_agent.agent import relay_peer_id
from regional_relay.registry import REGISTRY_PREFIX, registry_scope
from sync._exceptions import NovaCronError
from sync.crdt import LwwMap
from sync.envelope import decode_envelope_unverified, unpackb_strict
from sync.hlc import Clock, SystemClock
from sync.keys import KeyRing, Signer
from sync.protocol import SyncSession
from sync.relaying import BATCH
from sync.signed import EntryVerifier
from sync.topics import hub_topic, hub_uplink_filter, parse_topic

__all__ = [
    "BrokerAddress",
    "FleetObserver",
    "Reconciler",
    "ReconcilerError",
    "ReconcilerSettings",
    "relay_state_filter",
]

log = logging.getLogger(__name__)

_RETRY_MAX_S: Final = 5.0


def relay_state_filter() -> str:
    """``nc/v1/hub/r/+/state``: every relay's retained birth and Will."""
    return "nc/v1/hub/r/+/state"


def _is_signed(scope: str) -> bool:
    return scope.startswith((DESIRED_PREFIX, REGISTRY_PREFIX))


class ReconcilerError(HubError):
    """Input the reconciler refuses (a spec that is not JSON, a bad device key).

    Attributes:
        reason: a short, stable reason.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class FleetObserver(Protocol):
    """What the reconciler tells the fleet controller (after each commit)."""

    async def device_reported(self, device_id: str, changes: Mapping[str, Any]) -> None:
        """Keys of the device's scope ``device/<id>`` changed: key -> value (None: deleted)."""

    async def presence_changed(self, device_id: str, state: str, now_ms: int) -> None:
        """The device's health state is now ``state`` (online, offline, unreachable)."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the hub's MQTT broker is and how to log in.

    Attributes:
        host: broker host.
        port: broker port.
        username: account, if the broker wants one.
        password: its password (never shown in reprs).
        identifier: the MQTT client id.
        keepalive_s: MQTT keepalive.
    """

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identifier: str = "nc-hub-reconciler"
    keepalive_s: int = 30


@dataclass(frozen=True, slots=True)
class ReconcilerSettings:
    """Tuning of the reconciler (defaults suit production).

    Attributes:
        max_group_batches: most batches committed in one transaction.
        queue_limit: batches waiting for ingest; beyond it a batch is dropped
            (counted in ``queue_overflow``; its relay resends it).
        tick_s: period of the relay sessions' timers (resends, anti-entropy).
        health_interval_s: period of the region reachability check.
        backoff_initial_s: first reconnect delay.
        backoff_max_s: reconnect delay cap.
        backoff_jitter: +/- fraction of random jitter on each delay.
        session_resend_max_ms: cap of a relay session's resend timeout.
    """

    max_group_batches: int = 64
    queue_limit: int = 1024
    tick_s: float = 0.25
    health_interval_s: float = 1.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    backoff_jitter: float = 0.2
    session_resend_max_ms: int = 10_000


@dataclass
class _Counters:
    acks_sent: int = 0
    acks_unsent: int = 0
    commit_batches: int = 0
    commit_failures: int = 0
    queue_overflow: int = 0
    mqtt_dropped: int = 0
    """Messages aiomqtt received while its bounded queue was full (see ``edge_agent._mqtt``)."""
    uplink_rejected: Counter[str] = field(default_factory=Counter)
    observer_errors: int = 0
    ingest_errors: int = 0
    connects: int = 0


class Reconciler(Service):
    """The hub's ingest and downlink; see the module docstring.

    Implements :class:`cloud_hub.controller.DesiredWriter`.

    Args:
        store: the hub store (scopes, cursors, events, devices).
        signer: the hub key.
        broker: the hub broker; None runs without one (desired state and
            registries are signed and stored, and go out once a broker is
            configured and the relays say HELLO).
        relays: relay id -> ``(region, keys)`` trusted for its batches.
        observer: told about reported changes and health changes; may be set
            later through :attr:`observer` (the controller needs the
            reconciler as its DesiredWriter first).
        publish: fleet events (``device.presence``, ``device.reported``,
            ``relay.state``); never blocks.
        health: device and region health (a new tracker by default).
        clock: wall clock (HLC, sessions, health), ms.
        settings: tuning.
    """

    def __init__(
        self,
        store: Store,
        signer: Signer,
        broker: BrokerAddress | None,
        relays: Mapping[str, tuple[str, KeyRing]],
        *,
        observer: FleetObserver | None = None,
        publish: Callable[[str, Mapping[str, Any]], None] | None = None,
        health: HealthTracker | None = None,
        clock: Clock | None = None,
        settings: ReconcilerSettings | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.signer = signer
        self.broker = broker
        self.observer = observer
        self.publish = publish
        self.health = health or HealthTracker()
        self.clock = clock or SystemClock()
        self.settings = settings or ReconcilerSettings()
        self.core = ReconcilerCore(signer, relays, clock=self.clock, health=self.health)
        self.connected = asyncio.Event()
        self.counters = _Counters()
        hub_keys = KeyRing()
        hub_keys.add(signer.public_key_bytes, signer.key_id)
        self._verifier = EntryVerifier(hub_keys, _is_signed)
        self._relay_online: dict[str, bool] = dict.fromkeys(relays, False)
        self._relay_counters: dict[str, dict[str, Any]] = {}
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(self.settings.queue_limit)
        self._client: aiomqtt.Client | None = None
        self._sessions: dict[str, SyncSession] = {}
        self._session_changed: set[str] = set()
        self._write_lock = asyncio.Lock()
        self._rng = random.Random()

    # -- lifecycle ---------------------------------------------------------------------

    async def _start(self) -> None:
        scopes = await self.store.load_scopes()
        cursors = await self.store.load_cursors()
        self.core.restore(scopes, cursors)
        devices = 0
        cursor: str | None = None
        while True:
            page = await self.store.list_devices(DeviceQuery(cursor=cursor, limit=MAX_PAGE_LIMIT))
            for record in page.items:
                try:
                    self.core.register_device(record.id, record.region, _key(record))
                    devices += 1
                except ReconcilerError as exc:
                    log.warning("device %s not served: %s", record.id, exc)
            cursor = page.next_cursor
            if cursor is None:
                break
        await self._sync_registries()
        self.core.regions_changed(self.clock.now_ms())
        await self._open_task_group()
        if self.broker is not None:
            self._spawn(self._link(self.broker), name="reconciler-mqtt")
        else:
            log.warning("reconciler: no hub broker configured; relays are not reached")
        self._spawn(self._ingest_loop(), name="reconciler-ingest")
        self._spawn(self._health_loop(), name="reconciler-health")
        log.info(
            "reconciler: %d scopes, %d cursors, %d devices, relays %s",
            len(scopes),
            len(cursors),
            devices,
            sorted(self.core.relays),
        )

    async def _sync_registries(self) -> None:
        """Make each region's registry say what the store says (start-up repair)."""
        writes: dict[str, LwwMap] = {}
        regions = {*self.core.regions, *self.core.device_regions.values()}
        regions |= {s.removeprefix(REGISTRY_PREFIX) for s in self.core.replica.scopes if _reg(s)}
        async with self._write_lock:
            for region in sorted(regions):
                members = set(self.core.devices_of(region))
                for key, payload in self.core.registry_devices(region).items():
                    device = key.removeprefix("device/")
                    if payload is not None and device not in members:
                        scope, delta = self.core.write_registry(region, device, None)
                        if delta is not None:
                            writes[scope] = delta
                for device in sorted(members):
                    raw = self.core.device_public_keys[device]
                    scope, delta = self.core.write_registry(region, device, raw)
                    if delta is not None:
                        writes[scope] = delta
            if writes:
                await self.store.save_scopes({s: self.core.scope_bytes(s) for s in writes})
        if writes:
            log.info("device registries of %s brought up to date", sorted(writes))

    # -- DesiredWriter and enrollment --------------------------------------------------

    async def set_desired(
        self, device_id: str, workload: str, spec: Mapping[str, Any] | None
    ) -> None:
        """Write hub-signed ``desired/<device_id>[workload] = spec`` (None: removal).

        Persisted in the store before it returns, then sent to the device's
        region relay (now if connected, else on the relay's next HELLO).

        Raises:
            cloud_hub.store.NotFoundError: the device is not enrolled.
            ReconcilerError: ``spec`` is not JSON data.
        """
        region = self.core.device_regions.get(device_id)
        if region is None:
            record = await self.store.get_device(device_id)
            await self.add_device(record)
            region = record.region
        value = None if spec is None else _json(spec)
        scope = desired_scope(device_id)
        async with self._write_lock:
            _, delta = self.core.write_desired(device_id, workload, value)
            await self._save_or_reload([scope])
        log.debug("desired %s[%s] written", scope, workload)
        await self._send_local(region, scope, delta)

    async def add_device(self, record: DeviceRecord) -> None:
        """Serve an enrolled device: trust its key, register it with its relay.

        Raises:
            ReconcilerError: its public key is not base64 of 32 bytes.
        """
        key = _key(record)
        old = self.core.device_regions.get(record.id)
        self.core.register_device(record.id, record.region, key)
        deltas: list[tuple[str, str, LwwMap]] = []
        async with self._write_lock:
            if old is not None and old != record.region:
                scope, delta = self.core.write_registry(old, record.id, None)
                if delta is not None:
                    deltas.append((old, scope, delta))
            scope, delta = self.core.write_registry(record.region, record.id, key)
            if delta is not None:
                deltas.append((record.region, scope, delta))
            if deltas:
                await self._save_or_reload([s for _, s, _ in deltas])
        for region, scope, delta in deltas:
            await self._send_local(region, scope, delta)
        if old is not None and old != record.region:
            self._drop_scope(old, desired_scope(record.id))
        session = self._sessions.get(record.region)
        if session is not None and desired_scope(record.id) not in session.scopes:
            await self._send(record.region, session.add_scope(desired_scope(record.id)))
        log.info("device %s served in region %s", record.id, record.region)

    async def remove_device(self, device_id: str) -> None:
        """Stop serving a device: forget its key, remove it from every registry."""
        region = self.core.forget_device(device_id)
        regions = {s.removeprefix(REGISTRY_PREFIX) for s in self.core.replica.scopes if _reg(s)}
        deltas: list[tuple[str, str, LwwMap]] = []
        async with self._write_lock:
            for reg in sorted(regions):
                scope, delta = self.core.write_registry(reg, device_id, None)
                if delta is not None:
                    deltas.append((reg, scope, delta))
            if deltas:
                await self._save_or_reload([s for _, s, _ in deltas])
        for reg, scope, delta in deltas:
            await self._send_local(reg, scope, delta)
        if region is not None:
            self._drop_scope(region, desired_scope(device_id))
        log.info("device %s no longer served", device_id)

    async def replay_reported(self) -> int:
        """Tell the observer every device's whole reported scope (after a restart).

        The observer (the controller) keeps reports in memory; call this once
        it has started so that rollouts see what devices reported before the
        hub restarted.

        Returns:
            The number of devices replayed.
        """
        if self.observer is None:
            return 0
        devices = 0
        for scope, state in sorted(self.core.replica.scopes.items()):
            if not scope.startswith("device/") or not len(state):
                continue
            device = scope.removeprefix("device/")
            changes = {k: jsonable(v) for k, v in state.items()}
            try:
                await self.observer.device_reported(device, changes)
            except Exception:
                self.counters.observer_errors += 1
                log.exception("observer failed on device_reported(%s)", device)
            devices += 1
        return devices

    # -- metrics -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for ``/metrics`` (ingest figures, acks, commits, relays)."""
        s = self.core.ingestor.stats
        c = self.counters
        return {
            "batches": s.batches,
            "deltas_merged": s.dots,
            "events": s.events,
            "duplicates": s.duplicates,
            "held": s.held,
            "clock_skew": s.clock_skew,
            "rejected": dict(s.rejected),
            "refused": dict(s.refused),
            "acks_sent": c.acks_sent,
            "acks_unsent": c.acks_unsent,
            "commit_batches": c.commit_batches,
            "commit_failures": c.commit_failures,
            "queue_overflow": c.queue_overflow,
            "mqtt_dropped": c.mqtt_dropped,
            "queue_depth": self._queue.qsize(),
            "uplink_rejected": dict(c.uplink_rejected),
            "observer_errors": c.observer_errors,
            "ingest_errors": c.ingest_errors,
            "connected": self.connected.is_set(),
            "connects": c.connects,
            "devices": len(self.core.device_keys),
            "relays_online": dict(self._relay_online),
            "relay_counters": {r: dict(v) for r, v in self._relay_counters.items()},
        }

    # -- MQTT --------------------------------------------------------------------------

    def _mqtt_client(self, b: BrokerAddress) -> aiomqtt.Client:
        return aiomqtt.Client(
            b.host,
            b.port,
            username=b.username,
            password=b.password,
            identifier=b.identifier,
            keepalive=b.keepalive_s,
            max_queued_incoming_messages=self.settings.queue_limit * 8,
            queue_type=counted_queue("hub reconciler", self._count_mqtt_drop),
            max_queued_outgoing_messages=100_000,
        )

    def _count_mqtt_drop(self) -> None:
        self.counters.mqtt_dropped += 1

    async def _link(self, broker: BrokerAddress) -> None:
        attempt = 0
        while True:
            try:
                async with connected(self._mqtt_client(broker)) as client:
                    attempt = 0
                    await self._connected(client, broker)
            except* aiomqtt.MqttError as group:
                log.warning("hub broker lost: %s", group.exceptions[0])
            finally:
                self._client = None
                self._sessions = {}
                self.connected.clear()
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))

    async def _connected(self, client: aiomqtt.Client, broker: BrokerAddress) -> None:
        await client.subscribe(hub_uplink_filter(), qos=1)
        await client.subscribe(relay_state_filter(), qos=1)
        reraise_lost_cancel()
        self._sessions = {region: self._new_session(region) for region in sorted(self.core.regions)}
        self._client = client
        self.counters.connects += 1
        self.connected.set()
        log.info("reconciler connected to the hub broker %s:%s", broker.host, broker.port)
        for region, session in self._sessions.items():
            await self._send(region, session.start())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._ticker(), name="reconciler-ticker")
            async for message in client.messages:
                reraise_lost_cancel()
                if isinstance(message.payload, bytes | bytearray):
                    await self._on_message(str(message.topic), bytes(message.payload))

    def _new_session(self, region: str) -> SyncSession:
        scopes = [registry_scope(region), *map(desired_scope, self.core.devices_of(region))]
        return SyncSession(
            self.core.replica,
            relay_peer_id(region),
            self.signer,
            self.core.region_keys(region),
            self.clock,
            scopes=scopes,
            resend_max_ms=self.settings.session_resend_max_ms,
            on_change=self._on_session_change,
            validate=self._verifier,
        )

    async def _on_message(self, topic: str, data: bytes) -> None:
        try:
            parsed = parse_topic(topic)
        except NovaCronError:
            self.counters.uplink_rejected["bad_topic"] += 1
            return
        region = parsed.region
        if parsed.kind == "state":
            await self._on_relay_state(region, data)
            return
        if parsed.kind != "up":
            return
        try:
            peek = decode_envelope_unverified(data)
        except NovaCronError:
            self.counters.uplink_rejected["garbage"] += 1
            return
        if peek.type == BATCH:
            try:
                self._queue.put_nowait(data)
            except asyncio.QueueFull:
                self.counters.queue_overflow += 1
                log.warning("ingest queue full: batch from %s dropped (it is resent)", peek.src)
            return
        session = self._sessions.get(region)
        if session is None:
            self.counters.uplink_rejected["unknown_region"] += 1
            return
        self._session_changed.clear()
        try:
            replies = session.receive(data)
        except NovaCronError as exc:
            self.counters.uplink_rejected[type(exc).__name__] += 1
            log.warning("rejected a message from the relay of %s: %s", region, exc)
            return
        self.health.relay_heartbeat(region, self.clock.now_ms())
        changed, self._session_changed = self._session_changed, set()
        if changed:
            # Signed scopes a relay gave back (a hub that lost them): keep them.
            async with self._write_lock:
                await self.store.save_scopes({s: self.core.scope_bytes(s) for s in changed})
        await self._send(region, replies)

    def _on_session_change(self, scope: str, entries: list[list[Any]] | None) -> None:
        del entries
        self._session_changed.add(scope)

    async def _on_relay_state(self, region: str, data: bytes) -> None:
        obj = _relay_state(data)
        if obj is None:
            self.counters.uplink_rejected["bad_state"] += 1
            return
        if region not in self.core.regions:
            self.counters.uplink_rejected["unknown_region"] += 1
            return
        now = self.clock.now_ms()
        if not self.health.relay_state(region, obj["online"], obj["bd"], now):
            return
        if obj["relay"] in self.core.relays:
            self._relay_online[obj["relay"]] = obj["online"]
        self._emit("relay.state", {"relay": obj["relay"], "region": region, **obj})
        self.core.regions_changed(now)
        await self._presence(self.core.presence_changes(now, None), now)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            for region, session in list(self._sessions.items()):
                await self._send(region, session.tick())

    async def _send(self, region: str, messages: list[bytes]) -> None:
        client = self._client
        if client is None or not messages:
            return
        topic = hub_topic(region, "down")
        try:
            for data in messages:
                await client.publish(topic, data, qos=1)
                reraise_lost_cancel()
        except aiomqtt.MqttError as exc:  # sessions resend; the link reconnects
            log.warning("downlink to %s failed: %s", region, exc)

    async def _send_local(self, region: str, scope: str, delta: LwwMap) -> None:
        session = self._sessions.get(region)
        if session is None:
            return  # the relay's HELLO on the next connection brings it
        out: list[bytes] = []
        if scope not in session.scopes:
            out += session.add_scope(scope)
        out += session.local_update(scope, delta)
        await self._send(region, out)

    def _drop_scope(self, region: str, scope: str) -> None:
        session = self._sessions.get(region)
        if session is not None:
            session.scopes.discard(scope)

    # -- ingest ------------------------------------------------------------------------

    async def _ingest_loop(self) -> None:
        while True:
            batches = [await self._queue.get()]
            while len(batches) < self.settings.max_group_batches and not self._queue.empty():
                batches.append(self._queue.get_nowait())
            now = self.clock.now_ms()
            group = IngestGroup()
            try:
                for data in batches:
                    self.core.ingest(group, data, now)
                    await asyncio.sleep(0)  # signature checks are CPU work: let others run
                outcome = self.core.seal(group)
            except Exception:
                # A bug, not bad input (that is refused or rejected, and counted):
                # nothing is acknowledged, and what the group merged is undone.
                self.counters.ingest_errors += 1
                log.exception("ingest of %d batches failed (not acknowledged)", len(batches))
                await self._rollback(group.scopes)
                continue
            if not outcome.empty and not await self._commit(outcome):
                continue
            await self._send_acks(outcome)
            await self._after_commit(outcome, now)

    async def _commit(self, outcome: GroupOutcome) -> bool:
        try:
            await self.store.commit_ingest(outcome.commit)
        except NovaCronError as exc:
            self.counters.commit_failures += 1
            log.warning(
                "ingest commit failed (%s batches not acknowledged): %s", outcome.batches, exc
            )
            await self._rollback(outcome.commit.scopes)
            return False
        self.counters.commit_batches += 1
        return True

    async def _rollback(self, scopes: Iterable[str]) -> None:
        attempt = 0
        while True:
            try:
                stored = {s: await self.store.get_scope(s) for s in scopes}
                cursors = await self.store.load_cursors()
            except NovaCronError as exc:
                attempt += 1
                log.warning("cannot reload ingest state from the store: %s (retrying)", exc)
                await asyncio.sleep(min(_RETRY_MAX_S, 0.1 * 2**attempt) * self._rng.uniform(1, 1.5))
                continue
            self.core.rollback(stored, cursors)
            return

    async def _send_acks(self, outcome: GroupOutcome) -> None:
        for region, ack in outcome.acks:
            client = self._client
            if client is None:
                self.counters.acks_unsent += 1
                continue
            try:
                await client.publish(hub_topic(region, "down"), ack, qos=1)
                reraise_lost_cancel()
                self.counters.acks_sent += 1
            except aiomqtt.MqttError as exc:  # the relay resends; acked again then
                self.counters.acks_unsent += 1
                log.warning("BATCH_ACK to %s not sent: %s", region, exc)

    async def _after_commit(self, outcome: GroupOutcome, now: int) -> None:
        self._relay_counters.update(outcome.relay_counters)
        if outcome.presence:
            await self._presence(self.core.presence_changes(now, outcome.presence), now)
        for device, changes in outcome.reported.items():
            self._emit("device.reported", {"device": device, "keys": sorted(changes)})
            if self.observer is not None:
                try:
                    await self.observer.device_reported(device, changes)
                except Exception:
                    self.counters.observer_errors += 1
                    log.exception("observer failed on device_reported(%s)", device)

    async def _presence(self, changes: list[PresenceChange], now: int) -> None:
        if not changes:
            return
        try:
            await self.store.update_device_status(
                [DeviceStatusUpdate(c.device, c.state, c.last_seen_ms) for c in changes]
            )
        except NovaCronError as exc:
            log.warning("device health not persisted: %s", exc)
        for c in changes:
            self._emit(
                "device.presence",
                {"device": c.device, "state": c.state, "last_seen_ms": c.last_seen_ms},
            )
            if self.observer is not None:
                try:
                    await self.observer.presence_changed(c.device, c.state, now)
                except Exception:
                    self.counters.observer_errors += 1
                    log.exception("observer failed on presence_changed(%s)", c.device)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            now = self.clock.now_ms()
            if self.core.regions_changed(now):
                await self._presence(self.core.presence_changes(now, None), now)

    # -- helpers -----------------------------------------------------------------------

    async def _save_or_reload(self, scopes: list[str]) -> None:
        """Persist the hub's own writes; on failure, forget them (call under the lock)."""
        try:
            await self.store.save_scopes({s: self.core.scope_bytes(s) for s in scopes})
        except BaseException:
            # The write must not reach anyone unpersisted: back to the stored state.
            stored = {s: await self.store.get_scope(s) for s in scopes}
            for scope, data in stored.items():
                self.core.reload_scope(scope, data)
            raise

    def _emit(self, kind: str, data: Mapping[str, Any]) -> None:
        if self.publish is not None:
            self.publish(kind, data)

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        base = min(s.backoff_max_s, s.backoff_initial_s * 2.0 ** min(attempt, 30))
        return float(base * (1 + self._rng.uniform(-s.backoff_jitter, s.backoff_jitter)))


def _relay_state(data: bytes) -> dict[str, Any] | None:
    """A relay's retained state ``{"online": bool, "bd": int, "relay": str}``, or None."""
    try:
        obj = unpackb_strict(data)
    except NovaCronError:
        return None
    if (
        type(obj) is not dict
        or obj.keys() != {"online", "bd", "relay"}
        or type(obj["online"]) is not bool
        or type(obj["bd"]) is not int
        or type(obj["relay"]) is not str
    ):
        return None
    return obj


def _reg(scope: str) -> bool:
    return scope.startswith(REGISTRY_PREFIX)


def _key(record: DeviceRecord) -> bytes:
    try:
        raw = base64.b64decode(record.public_key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ReconcilerError(f"device {record.id}: bad public key", reason="bad_key") from exc
    if len(raw) != 32:
        raise ReconcilerError(f"device {record.id}: key is not 32 bytes", reason="bad_key")
    return raw


def _json(spec: Mapping[str, Any]) -> Any:
    try:
        return json.loads(json.dumps(spec, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ReconcilerError(f"desired spec is not JSON: {exc}", reason="bad_spec") from exc
