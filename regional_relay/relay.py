"""The regional relay: verify, store, acknowledge, batch, forward; fan out.

Uplink, per device message on ``nc/v1/r/<region>/d/<device>/up``:

1. the device must be enrolled (its key known) and the envelope must name it
   as ``src``; otherwise the message is dropped and counted by reason;
2. a metric batch is refused while the outbox is at quota (no ACK: the agent
   keeps it and sends it again later) — state deltas are never refused;
3. the device's :class:`~sync.protocol.SyncSession` verifies and merges it;
4. the envelope (verbatim, device signature inside) is appended to the
   durable outbox, with the replica's changed state and stream cursors;
5. only after that commit are the session's replies (the ACK) published.

Step 4 of many messages share one SQLite transaction (group commit); an
ordered acknowledger publishes replies strictly after their own commit.

The forwarder sends the outbox to the hub in batches bounded by items, bytes
and delay, signed by the relay, and deletes items only when the hub's
``BATCH_ACK`` names them. Unacknowledged batches are resent after a timeout;
after a reconnect everything still held is sent again (the hub dedupes by
outbox id, dot and stream sequence).

Downlink: a :class:`~sync.protocol.SyncSession` with the hub over the
``desired/<device>`` scopes of the region keeps a durable replica of desired
state; every entry must carry the hub's signature (checked again by agents).
Changes are fanned out to connected devices; a device that reconnects while
the hub is away syncs from the replica.

Devices served: the same hub session syncs the region's hub-signed device
registry ``region/<region>`` (:mod:`regional_relay.registry`). A device
enrolled there is served from then on, without a restart: its uplinks are
accepted and its ``desired/<device>`` scope joins the hub session; a removed
device is no longer served. ``devices_file`` is an optional static seed.

Presence: the retained ``…/state`` topics feed a
:class:`~regional_relay.presence.PresenceTracker`; summaries (with the relay's
counters) go to the hub through the outbox. The relay's own retained birth and
Will on ``nc/v1/hub/r/<region>/state`` let the hub tell "region unreachable"
from "device offline".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt

from edge_agent._mqtt import connected, counted_queue
from edge_agent._service import Service, reraise_lost_cancel
from edge_agent.agent import relay_peer_id
from regional_relay._exceptions import RelayError
from regional_relay.aggregate import Downsampler
from regional_relay.config import (
    BrokerSettings,
    RelayConfig,
    load_relay_key,
    read_device_keys,
    read_hub_key,
)
from regional_relay.outbox import ItemIn, ItemKind, Outbox, OutboxItem
from regional_relay.presence import PresenceTracker
from regional_relay.registry import DeviceRegistry, RegistryChange, registry_scope
from sync._exceptions import NovaCronError
from sync.envelope import decode_envelope, decode_envelope_unverified, packb, unpackb_strict
from sync.hlc import Clock, HybridLogicalClock, SystemClock
from sync.keys import KeyRing
from sync.protocol import DELTAS, EVENTS, SNAPSHOT, SyncSession
from sync.relaying import BATCH_ACK, BatchItem, decode_batch_ack, encode_batch
from sync.replica import InboundStream, Replica
from sync.signed import EntryVerifier, unwrap
from sync.topics import (
    device_topic,
    hub_topic,
    parse_topic,
    region_state_filter,
    region_uplink_filter,
)

log = logging.getLogger(__name__)

CURSORS_SCOPE = "relay/cursors"
ACK_QUEUE_LIMIT = 2048
PUBLISH_WINDOW = 256
_TICK_S = 0.25


def _is_desired(scope: str) -> bool:
    return scope.startswith("desired/")


@dataclass
class _InFlight:
    ids: list[int]
    data: bytes
    due: float
    backoff: float


@dataclass
class RelayCounters:
    """What the relay counts; sent to the hub with presence summaries."""

    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    refused_metrics: int = 0
    stored: int = 0
    batches_sent: int = 0
    batches_resent: int = 0
    batches_acked: int = 0
    items_acked: int = 0
    fanned_out: int = 0
    downlink_failed: int = 0
    hub_rejected: Counter[str] = field(default_factory=Counter)

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly copy."""
        return {
            "received": self.received,
            "rejected": dict(self.rejected),
            "refused_metrics": self.refused_metrics,
            "stored": self.stored,
            "batches_sent": self.batches_sent,
            "batches_resent": self.batches_resent,
            "batches_acked": self.batches_acked,
            "items_acked": self.items_acked,
            "fanned_out": self.fanned_out,
            "downlink_failed": self.downlink_failed,
            "hub_rejected": dict(self.hub_rejected),
        }


