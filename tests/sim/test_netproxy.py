"""The TCP proxy between real aiomqtt clients and a real Mosquitto."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from simulator.netproxy import ProxyError, TcpProxy
from tests.fixtures_mqtt import MosquittoBroker

pytestmark = pytest.mark.integration


async def _qos1_roundtrip(port: int, ident: str, connect_timeout: float = 5) -> float:
    """Connect through ``port``, publish QoS 1 to ourselves, return the seconds it took."""
    t0 = time.perf_counter()
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=ident, timeout=connect_timeout
    ) as client:
        await client.subscribe(f"p/{ident}", qos=1)
        await client.publish(f"p/{ident}", b"x", qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert message.payload == b"x"
                break
    return time.perf_counter() - t0


async def test_forwards_and_counts(mosquitto: MosquittoBroker) -> None:
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        await _qos1_roundtrip(proxy.port, "a")
        assert proxy.stats.accepted == 1
        assert proxy.stats.bytes_up > 0
        assert proxy.stats.bytes_down > 0


async def test_cut_disconnects_and_heal_reconnects(mosquitto: MosquittoBroker) -> None:
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        client = aiomqtt.Client("127.0.0.1", proxy.port, identifier="c", timeout=5)
        async with client:
            await client.subscribe("x", qos=1)
            assert proxy.connections == 1
            t0 = time.perf_counter()
            proxy.partition()
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(5):
                    async for _ in client.messages:
                        pass
            assert time.perf_counter() - t0 < 2
        assert proxy.stats.killed == 1
        # Refused while partitioned.
        with pytest.raises(aiomqtt.MqttError):
            await _qos1_roundtrip(proxy.port, "refused", connect_timeout=1)
        assert proxy.stats.refused >= 1
        proxy.heal()
        await _qos1_roundtrip(proxy.port, "back")


async def test_latency_is_added_each_way(mosquitto: MosquittoBroker) -> None:
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        base = await _qos1_roundtrip(proxy.port, "fast")
        proxy.set_latency(0.1)
        slow = await _qos1_roundtrip(proxy.port, "slow")
    # CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH/PUBACK(+ delivery): >= 3 round trips.
    assert slow - base >= 0.55, (base, slow)


async def test_blackhole_is_noticed_by_keepalive_and_heals(mosquitto: MosquittoBroker) -> None:
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        client = aiomqtt.Client("127.0.0.1", proxy.port, identifier="k", keepalive=1, timeout=1)
        async with client:
            proxy.partition("blackhole")
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(10):
                    async for _ in client.messages:
                        pass
        proxy.heal()
        await _qos1_roundtrip(proxy.port, "after")


async def test_kill_connections_is_one_off(mosquitto: MosquittoBroker) -> None:
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        async with aiomqtt.Client("127.0.0.1", proxy.port, identifier="a", timeout=5) as c:
            await c.subscribe("x", qos=1)
            assert proxy.kill_connections() == 1
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(5):
                    async for _ in c.messages:
                        pass
        await _qos1_roundtrip(proxy.port, "again")
        assert proxy.partitioned is None


async def test_upstream_down_refuses(mosquitto: MosquittoBroker) -> None:
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        mosquitto.stop()
        with pytest.raises(aiomqtt.MqttError):
            await _qos1_roundtrip(proxy.port, "nobody", connect_timeout=1)
        assert proxy.stats.refused == 1


async def test_buffers_are_bounded_by_backpressure() -> None:
    """An upstream that never reads: the proxy stalls instead of buffering without end."""
    release = asyncio.Event()
    received = 0

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await release.wait()
        while data := await reader.read(1 << 16):
            received += len(data)
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, TcpProxy("127.0.0.1", port, chunk_bytes=4096, max_chunks=4) as proxy:
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        chunk = b"z" * 65536
        sent = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                while True:
                    writer.write(chunk)
                    sent += len(chunk)
                    await writer.drain()
        assert proxy.stats.stalls > 0
        # What the proxy forwarded is bounded by kernel buffers plus 4 x 4 KiB.
        assert proxy.stats.bytes_up < 64 * 1024 * 1024
        release.set()
        writer.close()
        async with asyncio.timeout(10):
            while received < sent:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert received == sent


async def test_port_in_use_is_a_typed_error() -> None:
    async with TcpProxy("127.0.0.1", 1) as first:
        with pytest.raises(ProxyError):
            await TcpProxy("127.0.0.1", 1, listen_port=first.port).start()
