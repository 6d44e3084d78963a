"""The embedded amqtt broker: real aiomqtt clients, QoS 1, stop and restart."""

from __future__ import annotations

import asyncio
import socket

import aiomqtt
import pytest

import simulator.broker
from simulator.broker import BrokerStartError, EmbeddedBroker, free_port


async def _roundtrip(port: int, n: int) -> list[bytes]:
    got: list[bytes] = []
    async with aiomqtt.Client("127.0.0.1", port, identifier="sub") as sub:
        await sub.subscribe("t/#", qos=1)
        async with aiomqtt.Client("127.0.0.1", port, identifier="pub") as pub:
            for i in range(n):
                await pub.publish(f"t/{i % 3}", f"m{i}".encode(), qos=1)
        async with asyncio.timeout(10):
            async for message in sub.messages:
                assert message.qos == 1
                assert isinstance(message.payload, bytes)
                got.append(message.payload)
                if len(got) == n:
                    break
    return got


async def test_publish_subscribe_qos1() -> None:
    async with EmbeddedBroker() as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        got = await _roundtrip(broker.port, 200)
    assert got == [f"m{i}".encode() for i in range(200)]
    assert not broker.running


async def test_restart_keeps_port_and_serves_again() -> None:
    async with EmbeddedBroker() as broker:
        port = broker.port
        assert await _roundtrip(port, 5) == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        await broker.stop()
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
        await broker.start()
        assert broker.port == port
        assert broker.starts == 2
        assert len(await _roundtrip(port, 5)) == 5
        await broker.restart(down_s=0.05)
        assert broker.starts == 3
        assert len(await _roundtrip(port, 3)) == 3


async def test_client_sees_broker_stop() -> None:
    broker = EmbeddedBroker()
    await broker.start()
    async with broker, aiomqtt.Client("127.0.0.1", broker.port, identifier="c") as client:
        await client.subscribe("x", qos=1)
        await broker.stop()
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(10):
                async for _ in client.messages:
                    pass


async def test_fixed_port_in_use_is_a_typed_error() -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        broker = EmbeddedBroker(port)
        with pytest.raises(BrokerStartError) as info:
            await broker.start()
        assert info.value.port == port
        assert not broker.running


async def test_a_hung_amqtt_shutdown_still_frees_the_port_and_drops_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """amqtt 0.12 can hang stopping a client session, and closes its listener only
    after that: seen as a restart that could not bind its port. The wrapper frees
    the port first and aborts the connections the shutdown left."""
    never = asyncio.Event()

    async def hung_shutdown(self: object) -> None:
        await never.wait()

    broker = EmbeddedBroker()
    await broker.start()
    port = broker.port
    monkeypatch.setattr(simulator.broker, "_SHUTDOWN_GRACE_S", 0.2)
    async with aiomqtt.Client("127.0.0.1", port, identifier="c") as client:
        await client.subscribe("x", qos=1)
        monkeypatch.setattr(simulator.broker._Broker, "shutdown", hung_shutdown)
        await broker.stop()
        with pytest.raises(aiomqtt.MqttError):  # dropped, not left hanging
            async with asyncio.timeout(10):
                async for _ in client.messages:
                    pass
    monkeypatch.undo()
    await broker.start()  # the same port binds again
    assert broker.port == port
    assert len(await _roundtrip(port, 3)) == 3
    await broker.stop()
