"""Key distribution: the hub's signed device registry reaches a running relay.

Real brokers (the shipped relay configuration), a real relay, real agents and
the hub's reconciler on a real SQLite store: a device enrolled after the relay
started is served without restarting the relay, a removed one is not, and a
forged registry entry changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from regional_relay.registry import DeviceRegistry, registry_key, registry_scope, registry_value
from regional_relay.relay import Relay
from sync.hlc import HybridLogicalClock, SystemClock
from sync.keys import Signer
from sync.models import WorkloadSpec
from sync.replica import Replica
from sync.signed import signed_write, unwrap
from tests.helpers import wait_until, wait_until_async
from tests.relay.relay_harness import (
    REGION,
    SLEEPER,
    Region,
    device_record,
    hub_store,
    phase,
    reconciler,
)

pytestmark = pytest.mark.integration

SPEC = WorkloadSpec(name="web", driver="process", command=SLEEPER).model_dump(mode="json")


async def test_a_device_enrolled_after_the_relay_started_is_served_without_restart(
    tmp_path: Path,
) -> None:
    # No static devices_file: the relay learns every device from the hub.
    region = Region(tmp_path, ["gw-1", "gw-2"], relay_overrides={"devices_file": None})
    async with (
        hub_store(region, ["gw-1"]) as store,
        reconciler(region, store) as rec,
        Relay(region.relay_config) as relay,
    ):
        await wait_until(lambda: relay.registry.key("gw-1") is not None, within=15)
        async with region.agent("gw-2") as late:
            await wait_until(late.link.connected.is_set)
            await late.record_event("events", "test", {"i": 1})
            await wait_until(lambda: relay.counters.rejected["unknown_device"] > 0)

            # Enrollment: the store has it, the reconciler distributes it.
            device = device_record(region, "gw-2")
            await store.add_devices([device])
            await rec.add_device(device)
            await wait_until(lambda: relay.registry.key("gw-2") is not None, within=15)
            await rec.set_desired("gw-2", "web", SPEC)
            await wait_until(lambda: phase(late, "web") == "running", within=30)

            async def landed() -> bool:
                events = await store.list_events("gw-2", stream="events")
                return [e.seq for e in events] == [1]

            await wait_until_async(landed, within=30)

            # Decommission: the relay stops serving it, without a restart.
            await rec.remove_device("gw-2")
            await wait_until(lambda: relay.registry.key("gw-2") is None, within=15)
            rejected = relay.counters.rejected["unknown_device"]
            await late.record_event("events", "test", {"i": 2})
            await wait_until(lambda: relay.counters.rejected["unknown_device"] > rejected)
        assert relay.registry.key("gw-1") is not None
    # The registry is kept in the relay's outbox: a restarted relay serves
    # gw-1 (and not gw-2) with the hub away.
    async with Relay(region.relay_config) as relay:
        assert relay.registry.key("gw-1") == region.device_keys["gw-1"].public_key_bytes
        assert relay.registry.key("gw-2") is None


def test_registry_entries_override_the_static_seed() -> None:
    k1, k2 = Signer.generate().public_key_bytes, Signer.generate().public_key_bytes
    registry = DeviceRegistry({"gw-1": k1})
    assert registry.keys() == {"gw-1": k1}
    change = registry.apply([(registry_key("gw-2"), registry_value(k2))])
    assert (change.added, change.removed) == ({"gw-2": k2}, set())
    change = registry.apply([(registry_key("gw-1"), registry_value(k2))])  # re-keyed
    assert change.added == {"gw-1": k2}
    change = registry.apply([(registry_key("gw-1"), None)])
    assert change.removed == {"gw-1"}
    assert registry.keys() == {"gw-2": k2}
    assert not registry.apply([(registry_key("gw-1"), None)])  # nothing new
    bad = registry.apply([("other", registry_value(k1)), (registry_key("gw-3"), {"x": 1})])
    assert not bad
    assert registry.malformed == 2


async def test_a_registry_entry_not_signed_by_the_hub_is_refused(tmp_path: Path) -> None:
    region = Region(tmp_path, ["gw-1"], relay_overrides={"devices_file": None})
    async with (
        hub_store(region, ["gw-1"]) as store,
        reconciler(region, store) as rec,
        Relay(region.relay_config) as relay,
    ):
        await wait_until(lambda: relay.registry.key("gw-1") is not None, within=15)
        # Someone with the relay's account on the hub broker but not the hub
        # key: an entry they sign is refused whole by the relay's verifier.
        mallory = Signer.generate()
        fake = Replica("hub", HybridLogicalClock(SystemClock()))
        scope = registry_scope(REGION)
        delta = signed_write(
            fake, scope, registry_key("gw-evil"), registry_value(mallory.public_key_bytes), mallory
        )
        session = rec._sessions[REGION]
        before = relay.verifier.rejected
        await rec._send(REGION, session.send_entries(scope, delta.entries_wire()))
        await wait_until(lambda: relay.verifier.rejected > before)
        assert relay.registry.key("gw-evil") is None
        assert unwrap(relay.replica.scope(scope).get(registry_key("gw-1"))) is not None
