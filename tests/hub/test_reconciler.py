"""The reconciler against a real Mosquitto and a real SQLite store, fed raw relay
batches: commits before acks, exactly-once storage across a hub restart,
forged batches refused, commit failures never acknowledged."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import aiomqtt
import pytest

from cloud_hub._sqlite_store import SQLiteStore, open_sqlite_store
from cloud_hub.ingest import device_scope
from cloud_hub.reconciler import BrokerAddress, Reconciler, ReconcilerError, ReconcilerSettings
from cloud_hub.store import DeviceRecord, IngestCommit, NotFoundError, Store, StoreError
from cloud_hub.testing import EventRecorder
from edge_agent._mqtt import connected as mqtt_connected
from sync.envelope import decode_envelope, encode_envelope, packb
from sync.hlc import pack_ts
from sync.keys import KeyRing, Signer
from sync.protocol import DELTAS, EVENTS
from sync.relaying import decode_batch_ack, encode_batch
from sync.topics import hub_topic
from tests.fixtures_mqtt import MosquittoBroker
from tests.helpers import wait_until
from tests.hub.relay_batches import REGION, RELAY, relay_batch, ring

pytestmark = pytest.mark.integration

DEVICE = "gw-1"


class Observer:
    """A FleetObserver that records what it is told."""

    def __init__(self) -> None:
        self.reported: list[tuple[str, dict[str, Any]]] = []
        self.presence: list[tuple[str, str]] = []

    async def device_reported(self, device_id: str, changes: Mapping[str, Any]) -> None:
        self.reported.append((device_id, dict(changes)))

    async def presence_changed(self, device_id: str, state: str, now_ms: int) -> None:
        self.presence.append((device_id, state))


class GatedStore:
    """The real store, with commit_ingest held at a gate (and failing on demand)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = 0
        self.committed: list[IngestCommit] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit_ingest(self, commit: IngestCommit) -> None:
        await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise StoreError("disk full (test)")
        await self.inner.commit_ingest(commit)
        self.committed.append(commit)


class FakeRelay:
    """Signs batches as the region's relay and watches the hub's downlink."""

    def __init__(self, broker: MosquittoBroker, key: Signer, device: Signer) -> None:
        self.broker = broker
        self.key = key
        self.device = device
        self.seq = 0
        self.acks: list[list[int]] = []
        self.hub_keys: KeyRing | None = None

    def batch(self, items: list[tuple[int, str, bytes]], *, signer: Signer | None = None) -> bytes:
        self.seq += 1
        return relay_batch(signer or self.key, self.seq, [(i, DEVICE, k, p) for i, k, p in items])

    def events(self, start: int, n: int) -> bytes:
        items = [["test", 1000 + s, packb({"i": s})] for s in range(start, start + n)]
        body = {"s": "s", "st": "events", "from": start, "first": 1, "items": items}
        return encode_envelope(EVENTS, DEVICE, 1, 1, packb(body), self.device)

    def deltas(self, first: int, n: int) -> bytes:
        entries = [
            [f"reported/k{c}", pack_ts(1_700_000_000_000 + c, 0), DEVICE, c, False, c]
            for c in range(first, first + n)
        ]
        body = {"s": "s", "sc": device_scope(DEVICE), "d": entries, "c": None}
        return encode_envelope(DELTAS, DEVICE, 1, 1, packb(body), self.device)

    @asynccontextmanager
    async def connected(self, hub_keys: KeyRing) -> AsyncIterator[aiomqtt.Client]:
        client = aiomqtt.Client("127.0.0.1", self.broker.port, identifier="fake-relay")
        async with mqtt_connected(client) as c:
            await c.subscribe(hub_topic(REGION, "down"), qos=1)

            async def listen() -> None:
                async for message in c.messages:
                    assert isinstance(message.payload, bytes)
                    env = decode_envelope(message.payload, hub_keys)
                    if env.type == "BATCH_ACK":
                        self.acks.append(decode_batch_ack(env)[1])

            task = asyncio.create_task(listen())
            try:
                yield c
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task


