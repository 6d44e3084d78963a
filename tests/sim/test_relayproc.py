"""Relays as their own processes (``novacron sim run``): reading a relay's outbox
file, and a relay process started, killed and started again by the FleetStack."""

from __future__ import annotations

from pathlib import Path

import pytest

from regional_relay.outbox import ItemIn, Outbox
from simulator.composition import FleetStack
from simulator.invariants import scope_digest
from simulator.relayproc import read_relay_view
from sync.crdt import LwwMap
from tests.fixtures_mqtt import MosquittoBroker
from tests.helpers import wait_until, wait_until_async

pytestmark = pytest.mark.integration

ENTRIES = [
    ["app", 10, "hub", 1, False, {"v": "1"}],
    ["old", 11, "hub", 2, True, None],  # a tombstone: not visible
    ["web", 12, "hub", 3, False, {"v": "2", "n": [1, 2]}],
]


async def test_the_view_is_what_the_relay_stored(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    assert read_relay_view(path, ["desired/gw-1"]) is None  # not created yet
    async with Outbox.open(path, quota_bytes=1 << 24) as box:
        await box.put_state("desired/gw-1", ENTRIES)
        await box.put_state("device/gw-1", [["x", 1, "gw-1", 1, False, 1]])
        await box.append([ItemIn("gw-1", "event", b"e"), ItemIn("gw-2", "delta", b"d")])
        # Read beside the open writer, as the sampler reads a running relay.
        view = read_relay_view(path, ["desired/gw-1", "desired/gw-2"])
    assert view is not None
    expected = LwwMap()
    expected.merge_batch([list(e) for e in ENTRIES])
    assert view.digests["desired/gw-1"] == scope_digest(expected)
    assert view.digests["desired/gw-1"] == scope_digest({"app": {"v": "1"}, "web": ENTRIES[2][5]})
    assert view.digests["desired/gw-2"] == scope_digest({})  # none held: empty
    assert set(view.digests) == {"desired/gw-1", "desired/gw-2"}  # only what was asked
    assert view.outbox_depth == 2


async def test_a_relay_process_is_killed_and_started_again(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    async with FleetStack(tmp_path, mosquitto.url, ["region-00"], relay_processes=True) as stack:
        assert stack.relays == {}  # nothing in this process
        assert stack.relay_running("region-00")

        async def readable() -> bool:
            return await stack.relay_view("region-00", ["desired/gw-1"]) is not None

        await wait_until_async(readable, within=30)
        # Its counters reach the hub in its presence reports.
        await wait_until(lambda: "region-00" in stack.relay_counters(), within=30)
        assert stack.relay_counters()["region-00"]["hub_connected"] is True

        await stack.stop_relay("region-00", kill=True)
        assert not stack.relay_running("region-00")
        assert await stack.relay_view("region-00", ["desired/gw-1"]) is None
        await stack.start_relay("region-00")
        assert stack.relay_running("region-00")
        await wait_until_async(readable, within=30)
        log = (tmp_path / "relays" / "region-00" / "relay.log").read_text()
        assert "Traceback" not in log, log
    assert not stack.relay_running("region-00")  # stopped with the stack