INCOMING_QUEUE_LIMIT: Final = 10_000
"""Messages aiomqtt may hold for the relay per connection before it drops the
newest (counted in ``rejected`` as ``incoming_queue_full``; senders resend)."""


def _client(
    settings: BrokerSettings,
    identifier: str,
    will: aiomqtt.Will | None,
    on_drop: Callable[[], None],
) -> aiomqtt.Client:
    username = password = None
    if settings.credentials is not None:
        username = settings.credentials.username
        password = settings.credentials.read_password()
    return aiomqtt.Client(
        settings.url.host,
        settings.url.port,
        identifier=identifier,
        username=username,
        password=password,
        keepalive=settings.keepalive_s,
        will=will,
        max_queued_incoming_messages=INCOMING_QUEUE_LIMIT,
        queue_type=counted_queue(identifier, on_drop),
        max_queued_outgoing_messages=100_000,
    )


class Relay(Service):
    """One region's relay; use as ``async with Relay(config) as relay``.

    Args:
        config: the validated relay config.
        clock: wall clock (HLC and protocol timers).
    """

    def __init__(self, config: RelayConfig, *, clock: Clock | None = None) -> None:
        super().__init__()
        self.config = config
        self.clock = clock or SystemClock()
        self.counters = RelayCounters()
        self.peer_id = relay_peer_id(config.region)
        self.hub_connected = asyncio.Event()
        self.devices_connected = asyncio.Event()
        self._rng = random.Random()
        self._device_keys: dict[str, KeyRing] = {}
        self.registry_scope = registry_scope(config.region)
        self.registry = DeviceRegistry()
        self._sessions: dict[str, SyncSession] = {}
        self._changed: dict[str, set[str] | None] = {}
        self._acks: asyncio.Queue[tuple[asyncio.Task[bool], str, list[bytes]]] = asyncio.Queue(
            ACK_QUEUE_LIMIT
        )
        self._down: aiomqtt.Client | None = None
        self._up: aiomqtt.Client | None = None
        self._hub_session: SyncSession | None = None
        self._inflight: dict[int, _InFlight] = {}
        self._sent_upto = 0
        self._batch_seq = 0
        self._new_items = asyncio.Event()
        self._inflight_bytes = 0
        self._publish_slots = asyncio.Semaphore(PUBLISH_WINDOW)
        self.epoch = 0
        self.outbox: Outbox
        self.replica: Replica
        self.presence = PresenceTracker()
        self._presence_cursor = 0
        self.downsampler: Downsampler | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def _start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        hub_key = await asyncio.to_thread(read_hub_key, cfg.hub_key_path)
        if hub_key is None:
            raise RelayError(f"no hub public key at {cfg.hub_key_path}: enroll the relay first")
        self.hub_keys = KeyRing()
        self.hub_keys.add(hub_key)
        self.verifier = EntryVerifier(self.hub_keys, self._is_signed)
        if cfg.devices_file is not None:
            seed = await asyncio.to_thread(read_device_keys, cfg.devices_file)
            self.registry = DeviceRegistry(seed)
        self.signer = await asyncio.to_thread(load_relay_key, cfg)
        self.outbox = await self._stack.enter_async_context(Outbox.for_config(cfg))
        self.replica = Replica(self.peer_id, HybridLogicalClock(self.clock))
        await self._load_replica()
        # The registry kept from the hub (if any) overrides the static seed.
        self.registry.apply(self._registry_entries(None))
        for device, key in self.registry.keys().items():
            self._device_keys[device] = _ring(key)
        self.epoch = int(time.time())
        if cfg.downsample is not None:
            self.downsampler = Downsampler(cfg.downsample.interval_s * 1000)
        await self._open_task_group()
        for name, coro in (
            ("relay-devices", self._device_link()),
            ("relay-hub", self._hub_link()),
            ("relay-acker", self._acker()),
            ("relay-presence", self._presence_reporter()),
        ):
            self._spawn(coro, name=name)
        log.info(
            "relay %s for region %s: %d devices enrolled, outbox depth %d",
            cfg.relay_id,
            cfg.region,
            len(self._device_keys),
            self.outbox.stats().depth,
        )

    async def _load_replica(self) -> None:
        for scope in await self.outbox.scopes():
            entries = await self.outbox.read_state(scope)
            if scope == CURSORS_SCOPE:
                for key, _ts, _o, _c, _d, value in entries:
                    device, _, stream = str(key).partition("|")
                    self.replica.inbox.setdefault((device, stream), InboundStream()).next_seq = int(
                        value
                    )
                continue
            wire = [list(e) for e in entries]
            self.replica.scope(scope).merge_batch(wire)
            # Stored data is final: a clock that went back since must not stop
            # the start (see Replica.observe_entries).
            self.replica.observe_entries(wire)

    # -- devices (downstream broker) --------------------------------------------------------

    async def _device_link(self) -> None:
        cfg = self.config
        attempt = 0
        while True:
            try:
                async with connected(
                    _client(
                        cfg.downstream, f"nc-relay-{cfg.relay_id}", None, self._count_queue_full
                    )
                ) as client:
                    self._down = client
                    await client.subscribe(region_uplink_filter(cfg.region), qos=1)
                    await client.subscribe(region_state_filter(cfg.region), qos=1)
                    reraise_lost_cancel()
                    self.devices_connected.set()
                    attempt = 0
                    log.info("relay connected to the region broker %s", cfg.downstream.url.url)
                    async for message in client.messages:
                        reraise_lost_cancel()
                        await self._on_device_message(
                            str(message.topic), message.payload, message.retain
                        )
            except aiomqtt.MqttError as exc:
                log.warning("region broker lost: %s", exc)
            finally:
                self._down = None
                self.devices_connected.clear()
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))

    async def _on_device_message(self, topic: str, payload: Any, retained: bool) -> None:
        now = self.clock.now_ms()
        try:
            parsed = parse_topic(topic)
        except NovaCronError:
            self._reject("bad_topic")
            return
        device = parsed.device
        if device is None or not isinstance(payload, bytes | bytearray):
            self._reject("bad_topic")
            return
        data = bytes(payload)
        if parsed.kind == "state":
            try:
                change = self.presence.observe_state(device, data, now, retained=retained)
            except NovaCronError as exc:
                self._reject("bad_state")
                log.warning("bad state message from %s: %s", device, exc)
                return
            if change is not None:
                log.debug("presence %s: %s", device, change)
            return
        self.counters.received += 1
        keys = self._device_keys.get(device)
        if keys is None:
            self._reject("unknown_device")
            return
        try:
            peek = decode_envelope_unverified(data)
        except NovaCronError:
            self._reject("garbage")
            return
        if peek.src != device:
            self._reject("src_mismatch")
            return
        kind: ItemKind = "delta"
        stream = ""
        if peek.type == EVENTS:
            stream = self._stream_of(peek.body)
            kind = "metric" if stream in self._metric_streams else "event"
            if kind == "metric" and self._at_quota():
                self.counters.refused_metrics += 1
                return  # no ACK: the agent keeps it and sends it again later
        before = self._inbox_next(device, stream)
        session = self._session(device, keys)
        self._changed = {}
        try:
            replies = session.receive(data)
        except NovaCronError as exc:
            self._reject(type(exc).__name__)
            log.warning("rejected message from %s: %s", device, exc)
            return
        self.presence.observe_traffic(device, now)
        items: list[ItemIn] = []
        # Forward only what the session took in: an EVENTS batch that does not
        # follow on (an earlier one was refused or lost) is left unacknowledged
        # and comes again, so the hub sees every stream in order.
        accepted = peek.type in (DELTAS, SNAPSHOT) or (
            peek.type == EVENTS and self._inbox_next(device, stream) > before
        )
        if accepted:
            items.append(ItemIn(device, kind, data))
            if kind == "metric" and self.downsampler is not None:
                self._downsample(device, peek.body)
        changed, self._changed = self._changed, {}
        cursors = self._cursor_entries(device, peek.type)
        size = len(data) if items else 0
        self._inflight_bytes += size
        task = self._spawn(self._persist(items, changed, cursors, size), name="relay-persist")
        await self._acks.put((task, device, replies))

    def _session(self, device: str, keys: KeyRing) -> SyncSession:
        session = self._sessions.get(device)
        if session is None:
            scopes = [f"device/{device}", f"desired/{device}"]
            for scope in scopes:
                self.replica.scope(scope)
            session = SyncSession(
                self.replica,
                device,
                self.signer,
                keys,
                self.clock,
                scopes=scopes,
                on_change=self._on_change,
                validate=self._validate_device_entries(device),
            )
            self._sessions[device] = session
        return session

    def _is_signed(self, scope: str) -> bool:
        return _is_desired(scope) or scope == self.registry_scope

    def _validate_device_entries(self, device: str) -> Callable[[str, list[list[Any]]], None]:
        def check(scope: str, entries: list[list[Any]]) -> None:
            if _is_desired(scope):
                self.verifier(scope, entries)  # only the hub writes desired state
                return
            for entry in entries:
                if entry[2] != device:
                    raise RelayError(f"{device} wrote an entry as {entry[2]!r} in {scope}")

        return check

    def _on_change(self, scope: str, entries: list[list[Any]] | None) -> None:
        if entries is None:
            self._changed[scope] = None
        else:
            keys = self._changed.setdefault(scope, set())
            if keys is not None:
                keys.update(e[0] for e in entries)

    def _state_entries(self, changed: dict[str, set[str] | None]) -> dict[str, list[list[Any]]]:
        out: dict[str, list[list[Any]]] = {}
        for scope, keys in changed.items():
            state = self.replica.scope(scope)
            if keys is None:
                out[scope] = state.entries_wire()
                continue
            out[scope] = [[k, *e] for k in sorted(keys) if (e := state.entry(k)) is not None]
        return out

    def _cursor_entries(self, device: str, type_: str) -> list[list[Any]]:
        if type_ != EVENTS:
            return []
        out = []
        for (peer, stream), inbound in self.replica.inbox.items():
            if peer == device:
                inbound.items.clear()  # forwarded verbatim: nothing to keep here
                # ts and counter grow with the cursor, so the newest write wins.
                seq = inbound.next_seq
                out.append([f"{device}|{stream}", seq, self.peer_id, seq, False, seq])
        return out

    async def _persist(
        self,
        items: list[ItemIn],
        changed: dict[str, set[str] | None],
        cursors: list[list[Any]],
        size: int,
    ) -> bool:
        writes: list[Awaitable[object]] = [self.outbox.append(items)] if items else []
        # A device's own scope is not persisted here: the relay never serves it
        # (its envelopes are forwarded verbatim), and after a relay restart the
        # device's next HELLO re-sends it, which the hub dedupes by dot. Only
        # desired state (the replica agents sync from) and cursors are kept.
        kept = {s: k for s, k in changed.items() if _is_desired(s)}
        writes += [self.outbox.put_state(s, e) for s, e in self._state_entries(kept).items()]
        if cursors:
            writes.append(self.outbox.put_state(CURSORS_SCOPE, cursors))
        try:
            await asyncio.gather(*writes)
        except NovaCronError as exc:  # counted; the message is not acknowledged
            self.counters.rejected["store_failed"] += 1
            log.warning("cannot store a message: %s (not acknowledged)", exc)
            return False
        finally:
            self._inflight_bytes -= size
        if items:
            self.counters.stored += len(items)
            self._new_items.set()
        return True

    async def _acker(self) -> None:
        """Publish each message's replies after its own commit, in arrival order."""
        while True:
            task, device, replies = await self._acks.get()
            if not await task:
                self._sessions.pop(device, None)  # resync it from scratch
                continue
            await self._publish_down(device, replies)

    async def _publish_down(self, device: str, messages: list[bytes]) -> None:
        """Hand replies to the broker without waiting for each PUBACK.

        paho sends them in call order; at most ``PUBLISH_WINDOW`` are pending,
        so a slow broker slows intake instead of growing a queue. A failed
        publish is logged and counted: the device sends again (no ACK) or
        resyncs on its next HELLO.
        """
        client = self._down
        if client is None or not messages:
            return
        topic = device_topic(self.config.region, device, "down")
        for data in messages:
            await self._publish_slots.acquire()
            self._spawn(self._send_down(client, topic, data), name="relay-down")

    async def _send_down(self, client: aiomqtt.Client, topic: str, data: bytes) -> None:
        try:
            await client.publish(topic, data, qos=1, timeout=10)
            reraise_lost_cancel()
        except aiomqtt.MqttError as exc:
            self.counters.downlink_failed += 1
            log.warning("downlink on %s failed: %s (the device resends or resyncs)", topic, exc)
        finally:
            self._publish_slots.release()

    @property
    def _metric_streams(self) -> tuple[str, ...]:
        return self.config.downsample.streams if self.config.downsample else ("metrics",)

    @staticmethod
    def _stream_of(body: bytes) -> str:
        try:
            decoded = unpackb_strict(body)
        except NovaCronError:
            return ""  # the session refuses it with the precise error
        stream = decoded.get("st") if isinstance(decoded, dict) else None
        return stream if isinstance(stream, str) else ""

    def _inbox_next(self, device: str, stream: str) -> int:
        inbound = self.replica.inbox.get((device, stream))
        return 1 if inbound is None else inbound.next_seq

    def _downsample(self, device: str, body: bytes) -> None:
        assert self.downsampler is not None
        decoded: Any = unpackb_strict(body)
        for item in decoded.get("items", ()):
            self.downsampler.add_event(device, item)

    def _at_quota(self) -> bool:
        stats = self.outbox.stats()
        # Committed bytes plus what is on its way to the writer: never admit a
        # metric the outbox would then refuse after the session took it in.
        return stats.bytes + self._inflight_bytes >= stats.quota_bytes

    def _reject(self, reason: str) -> None:
        self.counters.rejected[reason] += 1

    def _count_queue_full(self) -> None:
        self._reject("incoming_queue_full")

    # -- hub (upstream broker) --------------------------------------------------------------

    async def _hub_link(self) -> None:
        cfg = self.config
        attempt = 0
        while True:
            will = aiomqtt.Will(
                hub_topic(cfg.region, "state"),
                packb({"online": False, "bd": self.epoch, "relay": cfg.relay_id}),
                qos=1,
                retain=True,
            )
            try:
                async with connected(
                    _client(
                        cfg.upstream, f"nc-relay-{cfg.relay_id}-up", will, self._count_queue_full
                    )
                ) as client:
                    await self._hub_session_run(client)
            except* aiomqtt.MqttError as group:
                log.warning("hub broker lost: %s", group.exceptions[0])
            self._up = None
            self._hub_session = None
            self.hub_connected.clear()
            self.presence.hub_reachable = False
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))

    async def _hub_session_run(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        self._up = client
        await client.subscribe(hub_topic(cfg.region, "down"), qos=1)
        await client.publish(
            hub_topic(cfg.region, "state"),
            packb({"online": True, "bd": self.epoch, "relay": cfg.relay_id}),
            qos=1,
            retain=True,
        )
        reraise_lost_cancel()
        scopes = [self.registry_scope, *(f"desired/{d}" for d in sorted(self._device_keys))]
        for scope in scopes:
            self.replica.scope(scope)
        session = SyncSession(
            self.replica,
            "hub",
            self.signer,
            self.hub_keys,
            self.clock,
            scopes=scopes,
            on_change=self._on_change,
            validate=self.verifier,
            bd_seq=self.epoch,
        )
        self._hub_session = session
        # Whatever was sent before and not acknowledged goes again.
        self._inflight.clear()
        self._sent_upto = 0
        self.hub_connected.set()
        self.presence.hub_reachable = True
        log.info("relay connected to the hub broker %s", cfg.upstream.url.url)
        await self._publish_up(session.start())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._forwarder(client), name="relay-forwarder")
            tg.create_task(self._hub_ticker(session), name="relay-hub-ticker")
            async for message in client.messages:
                reraise_lost_cancel()
                if isinstance(message.payload, bytes | bytearray):
                    await self._on_hub_message(session, bytes(message.payload))

    async def _on_hub_message(self, session: SyncSession, data: bytes) -> None:
        try:
            peek = decode_envelope_unverified(data)
            if peek.type == BATCH_ACK:
                env = decode_envelope(data, self.hub_keys)
                relay, ids = decode_batch_ack(env)
                if relay == self.config.relay_id:
                    await self._on_batch_ack(ids)
                return
            self._changed = {}
            replies = session.receive(data)
        except NovaCronError as exc:
            self.counters.hub_rejected[type(exc).__name__] += 1
            log.warning("rejected message from the hub side: %s", exc)
            return
        changed, self._changed = self._changed, {}
        if changed:
            entries = self._state_entries(changed)
            for scope, wire in entries.items():
                await self.outbox.put_state(scope, wire)
            if self.registry_scope in changed:
                registry = self.registry.apply(self._registry_entries(changed[self.registry_scope]))
                replies += self._serve(session, registry)
            for scope, wire in entries.items():
                if not _is_desired(scope):
                    continue
                device = scope.removeprefix("desired/")
                device_session = self._sessions.get(device)
                if device_session is not None and wire:
                    self.counters.fanned_out += len(wire)
                    await self._publish_down(device, device_session.send_entries(scope, wire))
        await self._publish_up(replies)

    def _registry_entries(self, keys: set[str] | None) -> list[tuple[str, Any]]:
        """The registry's ``(key, payload)`` for ``keys`` (None: every entry).

        Only verified entries reach the replica: the hub session's validate
        hook checks the hub's signature before merging, and the outbox holds
        nothing else.
        """
        state = self.replica.scope(self.registry_scope)
        names = state.keys() if keys is None else sorted(keys)
        return [(k, unwrap(state.get(k))) for k in names if k in state]

    def _serve(self, session: SyncSession, change: RegistryChange) -> list[bytes]:
        """Start serving added devices and stop serving removed ones."""
        if not change:
            return []
        for device in change.removed:
            self._device_keys.pop(device, None)
            self._sessions.pop(device, None)
            session.scopes.discard(f"desired/{device}")
            log.info("device %s removed from the registry: no longer served", device)
        new_scopes = []
        for device, key in sorted(change.added.items()):
            if device in self._device_keys:
                self._sessions.pop(device, None)  # re-keyed: its next message resyncs
            self._device_keys[device] = _ring(key)
            scope = f"desired/{device}"
            self.replica.scope(scope)
            if scope not in session.scopes:
                new_scopes.append(scope)
            log.info("device %s enrolled through the registry: served", device)
        if not new_scopes:
            return []
        session.scopes.update(new_scopes)
        return session.add_scope(new_scopes[0])  # one HELLO announces them all

    async def _on_batch_ack(self, ids: list[int]) -> None:
        acked = set(ids)
        done = [k for k, f in self._inflight.items() if acked.issuperset(f.ids)]
        for key in done:
            del self._inflight[key]
        deleted = await self.outbox.delete(ids)
        self.counters.batches_acked += len(done)
        self.counters.items_acked += deleted
        self._new_items.set()

    async def _publish_up(self, messages: list[bytes]) -> None:
        client = self._up
        if client is None:
            return
        for data in messages:
            await client.publish(hub_topic(self.config.region, "up"), data, qos=1)
            reraise_lost_cancel()

    async def _hub_ticker(self, session: SyncSession) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            await self._publish_up(session.tick())
            for device, device_session in list(self._sessions.items()):
                await self._publish_down(device, device_session.tick())

    async def _forwarder(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        while True:
            now = time.monotonic()
            for key, flight in list(self._inflight.items()):
                if now >= flight.due:
                    flight.backoff = min(flight.backoff * 2, cfg.resend.backoff_max_s)
                    flight.due = now + cfg.resend.ack_timeout_s + flight.backoff
                    self.counters.batches_resent += 1
                    await client.publish(hub_topic(cfg.region, "up"), flight.data, qos=1)
                    reraise_lost_cancel()
                    log.debug("resent batch %s", key)
            if len(self._inflight) >= cfg.resend.max_in_flight:
                await self._wait_new_items(_TICK_S)
                continue
            items = await self.outbox.oldest(
                cfg.batch.max_items, cfg.batch.max_bytes, after_id=self._sent_upto
            )
            full = (
                len(items) >= cfg.batch.max_items
                or sum(i.size for i in items) >= cfg.batch.max_bytes * 0.9
            )
            if not full and cfg.batch.max_delay_ms > 0:
                # Let a small batch fill for up to max_delay.
                await self._wait_new_items(cfg.batch.max_delay_ms / 1000)
                if items:
                    items = await self.outbox.oldest(
                        cfg.batch.max_items, cfg.batch.max_bytes, after_id=self._sent_upto
                    )
            if not items:
                await self._wait_new_items(_TICK_S)
                continue
            await self._send_batch(client, items)

    async def _send_batch(self, client: aiomqtt.Client, items: list[OutboxItem]) -> None:
        cfg = self.config
        self._batch_seq += 1
        data = encode_batch(
            self.signer,
            src=cfg.relay_id,
            seq=self._batch_seq,
            ts=self.replica.hlc.now(),
            epoch=self.epoch,
            items=[BatchItem(i.id, i.device, i.kind, i.payload) for i in items],
        )
        ids = [i.id for i in items]
        self._inflight[self._batch_seq] = _InFlight(
            ids, data, time.monotonic() + cfg.resend.ack_timeout_s, cfg.resend.backoff_initial_s
        )
        self._sent_upto = ids[-1]
        self.counters.batches_sent += 1
        await client.publish(hub_topic(cfg.region, "up"), data, qos=1)
        reraise_lost_cancel()

    async def _wait_new_items(self, seconds: float) -> None:
        self._new_items.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._new_items.wait()

    # -- presence and aggregates ------------------------------------------------------------

    async def _presence_reporter(self) -> None:
        interval = self.config.presence.summary_interval_s
        while True:
            await asyncio.sleep(interval)
            await self.report_now()

    async def report_now(self) -> None:
        """Queue a presence report (changes since the last one) and closed aggregates."""
        now = self.clock.now_ms()
        report = self.presence.changes_since(self._presence_cursor, now)
        self._presence_cursor = report.cursor
        items = [
            ItemIn(
                self.config.relay_id,
                "presence",
                packb({"presence": report.to_wire(), "counters": self.stats()}),
            )
        ]
        if self.downsampler is not None:
            for agg in self.downsampler.flush(now):
                items.append(ItemIn(agg.device, "agg", packb(agg.to_wire())))
        with contextlib.suppress(NovaCronError):  # at quota: counted by the outbox
            await self.outbox.append(items)
        self._new_items.set()

    # -- misc -------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        r = self.config.reconnect
        base = min(r.backoff_max_s, r.backoff_initial_s * (2.0 ** min(attempt, 30)))
        return float(base * (1 + self._rng.uniform(-r.backoff_jitter, r.backoff_jitter)))

    def stats(self) -> dict[str, Any]:
        """The relay's counters and outbox figures (``/metrics``-style, for the hub)."""
        o = self.outbox.stats()
        return {
            **self.counters.to_wire(),
            "outbox_depth": o.depth,
            "outbox_bytes": o.bytes,
            "outbox_quota_bytes": o.quota_bytes,
            "outbox_refused_metrics": o.refused_metrics,
            "outbox_over_quota_deltas": o.over_quota_deltas,
            "inflight_batches": len(self._inflight),
            "devices_online": self.presence.online_count,
            "hub_connected": self.hub_connected.is_set(),
        }


def _ring(key: bytes) -> KeyRing:
    ring = KeyRing()
    ring.add(key)
    return ring


async def run_relay(config: RelayConfig, *, shutdown: asyncio.Event | None = None) -> int:
    """Run a relay until SIGTERM/SIGINT (or ``shutdown``); return an exit code."""
    stop = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with Relay(config):
        await stop.wait()
    return 0


__all__ = ["CURSORS_SCOPE", "Relay", "RelayCounters", "run_relay"]