async def publish(client: aiomqtt.Client, data: bytes) -> None:
    await client.publish(hub_topic(REGION, "up"), data, qos=1)


@asynccontextmanager
async def hub(tmp_path: Path, device: Signer) -> AsyncIterator[tuple[SQLiteStore, GatedStore]]:
    """The real store, with ``device`` enrolled, and a gated view of it."""
    store = await asyncio.to_thread(open_sqlite_store, tmp_path / "hub.db")
    async with store:
        await store.add_devices([_record(device)])
        yield store, GatedStore(store)


def _record(device: Signer, device_id: str = DEVICE) -> DeviceRecord:
    return DeviceRecord(
        id=device_id,
        region=REGION,
        profile="generic-x86_64",
        public_key=base64.b64encode(device.public_key_bytes).decode(),
        arch="x86_64",
    )


def reconciler(
    store: Store, broker: MosquittoBroker, hub_key: Signer, relay: Signer, **kw: Any
) -> Reconciler:
    return Reconciler(
        store,
        hub_key,
        BrokerAddress("127.0.0.1", broker.port, identifier=f"hub-{id(store)}"),
        {RELAY: (REGION, ring(relay))},
        settings=ReconcilerSettings(backoff_initial_s=0.05, backoff_max_s=0.5),
        **kw,
    )


