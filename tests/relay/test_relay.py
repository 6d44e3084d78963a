"""The relay against real Mosquitto brokers (the shipped relay config and ACL),
real agents, and a hub-side sink that verifies, dedupes and acknowledges."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import aiomqtt

from edge_agent.agent import Agent
from regional_relay.relay import Relay
from sync.envelope import encode_envelope, packb
from sync.keys import Signer
from sync.models import WorkloadSpec
from sync.topics import device_topic
from tests.helpers import running, wait_until, wait_until_async
from tests.relay.relay_harness import (
    REGION,
    SLEEPER,
    HubSink,
    Region,
    brokers,
    phase,
)


async def produce(agent: Agent, n_events: int, n_deltas: int) -> None:
    """What a busy device does: events and state writes, online or not."""
    for i in range(max(n_events, n_deltas)):
        if i < n_events:
            await agent.record_event("events", "test", {"i": i})
        if i < n_deltas:
            await agent.write_state(f"reported/sensor-{i % 3}", {"reading": i})


def device_dots(hub: HubSink, device: str) -> set[int]:
    return {
        c for (scope, origin, c) in hub.dots if scope == f"device/{device}" and origin == device
    }


def has_events(hub: HubSink, device: str, last: int, stream: str = "events") -> bool:
    return len(hub.unique_events(device, stream)) >= last


def has_dots(hub: HubSink, agent: Agent) -> bool:
    return device_dots(hub, agent.config.device_id) >= agent_dots(agent)


def agent_dots(agent: Agent) -> set[int]:
    ctx = agent.replica.scope(agent.state.scope_name).context
    return set(range(1, ctx.contiguous(agent.config.device_id) + 1))


async def test_desired_state_and_events_flow_through_the_relay(tmp_path: Path) -> None:
    region = Region(tmp_path, ["gw-1"])
    hub = HubSink(region)
    async with (
        brokers(region),
        running(hub.run()),
        Relay(region.relay_config) as relay,
        region.agent("gw-1") as agent,
    ):
        await wait_until(lambda: agent.link.connected.is_set() and hub.connected.is_set())
        hub.set_desired("gw-1", WorkloadSpec(name="web", driver="process", command=SLEEPER))
        await wait_until(lambda: phase(agent, "web") == "running", within=30)
        await produce(agent, 20, 5)
        last = agent.replica.stream("events").next_seq - 1
        await wait_until(lambda: hub.unique_events("gw-1") == list(range(1, last + 1)), within=30)
        await wait_until(lambda: device_dots(hub, "gw-1") >= agent_dots(agent), within=30)
        await wait_until(lambda: relay.outbox.stats().depth == 0, within=30)
        # The relay's summaries reach the hub with its counters.
        await wait_until(lambda: any(p["counters"]["stored"] > 0 for p in hub.presence))


async def test_fifty_agents_through_a_hub_outage_arrive_exactly_once(tmp_path: Path) -> None:
    devices = [f"gw-{i:02d}" for i in range(50)]
    region = Region(tmp_path, devices)
    hub = HubSink(region)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(brokers(region))
        await stack.enter_async_context(running(hub.run()))
        relay = await stack.enter_async_context(Relay(region.relay_config))
        agents = [await stack.enter_async_context(region.agent(d)) for d in devices]
        await wait_until(lambda: all(a.link.connected.is_set() for a in agents), within=60)
        await asyncio.gather(*(produce(a, 5, 2) for a in agents))

        region.hub_broker.kill()  # the region's uplink is gone
        await wait_until(lambda: not relay.hub_connected.is_set())
        await asyncio.gather(*(produce(a, 20, 4) for a in agents))
        # Agents were acknowledged by the relay: their journals let go.
        await wait_until(lambda: relay.outbox.stats().depth > 0)

        region.hub_broker.start()
        for agent in agents:
            device = agent.config.device_id
            last = agent.replica.stream("events").next_seq - 1
            await wait_until(functools.partial(has_events, hub, device, last), within=90)
            # Exactly once per sequence after dedupe, in per-device order.
            assert hub.unique_events(device) == list(range(1, last + 1))
            await wait_until(functools.partial(has_dots, hub, agent))
        await wait_until(lambda: relay.outbox.stats().depth == 0, within=60)
        assert relay.counters.rejected.total() == 0


async def test_forged_and_garbage_uplinks_are_dropped_and_counted(tmp_path: Path) -> None:
    region = Region(tmp_path, ["gw-1", "gw-2"])
    hub = HubSink(region)
    async with (
        brokers(region),
        running(hub.run()),
        Relay(region.relay_config) as relay,
        region.agent("gw-2") as honest,
    ):
        await wait_until(relay.devices_connected.is_set)
        await wait_until(honest.link.connected.is_set)
        before = relay.outbox.stats()
        up = device_topic(REGION, "gw-1", "up")
        mallory = Signer.generate()
        forged = encode_envelope("DELTAS", "gw-1", 1, 1, packb({"s": "x"}), mallory)
        # gw-1's broker account is stolen: it can publish on gw-1's topic, nothing more.
        async with aiomqtt.Client(
            "127.0.0.1", region.region_broker.port, username="gw-1", password="pw-gw-1"
        ) as thief:
            await thief.publish(up, b"\x00garbage\xff" * 10, qos=1)
            await thief.publish(up, forged, qos=1)
            await thief.publish(up, b"\x81\xa1v\x02", qos=1)
        await wait_until(lambda: relay.counters.rejected.total() >= 3)
        assert relay.counters.rejected["garbage"] >= 2
        assert relay.counters.rejected["SignatureError"] == 1
        after = relay.outbox.stats()
        assert (after.appended, after.depth) == (before.appended, before.depth)
        assert relay.replica.scope("device/gw-1").keys() == []
        # The relay keeps working for honest devices.
        await produce(honest, 3, 1)
        await wait_until(lambda: len(hub.unique_events("gw-2")) >= 3, within=30)


async def test_agent_reconnecting_while_hub_is_away_gets_desired_state(tmp_path: Path) -> None:
    region = Region(tmp_path, ["gw-1"])
    hub = HubSink(region)
    spec = WorkloadSpec(name="web", driver="process", command=SLEEPER)
    async with brokers(region), running(hub.run()), Relay(region.relay_config) as relay:
        await wait_until(lambda: relay.hub_connected.is_set() and hub.connected.is_set())
        hub.set_desired("gw-1", spec)
        await wait_until(lambda: relay.replica.scope("desired/gw-1").get("web") is not None)
        region.hub_broker.kill()
        await wait_until(lambda: not relay.hub_connected.is_set())
        async with region.agent("gw-1") as agent:  # first connection, hub away
            await wait_until(lambda: phase(agent, "web") == "running", within=30)
    # The relay kept the desired state durably: a restarted relay still has it.
    async with Relay(region.relay_config) as relay:
        assert relay.replica.scope("desired/gw-1").get("web") is not None


async def test_late_death_of_an_old_session_does_not_mark_the_device_offline(
    tmp_path: Path,
) -> None:
    region = Region(tmp_path, ["gw-1"])
    state = device_topic(REGION, "gw-1", "state")
    async with brokers(region), Relay(region.relay_config) as relay:
        await wait_until(relay.devices_connected.is_set)
        async with aiomqtt.Client(
            "127.0.0.1", region.region_broker.port, username="gw-1", password="pw-gw-1"
        ) as device:
            await device.publish(state, packb({"online": True, "bd": 7}), qos=1, retain=True)
            await wait_until(lambda: getattr(relay.presence.get("gw-1"), "online", False))
            # The Will of session 6 arrives late.
            await device.publish(state, packb({"online": False, "bd": 6}), qos=1)
            await wait_until(lambda: relay.presence.counters().stale_deaths >= 1)
            entry = relay.presence.get("gw-1")
            assert entry is not None and entry.online and entry.bd == 7
            # A real death of the current session does mark it offline.
            await device.publish(state, packb({"online": False, "bd": 7}), qos=1)
            await wait_until(lambda: not getattr(relay.presence.get("gw-1"), "online", True))


def _start_relay(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "novacron", "relay", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_kill_9_of_the_relay_while_forwarding_loses_nothing(tmp_path: Path) -> None:
    devices = [f"gw-{i}" for i in range(5)]
    region = Region(tmp_path, devices)
    hub = HubSink(region)
    log = tmp_path / "relay.log"
    proc = _start_relay(region.relay_config_path, log)
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(brokers(region))
            await stack.enter_async_context(running(hub.run()))
            agents = [await stack.enter_async_context(region.agent(d)) for d in devices]
            await wait_until(lambda: all(a.link.connected.is_set() for a in agents), within=60)
            producing = asyncio.gather(*(produce(a, 200, 20) for a in agents))
            await wait_until(lambda: hub.batches >= 3, within=60)
            os.kill(proc.pid, signal.SIGKILL)  # mid-forwarding
            proc.wait(timeout=30)
            await asyncio.sleep(0.5)
            proc = _start_relay(region.relay_config_path, log)
            await producing

            async def drained() -> bool:
                counts = [await a.journal.event_count("events") for a in agents]
                return sum(counts) == 0

            await wait_until_async(drained, within=120)  # all acked by the relay
            for agent in agents:
                device = agent.config.device_id
                last = agent.replica.stream("events").next_seq - 1
                await wait_until(functools.partial(has_events, hub, device, last), within=120)
                assert hub.unique_events(device) == list(range(1, last + 1))
                await wait_until(functools.partial(has_dots, hub, agent))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(log.read_text(errors="replace")[-2000:])


async def test_metrics_are_downsampled_and_raw_events_still_forwarded(tmp_path: Path) -> None:
    region = Region(tmp_path, ["gw-1"], relay_overrides={"downsample": {"interval_s": 1}})
    hub = HubSink(region)
    async with (
        brokers(region),
        running(hub.run()),
        Relay(region.relay_config),
        region.agent("gw-1") as agent,
    ):
        await wait_until(agent.link.connected.is_set)
        # A figure of the test's own: the agent's real metrics (sampled on its
        # own timer, into the same stream) never carry it.
        for i in range(10):
            await agent.record_event("metrics", "metric", {"test_gauge": float(i)})
        last = agent.replica.stream("metrics").next_seq - 1
        await wait_until(functools.partial(has_events, hub, "gw-1", last, "metrics"), within=30)

        def gauges() -> list[list[float]]:
            return [
                a["figures"]["test_gauge"]
                for a in hub.aggregates
                if a["device"] == "gw-1" and "test_gauge" in a["figures"]
            ]

        # Windows close once their interval is over; summaries carry them.
        await wait_until(lambda: sum(g[3] for g in gauges()) >= 10, within=30)
        stats = gauges()
        assert min(s[0] for s in stats) == 0.0
        assert max(s[1] for s in stats) == 9.0


async def test_outbox_quota_refuses_metrics_first_never_state(tmp_path: Path) -> None:
    region = Region(tmp_path, ["gw-1"], relay_overrides={"outbox": {"quota_mb": 1}})
    hub = HubSink(region)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(brokers(region))
        relay = await stack.enter_async_context(Relay(region.relay_config))
        agent = await stack.enter_async_context(region.agent("gw-1"))
        await wait_until(agent.link.connected.is_set)
        region.hub_broker.kill()  # nothing drains the outbox
        blob = "x" * 2000
        for i in range(700):  # ~1.5 MB of metrics against a 1 MiB quota
            await agent.record_event("metrics", "metric", {"i": i, "pad": blob})
        await wait_until(lambda: relay.counters.refused_metrics > 0, within=60)
        # State still goes through at the quota, is stored and acknowledged,
        # while the refused metrics stay with the agent.
        stored = relay.counters.stored
        await produce(agent, 0, 3)

        async def deltas_acked() -> bool:
            return await agent.journal.pending_deltas() == []

        await wait_until_async(deltas_acked, within=30)
        assert relay.counters.stored > stored
        assert relay.counters.refused_metrics > 0
        assert await agent.journal.event_count("metrics") > 0
        assert relay.stats()["refused_metrics"] == relay.counters.refused_metrics
        # When the hub comes back, everything arrives.
        region.hub_broker.start()
        await stack.enter_async_context(running(hub.run()))
        last = agent.replica.stream("metrics").next_seq - 1
        await wait_until(functools.partial(has_events, hub, "gw-1", last, "metrics"), within=120)
        assert hub.unique_events("gw-1", "metrics") == list(range(1, last + 1))
