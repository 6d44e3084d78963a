"""The broker configuration we ship for relay hosts, on a real Mosquitto.

``examples/mosquitto/relay.conf`` and ``relay.acl`` as shipped (port and paths
substituted by ``tests.fixtures_mqtt.relay_broker``): devices are confined to
their own topics, the relay sees every uplink and reaches every downlink.

"Does not arrive" is shown without sleeping: after the forbidden messages, a
marker goes the same way on an allowed topic, and Mosquitto delivers one
publisher's messages to a subscriber in order, so once the marker is in, anything
that was going to arrive has arrived.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest

from edge_agent._mqtt import connected
from sync.topics import device_topic
from tests.fixtures_mqtt import MosquittoBroker, relay_broker
from tests.relay.relay_harness import collect_until

pytestmark = pytest.mark.integration

REGION = "eu-west"
USERS = {"relay": "relay-pw", "gw-a": "a-pw", "gw-b": "b-pw"}
DEADLINE_S = 15.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = relay_broker(tmp_path / "relay-broker", USERS)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@asynccontextmanager
async def client(broker: MosquittoBroker, user: str) -> AsyncIterator[aiomqtt.Client]:
    async with connected(
        aiomqtt.Client(
            "127.0.0.1", broker.port, username=user, password=USERS[user], identifier=user
        )
    ) as c:
        yield c


def up(device: str) -> str:
    return device_topic(REGION, device, "up")


def down(device: str) -> str:
    return device_topic(REGION, device, "down")


async def test_device_cannot_publish_as_another_device(broker: MosquittoBroker) -> None:
    async with client(broker, "relay") as relay, client(broker, "gw-a") as a:
        await relay.subscribe("nc/v1/r/+/d/+/up", qos=1)
        await relay.subscribe("nc/v1/r/+/d/+/state", qos=1)
        await a.publish(up("gw-b"), b"forged uplink", qos=1)
        await a.publish(device_topic(REGION, "gw-b", "state"), b"forged state", qos=1)
        await a.publish(device_topic(REGION, "gw-a", "state"), b"online", qos=1)
        await a.publish(up("gw-a"), b"marker", qos=1)
        seen = await collect_until(relay, b"marker")
    assert seen == [
        (device_topic(REGION, "gw-a", "state"), b"online"),
        (up("gw-a"), b"marker"),
    ]


async def test_device_cannot_read_or_forge_another_devices_downlink(
    broker: MosquittoBroker,
) -> None:
    async with (
        client(broker, "relay") as relay,
        client(broker, "gw-a") as a,
        client(broker, "gw-b") as b,
    ):
        await b.subscribe(down("gw-b"), qos=1)
        await a.subscribe(down("gw-b"), qos=1)
        await a.subscribe("nc/v1/r/+/d/+/down", qos=1)
        await a.subscribe("#", qos=1)
        await a.subscribe(down("gw-a"), qos=1)
        # A forges a downlink for B: dropped by the broker.
        await a.publish(down("gw-b"), b"forged downlink", qos=1)
        await relay.publish(down("gw-b"), b"for b only", qos=1)
        await relay.publish(down("gw-b"), b"marker b", qos=1)
        await relay.publish(down("gw-a"), b"marker a", qos=1)
        seen_b = await collect_until(b, b"marker b")
        seen_a = await collect_until(a, b"marker a")
    assert [p for _, p in seen_b] == [b"for b only", b"marker b"]
    assert {t for t, _ in seen_a} == {down("gw-a")}
    assert b"for b only" not in {p for _, p in seen_a}


async def test_device_cannot_use_hub_topics(broker: MosquittoBroker) -> None:
    async with client(broker, "relay") as relay, client(broker, "gw-a") as a:
        await relay.subscribe("nc/v1/hub/#", qos=1)
        await a.publish(f"nc/v1/hub/r/{REGION}/up", b"forged batch", qos=1)
        await relay.publish(f"nc/v1/hub/r/{REGION}/up", b"marker", qos=1)
        seen = await collect_until(relay, b"marker")
    assert [p for _, p in seen] == [b"marker"]


@pytest.mark.parametrize(
    ("username", "password"), [(None, None), ("gw-a", "wrong"), ("nobody", "x")]
)
async def test_anonymous_and_bad_passwords_are_refused(
    broker: MosquittoBroker, username: str | None, password: str | None
) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with connected(
            aiomqtt.Client(
                "127.0.0.1", broker.port, username=username, password=password, timeout=DEADLINE_S
            )
        ):
            pass


def test_shipped_limits_are_kept(broker: MosquittoBroker) -> None:
    conf = broker.conf_path.read_text(encoding="utf-8")
    for line in (
        "persistence true",
        "max_queued_messages 100000",
        "message_size_limit 307200",
        "allow_anonymous false",
        "per_listener_settings true",
    ):
        assert f"\n{line}\n" in conf
