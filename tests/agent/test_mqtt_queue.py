"""aiomqtt's bounded incoming queue with its drops counted, against real Mosquitto."""

from __future__ import annotations

import asyncio
import logging

import aiomqtt
import pytest

from edge_agent._mqtt import counted_queue
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
