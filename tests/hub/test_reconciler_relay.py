"""The reconciler with a real relay and real agents (real Mosquitto brokers, the
shipped relay configuration, a real SQLite store)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from cloud_hub._reconciler_core import scope_from_bytes
from cloud_hub._sqlite_store import SQLiteStore
from edge_agent.agent import Agent
from regional_relay.relay import Relay
from sync.models import WorkloadSpec
from tests.helpers import wait_until, wait_until_async
from tests.relay.relay_harness import SLEEPER, Region, hub_store, phase, reconciler

pytestmark = pytest.mark.integration

SPEC = WorkloadSpec(name="web", driver="process", command=SLEEPER).model_dump(mode="json")


class Observer:
    """A FleetObserver that records what it is told."""

    def __init__(self) -> None:
        self.reported: dict[str, dict[str, Any]] = {}
        self.presence: list[tuple[str, str]] = []

    async def device_reported(self, device_id: str, changes: Mapping[str, Any]) -> None:
        self.reported.setdefault(device_id, {}).update(changes)

    async def presence_changed(self, device_id: str, state: str, now_ms: int) -> None:
        self.presence.append((device_id, state))


async def produce(agent: Agent, n: int) -> int:
    for i in range(n):
        await agent.record_event("events", "test", {"i": i})
        if i % 4 == 0:
            await agent.write_state(f"reported/sensor-{i % 3}", {"reading": i})
    return agent.replica.stream("events").next_seq - 1


async def stored_seqs(store: SQLiteStore, device: str) -> list[int]:
    return [e.seq for e in await store.list_events(device, stream="events", limit=1000)]


async def test_desired_reaches_a_relay_offline_at_write_time_and_data_lands_once(
    tmp_path: Path,
) -> None:
    region = Region(tmp_path, ["gw-1"])
    observer = Observer()
    async with hub_store(region, ["gw-1"]) as store:
        async with reconciler(region, store, observer) as rec:
            await wait_until(rec.connected.is_set)
            # No relay yet: the write is stored, and reaches the relay later.
            await rec.set_desired("gw-1", "web", SPEC)
            async with Relay(region.relay_config) as relay, region.agent("gw-1") as agent:
                await wait_until(lambda: phase(agent, "web") == "running", within=30)
                last = await produce(agent, 12)

                async def landed() -> bool:
                    return await stored_seqs(store, "gw-1") == list(range(1, last + 1))

                await wait_until_async(landed, within=30)
                await wait_until(lambda: "reported/sensor-0" in observer.reported.get("gw-1", {}))
                await wait_until(lambda: ("gw-1", "online") in observer.presence, within=10)
                stats = rec.stats()
                assert stats["acks_sent"] >= 1
                assert stats["commit_batches"] >= 1
                assert stats["relays_online"] == {"relay-1": True}
                assert stats["rejected"] == {}
                # The hub is down for a while; the relay keeps what comes in.
                await rec.aclose()
                last = await produce(agent, 10)
                await wait_until(lambda: relay.outbox.stats().depth > 0)
                async with reconciler(region, store) as again:
                    await wait_until_async(landed, within=30)
                    await wait_until(lambda: relay.outbox.stats().depth == 0, within=30)
                    assert again.stats()["rejected"] == {}
        state = await store.get_scope("device/gw-1")
        assert state is not None
        keys = scope_from_bytes(state).keys()
        assert {"reported/sensor-0", "reported/sensor-1", "reported/sensor-2"} <= set(keys)
