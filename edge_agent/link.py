"""The agent's upstream link: the sync protocol over MQTT to a relay broker.

One :class:`UpstreamLink` runs for the agent's lifetime. It connects to the
first reachable broker of the config's relay list (failing over in order),
with a Will carrying the persisted bdSeq, announces the device with a
retained ``online`` state and a HELLO, then pumps bytes between the broker
and a fresh :class:`~sync.protocol.SyncSession` until the connection drops.
Reconnects back off exponentially with jitter, bounded by the config, so a
region that heals does not see a reconnect storm.

Local changes reach the link through :meth:`UpstreamLink.submit`, a bounded
queue: when it is full the message is dropped and counted — nothing is lost,
because the state stays in the replica and the next anti-entropy pass or
HELLO sends whatever the peer still lacks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_agent._mqtt import connected, counted_queue
from edge_agent._service import reraise_lost_cancel
from edge_agent.config import AgentConfig
from sync._exceptions import NovaCronError
from sync.envelope import packb
from sync.hlc import Clock
from sync.keys import KeyRing, Signer
from sync.protocol import Replica, SyncSession
from sync.topics import device_topic

if TYPE_CHECKING:
    import aiomqtt

log = logging.getLogger(__name__)

TICK_S = 0.25
OUTBOX_LIMIT = 1024
INCOMING_QUEUE_LIMIT = 1024
"""Received messages aiomqtt may hold before it drops the newest (counted)."""


@dataclass
class LinkStats:
    """Counters of the upstream link."""

    connects: int = 0
    connect_failures: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    rejected_in: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    outbox_overflows: int = 0
    incoming_dropped: int = 0
    """Messages dropped because the bounded incoming queue was full (the relay resends)."""
    connected_to: str = ""


class UpstreamLink:
    """Keeps one sync session with the relay alive over MQTT.

    Args:
        config: the agent config (device id, region, relays, credentials, link).
        replica: the node's replica.
        signer: the device key.
        keyring: keys trusted for the peer (the hub's).
        clock: wall clock for the protocol.
        bd_seq: birth/death sequence persisted in the journal.
        scopes: the scopes to sync.
        streams: outbound event streams.
        after_receive: awaited after each inbound message was processed, with
            the session (the agent persists merged state and acks there).
        validate: the session's entry check (hub signatures on desired state).
        peer_id: the sync peer's id (``relay.<region>``).
    """

    def __init__(
        self,
        config: AgentConfig,
        replica: Replica,
        signer: Signer,
        keyring: KeyRing,
        clock: Clock,
        *,
        bd_seq: int,
        scopes: tuple[str, ...],
        streams: tuple[str, ...],
        on_change: Callable[[str, list[list[Any]] | None], None],
        after_receive: Callable[[SyncSession], Awaitable[None]],
        validate: Callable[[str, list[list[Any]]], None] | None,
        peer_id: str,
    ) -> None:
        self._config = config
        self._replica = replica
        self._signer = signer
        self._keyring = keyring
        self._clock = clock
        self._bd_base = bd_seq
        self._scopes = scopes
        self._validate = validate
        self._streams = streams
        self._on_change = on_change
        self._after_receive = after_receive
        self._peer_id = peer_id
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(OUTBOX_LIMIT)
        self._rng = random.Random()
        self.session: SyncSession | None = None
        self.stats = LinkStats()
        self.connected = asyncio.Event()
        self._sessions = 0

    @property
    def up_topic(self) -> str:
        """Where this device publishes."""
        return device_topic(self._config.region, self._config.device_id, "up")

    @property
    def down_topic(self) -> str:
        """Where this device listens."""
        return device_topic(self._config.region, self._config.device_id, "down")

    @property
    def state_topic(self) -> str:
        """The retained birth/death topic."""
        return device_topic(self._config.region, self._config.device_id, "state")

    def submit(self, messages: list[bytes]) -> None:
        """Queue protocol output for sending; drop and count when full."""
        for data in messages:
            try:
                self._outbox.put_nowait(data)
            except asyncio.QueueFull:
                self.stats.outbox_overflows += 1

    def _count_drop(self) -> None:
        self.stats.incoming_dropped += 1

    def _backoff(self, attempt: int) -> float:
        s = self._config.link
        base = min(s.backoff_max_s, s.backoff_initial_s * (2.0 ** min(attempt, 30)))
        return float(max(0.0, base * (1 + self._rng.uniform(-s.backoff_jitter, s.backoff_jitter))))

    async def run(self) -> None:
        """Connect, sync, and reconnect with backoff, until cancelled."""
        import aiomqtt  # noqa: PLC0415 - only an agent with a link pays for it

        relays = self._config.relays
        index = 0
        failures = 0  # attempts failed in a row; a connection made resets it
        while True:
            relay = relays[index % len(relays)]
            connects = self.stats.connects
            try:
                await self._connected_session(aiomqtt, relay.host, relay.port)
                failures = 0
            except* aiomqtt.MqttError as group:
                # The session's task group wraps the loss of the connection.
                self.stats.connect_failures += 1
                log.info(
                    "relay %s:%s unreachable or lost: %s",
                    relay.host,
                    relay.port,
                    group.exceptions[0],
                )
                if self.stats.connects > connects:
                    failures = 0  # it was up: a lost session starts the backoff afresh
                failures += 1
                index += 1  # fail over to the next relay in the list
            self.connected.clear()
            self.session = None
            self.stats.connected_to = ""
            # The backoff grows with each whole round of the list that failed; the
            # next relay of a round is tried within one initial backoff (jittered,
            # so a relay's devices do not all land on the next one at once).
            if failures % len(relays) == 0:
                await asyncio.sleep(self._backoff(failures // len(relays)))
            else:
                await asyncio.sleep(self._rng.uniform(0, self._config.link.backoff_initial_s))

    async def _connected_session(self, aiomqtt: Any, host: str, port: int) -> None:
        cfg = self._config
        self._sessions += 1
        # bdSeq grows across restarts (journal) and across reconnects (here).
        bd_seq = (self._bd_base << 20) + self._sessions
        state_offline = packb({"online": False, "bd": bd_seq})
        username = password = None
        if cfg.credentials is not None:
            username = cfg.credentials.username
            password = cfg.credentials.read_password()
        client: aiomqtt.Client = aiomqtt.Client(
            host,
            port,
            identifier=f"nc-{cfg.device_id}",
            username=username,
            password=password,
            keepalive=cfg.link.keepalive_s,
            will=aiomqtt.Will(self.state_topic, state_offline, qos=1, retain=True),
            max_queued_incoming_messages=INCOMING_QUEUE_LIMIT,
            queue_type=counted_queue(f"agent {cfg.device_id}", self._count_drop),
        )
        async with connected(client):
            self.stats.connects += 1
            self.stats.connected_to = f"{host}:{port}"
            log.info("connected to relay %s:%s (bdSeq %s)", host, port, bd_seq)
            await client.subscribe(self.down_topic, qos=1)
            await client.publish(
                self.state_topic, packb({"online": True, "bd": bd_seq}), qos=1, retain=True
            )
            session = SyncSession(
                self._replica,
                self._peer_id,
                self._signer,
                self._keyring,
                self._clock,
                scopes=self._scopes,
                streams=self._streams,
                bd_seq=bd_seq,
                max_batch=cfg.link.batch_max,
                on_change=self._on_change,
                validate=self._validate,
            )
            self.session = session
            while not self._outbox.empty():  # stale output of the previous session
                self._outbox.get_nowait()
            self.submit(session.start())
            self.connected.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._sender(client), name="link-sender")
                tg.create_task(self._ticker(session), name="link-ticker")
                tg.create_task(self._receiver(client, session), name="link-receiver")

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            data = await self._outbox.get()
            await client.publish(self.up_topic, data, qos=1)
            # publish() waits for the PUBACK with asyncio.wait_for, which can
            # swallow a cancellation on Python 3.11; the session's task group
            # cancels its children only once, so a lost one would leave this
            # task waiting on an empty outbox and the agent's close hung (seen
            # in CI). A child task: its cancellation count is its own.
            reraise_lost_cancel()
            self.stats.messages_out += 1
            self.stats.bytes_out += len(data)

    async def _ticker(self, session: SyncSession) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.submit(session.tick())

    async def _receiver(self, client: aiomqtt.Client, session: SyncSession) -> None:
        async for message in client.messages:
            payload: Any = message.payload
            self.stats.messages_in += 1
            if not isinstance(payload, bytes | bytearray):
                self._reject("not bytes")
                continue
            try:
                replies = session.receive(bytes(payload))
            except NovaCronError as exc:
                self._reject(type(exc).__name__)
                log.warning("rejected message on %s: %s", message.topic, exc)
                continue
            # Durable first, then acknowledge: an ACK must never precede the write.
            await self._after_receive(session)
            self.submit(replies)

    def _reject(self, reason: str) -> None:
        self.stats.rejected_in += 1
        self.stats.rejected_by_reason[reason] = self.stats.rejected_by_reason.get(reason, 0) + 1
