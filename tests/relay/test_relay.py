"""The relay against real Mosquitto brokers, real agents and a hub-side sink."""

from __future__ import annotations

import sys
from pathlib import Path

from regional_relay.relay import Relay
from sync.models import WorkloadSpec
from tests.helpers import wait_until
from tests.relay.relay_harness import HubSink, Region, running

SLEEPER = (sys.executable, "-c", "import time; time.sleep(3600)")


async def test_events_and_state_flow_through_the_relay(tmp_path: Path) -> None:
    region = Region(tmp_path, ["gw-1"])
    region.region_broker.start()
    region.hub_broker.start()
    hub = HubSink(region)
    try:
        async with (
            running(hub.run()),
            Relay(region.relay_config) as relay,
            region.agent("gw-1") as agent,
        ):
            await wait_until(lambda: agent.link is not None and agent.link.connected.is_set())
            await wait_until(hub.connected.is_set)
            hub.set_desired("gw-1", WorkloadSpec(name="web", driver="process", command=SLEEPER))
            await wait_until(
                lambda: getattr(agent.supervisor.record("web"), "phase", "") == "running",
                within=30,
            )
            for i in range(20):
                await agent.record_event("events", "test", {"i": i})
            last = agent.replica.stream("events").next_seq - 1
            await wait_until(lambda: len(hub.unique_events("gw-1")) >= last, within=30)
            assert hub.unique_events("gw-1") == list(range(1, last + 1))
            await wait_until(lambda: relay.outbox.stats().depth == 0, within=30)
            assert any(d[0] == "device/gw-1" for d in hub.dots)
    finally:
        region.region_broker.stop()
        region.hub_broker.stop()