async def test_batches_commit_before_ack_and_survive_a_hub_restart(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    relay_key, hub_key, device = Signer.generate(), Signer.generate(), Signer.generate()
    fake = FakeRelay(mosquitto, relay_key, device)
    observer, events = Observer(), EventRecorder()
    first = fake.batch([(1, "delta", fake.deltas(1, 3)), (2, "event", fake.events(1, 4))])
    second = fake.batch([(3, "event", fake.events(5, 2))])
    async with (
        hub(tmp_path, device) as (store, gated),
        fake.connected(ring(hub_key)) as client,
    ):
        async with reconciler(
            cast("Store", gated), mosquitto, hub_key, relay_key, observer=observer, publish=events
        ) as rec:
            await wait_until(rec.connected.is_set)
            gated.gate.clear()
            await publish(client, first)
            await wait_until(lambda: rec.stats()["batches"] == 1)
            await asyncio.sleep(0.3)
            assert fake.acks == []  # ingested, but not durable yet: no ack
            assert await store.list_events(DEVICE) == []
            gated.gate.set()
            await wait_until(lambda: fake.acks == [[1, 2]])
            assert len(gated.committed) == 1
            await wait_until(lambda: len(observer.reported) == 1)
            assert observer.reported == [(DEVICE, {f"reported/k{c}": c for c in (1, 2, 3)})]
            assert events.of("device.reported") == [
                {"device": DEVICE, "keys": ["reported/k1", "reported/k2", "reported/k3"]}
            ]
        # The hub restarts: the relay resends what it holds, the hub dedupes
        # and acknowledges again; new data goes on from the stored cursor.
        replayed = Observer()
        async with reconciler(store, mosquitto, hub_key, relay_key, observer=replayed) as rec:
            assert await rec.replay_reported() == 1
            assert replayed.reported == observer.reported
            await wait_until(rec.connected.is_set)
            await publish(client, first)
            await publish(client, second)
            await wait_until(lambda: fake.acks[1:] == [[1, 2], [3]])
            stats = rec.stats()
            assert (stats["duplicates"], stats["deltas_merged"], stats["events"]) == (1, 0, 2)
            assert stats["acks_sent"] == 2
        stored = await store.list_events(DEVICE)
        assert [e.seq for e in stored] == [1, 2, 3, 4, 5, 6]
        assert stored[0].body == {"kind": "test", "ts_ms": 1001, "data": {"i": 1}}
        assert await store.load_cursors() == {(DEVICE, "events"): 7}
        scope = await store.get_scope(device_scope(DEVICE))
        assert scope is not None


async def test_a_failed_commit_is_not_acked_and_the_resend_is_ingested(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    relay_key, hub_key, device = Signer.generate(), Signer.generate(), Signer.generate()
    fake = FakeRelay(mosquitto, relay_key, device)
    data = fake.batch([(1, "event", fake.events(1, 3)), (2, "delta", fake.deltas(1, 1))])
    async with (
        hub(tmp_path, device) as (store, gated),
        fake.connected(ring(hub_key)) as client,
        reconciler(cast("Store", gated), mosquitto, hub_key, relay_key) as rec,
    ):
        await wait_until(rec.connected.is_set)
        gated.fail = 1
        await publish(client, data)
        await wait_until(lambda: rec.stats()["commit_failures"] == 1)
        await asyncio.sleep(0.2)
        assert fake.acks == []
        await publish(client, data)  # the relay's resend after its ack timeout
        await wait_until(lambda: fake.acks == [[1, 2]])
        assert [e.seq for e in await store.list_events(DEVICE)] == [1, 2, 3]
        assert rec.stats()["deltas_merged"] == 2  # once per attempt; stored once
        assert rec.core.replica.scope(device_scope(DEVICE)).keys() == ["reported/k1"]


async def test_forged_and_foreign_batches_are_refused_and_counted(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    relay_key, hub_key, device = Signer.generate(), Signer.generate(), Signer.generate()
    fake = FakeRelay(mosquitto, relay_key, device)
    mallory = Signer.generate()
    async with (
        hub(tmp_path, device) as (store, _),
        fake.connected(ring(hub_key)) as client,
        reconciler(store, mosquitto, hub_key, relay_key) as rec,
    ):
        await wait_until(rec.connected.is_set)
        await publish(client, fake.batch([(1, "event", fake.events(1, 2))], signer=mallory))
        impostor = encode_batch(mallory, src="relay-x", seq=1, ts=1, epoch=1, items=[])
        await publish(client, impostor)
        await publish(client, b"\x00 not an envelope")
        # A batch from the real relay whose device item is forged: dropped, acked.
        forged = encode_envelope(EVENTS, DEVICE, 1, 1, packb({"s": "s"}), mallory)
        await publish(client, fake.batch([(5, "event", forged)]))
        await wait_until(lambda: fake.acks == [[5]])
        stats = rec.stats()
        assert stats["refused"] == {"bad_relay_signature": 1, "unknown_relay": 1}
        assert stats["rejected"] == {"bad_device_signature": 1}
        assert stats["uplink_rejected"] == {"garbage": 1}
        assert await store.list_events(DEVICE) == []


async def test_set_desired_persists_before_returning_and_refuses_bad_input(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    relay_key, hub_key, device = Signer.generate(), Signer.generate(), Signer.generate()
    async with hub(tmp_path, device) as (store, _):
        async with reconciler(store, mosquitto, hub_key, relay_key) as rec:
            await rec.set_desired(DEVICE, "web", {"name": "web", "driver": "process"})
            with pytest.raises(ReconcilerError):
                await rec.set_desired(DEVICE, "bad", {"x": object()})
            with pytest.raises(NotFoundError):
                await rec.set_desired("gw-unknown", "web", None)
            # The registry of the region names the enrolled device.
            key = base64.b64encode(device.public_key_bytes).decode()
            assert rec.core.registry_devices(REGION) == {f"device/{DEVICE}": {"public_key": key}}
        # A restarted hub has the desired entry and the registry from the store.
        async with reconciler(store, mosquitto, hub_key, relay_key) as rec:
            assert rec.core.replica.scope(f"desired/{DEVICE}").keys() == ["web"]
            assert list(rec.core.registry_devices(REGION)) == [f"device/{DEVICE}"]
