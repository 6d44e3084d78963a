"""edge_agent._mqtt: aiomqtt's bounded incoming queue with its drops counted,
against real Mosquitto, and connections that never leak their socket."""

from __future__ import annotations

import asyncio
import logging

import aiomqtt
import pytest

from edge_agent._mqtt import connected, counted_queue
from tests.fixtures_mqtt import MosquittoBroker
from tests.helpers import wait_until


async def test_a_full_incoming_queue_drops_the_newest_and_counts_each(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    dropped: list[int] = []
    queue_type = counted_queue("test client", lambda: dropped.append(1))
    async with (
        aiomqtt.Client(
            "127.0.0.1",
            mosquitto.port,
            identifier="slow-reader",
            max_queued_incoming_messages=5,
            queue_type=queue_type,
        ) as reader,
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="writer") as writer,
    ):
        await reader.subscribe("q/#", qos=1)
        with caplog.at_level(logging.WARNING, logger="edge_agent._mqtt"):
            for i in range(50):  # nobody reads meanwhile
                await writer.publish(f"q/{i}", str(i).encode(), qos=1)
            await wait_until(lambda: len(dropped) == 45)
        got: list[bytes] = []
        async with asyncio.timeout(10):
            async for message in reader.messages:
                assert isinstance(message.payload, bytes)
                got.append(message.payload)
                if len(got) == 5:
                    break
    assert got == [str(i).encode() for i in range(5)]  # the oldest kept, in order
    # One warning for the first drop, not one per message.
    warnings = [r for r in caplog.records if "incoming MQTT queue full" in r.getMessage()]
    assert len(warnings) == 1
    assert "test client" in warnings[0].getMessage()


def test_an_unbounded_queue_never_drops() -> None:
    queue = counted_queue("x", lambda: pytest.fail("counted a drop"))(maxsize=0)
    for i in range(10_000):
        queue.put_nowait(i)
    assert queue.qsize() == 10_000


async def test_a_connect_cancelled_before_connack_closes_its_socket() -> None:
    """A broker that accepts and never answers: the client waits for CONNACK and
    is cancelled (a shutdown, a timeout). Plain ``async with client`` leaves
    paho's socket open until the garbage collector finds it; ``connected``
    closes it, which the broker side sees as end of stream."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aiomqtt.Client("127.0.0.1", port, identifier="never-acked")

    async def hold() -> None:
        async with connected(client):
            pytest.fail("connected without a CONNACK")

    async with server:
        task = asyncio.create_task(hold())
        reader, writer = await asyncio.wait_for(accepted.get(), 10)
        await asyncio.sleep(0.1)  # the CONNECT is out; the client waits for CONNACK
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The client's end is closed: the broker side reads to end of stream.
        rest = await asyncio.wait_for(reader.read(), 10)
        assert reader.at_eof()
        assert rest == b"" or rest.startswith(b"\x10")  # what is left of the CONNECT
        writer.close()
        await writer.wait_closed()
