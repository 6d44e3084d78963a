"""The hub's ingest of relay batches: signatures, dedupe, event order, presence."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub.health import HealthTracker
from cloud_hub.ingest import (
    BatchIngestor,
    BatchRefusedError,
    IngestError,
    IngestResult,
    device_scope,
    presence_from_wire,
)
from regional_relay.presence import PresenceTracker
from sync.dots import Dot, VersionVector
from sync.envelope import decode_envelope, encode_envelope, packb
from sync.hlc import HybridLogicalClock, pack_ts
from sync.keys import Signer
from sync.protocol import ACK, DELTAS, EVENTS, SNAPSHOT
from sync.relaying import decode_batch_ack
from sync.replica import Replica
from sync.testing import ManualClock
from tests.hub.relay_batches import REGION, RELAY, relay_batch, ring

DEVICES = ("gw-1", "gw-2")
NOW = 1_700_000_000_000


def ts(i: int) -> int:
    return pack_ts(NOW - 60_000 + i, 0)


@dataclass
class World:
    """A relay, two enrolled devices and a hub-side ingestor."""

    relay: Signer = field(default_factory=Signer.generate)
    hub: Signer = field(default_factory=Signer.generate)
    devices: dict[str, Signer] = field(
        default_factory=lambda: {d: Signer.generate() for d in DEVICES}
    )
    health: HealthTracker = field(default_factory=HealthTracker)
    ingestor: BatchIngestor = field(init=False)
    _batch_seq: int = 0

    def __post_init__(self) -> None:
        self.ingestor = self.new_ingestor()

    def new_ingestor(self, **kwargs: Any) -> BatchIngestor:
        return BatchIngestor(
            Replica("hub", HybridLogicalClock(ManualClock(NOW))),
            relays={RELAY: (REGION, ring(self.relay))},
            device_keys={d: ring(s) for d, s in self.devices.items()},
            health=self.health,
            **kwargs,
        )

    def envelope(self, device: str, type_: str, body: dict[str, Any], **kw: Any) -> bytes:
        signer = kw.get("signer", self.devices.get(device) or Signer.generate())
        return encode_envelope(type_, kw.get("src", device), 1, 1, packb(body), signer)

    def events(self, device: str, start: int, n: int, **kw: Any) -> bytes:
        stream = kw.pop("stream", "events")
        items = [{"seq": s} for s in range(start, start + n)]
        body = {"s": "sess", "st": stream, "from": start, "first": kw.pop("first", 1)}
        return self.envelope(device, EVENTS, {**body, "items": items}, **kw)

    def deltas(self, device: str, entries: list[list[Any]], **kw: Any) -> bytes:
        scope = kw.pop("scope", device_scope(device))
        return self.envelope(
            device, DELTAS, {"s": "sess", "sc": scope, "d": entries, "c": None}, **kw
        )

    def batch(
        self, items: list[tuple[int, str, str, bytes]], signer: Signer | None = None
    ) -> bytes:
        self._batch_seq += 1
        return relay_batch(signer or self.relay, self._batch_seq, items)

    def ingest(self, data: bytes) -> IngestResult:
        return self.ingestor.ingest(data, NOW)


def entry(device: str, key: str, counter: int, value: Any = None) -> list[Any]:
    return [key, ts(counter), device, counter, False, value if value is not None else counter]


def seqs(results: list[IngestResult], device: str, stream: str = "events") -> list[int]:
    out: list[int] = []
    for r in results:
        run = r.events.get((device, stream))
        if run is not None:
            assert [item["seq"] for item in run.items] == list(range(run.start, run.end))
            out += list(range(run.start, run.end))
    return out


def test_events_in_order_are_accepted_acked_and_reported() -> None:
    w = World()
    r1 = w.ingest(w.batch([(1, "gw-1", "event", w.events("gw-1", 1, 3))]))
    r2 = w.ingest(
        w.batch(
            [
                (2, "gw-1", "event", w.events("gw-1", 4, 2)),
                (3, "gw-1", "event", w.events("gw-1", 6, 1)),
                (4, "gw-2", "metric", w.events("gw-2", 1, 2, stream="metrics")),
            ]
        )
    )
    assert (r1.relay, r1.region, r1.epoch) == (RELAY, REGION, 1)
    assert r1.acked == [1] and r2.acked == [2, 3, 4]
    assert seqs([r1, r2], "gw-1") == [1, 2, 3, 4, 5, 6]
    assert r2.events[("gw-1", "events")].start == 4  # one run per stream per batch
    assert seqs([r2], "gw-2", "metrics") == [1, 2]
    assert w.ingestor.cursors() == {("gw-1", "events"): 7, ("gw-2", "metrics"): 3}
    assert not r1.rejected and not r2.rejected


def test_a_duplicate_batch_changes_nothing_and_is_acked() -> None:
    w = World()
    data = w.batch(
        [
            (1, "gw-1", "delta", w.deltas("gw-1", [entry("gw-1", "reported/a", 1)])),
            (2, "gw-1", "event", w.events("gw-1", 1, 3)),
        ]
    )
    first = w.ingest(data)
    assert first.changed == {"device/gw-1": {"reported/a"}}
    assert first.merged_dots == {"device/gw-1": VersionVector({"gw-1": 1})}
    again = w.ingest(data)
    assert again.acked == [1, 2]
    assert not again.events and not again.changed and not again.merged_dots
    assert w.ingestor.stats.duplicates == 1
    # Overlapping events: only the new tail is reported.
    tail = w.ingest(w.batch([(3, "gw-1", "event", w.events("gw-1", 2, 4))]))
    assert seqs([tail], "gw-1") == [4, 5]
    assert w.ingestor.replica.scope("device/gw-1").to_dict() == {"reported/a": 1}


def test_a_gap_is_held_back_then_filled_by_the_resend() -> None:
    w = World()
    early = w.batch([(1, "gw-1", "event", w.events("gw-1", 1, 3))])
    late = w.batch(
        [
            (2, "gw-1", "event", w.events("gw-1", 4, 3, first=4)),
            (3, "gw-2", "event", w.events("gw-2", 1, 1)),
        ]
    )
    held = w.ingest(late)
    assert held.held == [2] and held.acked == [3]
    assert ("gw-1", "events") not in held.events
    # The device released 1..3 (first=4), but the hub never skips ahead: it
    # waits for the batch the relay still holds.
    assert w.ingestor.next_seq("gw-1", "events") == 1
    filled = w.ingest(early)
    resent = w.ingest(late)
    assert resent.acked == [2, 3] and not resent.held
    assert seqs([filled, resent], "gw-1") == [1, 2, 3, 4, 5, 6]
    assert seqs([held, resent], "gw-2") == [1]
    assert w.ingestor.stats.held == 1


def test_a_gap_inside_one_batch_is_held_and_the_earlier_item_accepted() -> None:
    w = World()
    r = w.ingest(
        w.batch(
            [
                (7, "gw-1", "event", w.events("gw-1", 3, 1)),
                (5, "gw-1", "event", w.events("gw-1", 1, 2)),
            ]
        )
    )
    assert r.held == [7] and r.acked == [5]
    assert seqs([r], "gw-1") == [1, 2]


def test_a_forged_relay_batch_is_refused_whole() -> None:
    w = World()
    items = [(1, "gw-1", "delta", w.deltas("gw-1", [entry("gw-1", "k", 1)]))]
    impostor = Signer.generate(key_id=w.relay.key_id)  # the relay's kid, another key
    with pytest.raises(BatchRefusedError) as info:
        w.ingest(w.batch(items, signer=impostor))
    assert (info.value.reason, info.value.relay) == ("bad_relay_signature", RELAY)
    with pytest.raises(BatchRefusedError) as info:
        w.ingest(w.batch(items, signer=Signer.generate()))  # unknown kid
    assert info.value.reason == "bad_relay_signature"
    with pytest.raises(BatchRefusedError) as info:
        w.ingest(b"\x93garbage")
    assert info.value.reason == "malformed_batch"
    w.ingestor.remove_relay(RELAY)
    with pytest.raises(BatchRefusedError) as info:
        w.ingest(w.batch(items))
    assert info.value.reason == "unknown_relay"
    assert "device/gw-1" not in w.ingestor.replica.scopes
    assert w.ingestor.stats.refused == Counter(
        bad_relay_signature=2, malformed_batch=1, unknown_relay=1
    )
    assert w.ingestor.stats.batches == 0


def test_a_forged_device_envelope_is_dropped_counted_and_acked() -> None:
    w = World()
    forged = w.deltas("gw-1", [entry("gw-1", "k", 1, "evil")], signer=w.devices["gw-2"])
    r = w.ingest(
        w.batch(
            [
                (1, "gw-1", "delta", forged),
                (2, "gw-1", "event", w.events("gw-1", 1, 1, signer=Signer.generate())),
                (3, "gw-2", "delta", w.deltas("gw-2", [entry("gw-2", "k", 1)])),
            ]
        )
    )
    assert r.acked == [1, 2, 3]
    assert r.rejected == Counter(bad_device_signature=2)
    assert w.ingestor.stats.rejected == Counter(bad_device_signature=2)
    assert "device/gw-1" not in w.ingestor.replica.scopes
    assert not r.events
    assert r.changed == {"device/gw-2": {"k"}}


def _bad_items(w: World) -> dict[str, tuple[str, str, bytes]]:
    stranger = Signer.generate()
    return {
        "foreign_origin": ("gw-1", "delta", w.deltas("gw-1", [entry("gw-2", "k", 1)])),
        "foreign_scope": (
            "gw-1",
            "delta",
            w.deltas("gw-1", [entry("gw-1", "k", 1)], scope="device/gw-2"),
        ),
        "unknown_device": ("gw-9", "delta", w.deltas("gw-9", [], signer=stranger)),
        "src_mismatch": ("gw-1", "delta", w.deltas("gw-2", [entry("gw-2", "k", 1)])),
        "wrong_kind": ("gw-1", "event", w.deltas("gw-1", [entry("gw-1", "k", 1)])),
        "malformed": ("gw-1", "delta", w.envelope("gw-1", DELTAS, {"sc": "device/gw-1"})),
        "malformed_presence": (RELAY, "presence", packb({"presence": {"v": 1}})),
        "malformed_aggregate": ("gw-1", "agg", packb({"device": "gw-1"})),
    }


@pytest.mark.parametrize(
    "reason",
    [
        "foreign_origin",
        "foreign_scope",
        "unknown_device",
        "src_mismatch",
        "wrong_kind",
        "malformed",
        "malformed_presence",
        "malformed_aggregate",
    ],
)
def test_bad_items_are_dropped_by_reason_and_acked(reason: str) -> None:
    w = World()
    device, kind, payload = _bad_items(w)[reason]
    good = w.deltas("gw-2", [entry("gw-2", "ok", 1)])
    r = w.ingest(w.batch([(1, device, kind, payload), (2, "gw-2", "delta", good)]))
    assert r.rejected == Counter({reason: 1})
    assert r.acked == [1, 2]
    assert set(w.ingestor.replica.scopes) == {"device/gw-2"}
    assert not r.presence and not r.aggregates


def test_context_only_dots_are_reported_as_ranges() -> None:
    w = World()
    body = {"s": "x", "sc": "device/gw-1", "d": [entry("gw-1", "k", 3)], "c": {"gw-1": 10**15}}
    r = w.ingest(w.batch([(1, "gw-1", "delta", w.envelope("gw-1", DELTAS, body))]))
    assert r.merged_dots == {"device/gw-1": VersionVector({"gw-1": 10**15})}
    assert w.ingestor.stats.dots == 10**15


def test_a_foreign_context_dot_is_refused_too() -> None:
    w = World()
    body = {"s": "x", "sc": "device/gw-1", "d": [entry("gw-1", "k", 1)], "c": {"gw-2": 5}}
    r = w.ingest(w.batch([(1, "gw-1", "delta", w.envelope("gw-1", DELTAS, body))]))
    assert r.rejected == Counter(foreign_origin=1)


def test_other_envelope_types_are_refused() -> None:
    w = World()
    ack = w.envelope("gw-1", ACK, {"s": "x", "ps": None, "a": [], "vv": {}, "ev": {}})
    r = w.ingest(w.batch([(1, "gw-1", "delta", ack)]))
    assert r.rejected == Counter(wrong_kind=1) and r.acked == [1]


def test_a_snapshot_chunk_is_merged_and_deduped() -> None:
    w = World()
    state = {"e": [entry("gw-1", "a", 1), entry("gw-1", "b", 2)], "c": {"gw-1": 2}, "h": {}}
    snap = w.envelope("gw-1", SNAPSHOT, {"s": "x", "sc": "device/gw-1", "st": state})
    r = w.ingest(w.batch([(1, "gw-1", "delta", snap)]))
    assert r.changed == {"device/gw-1": {"a", "b"}}
    assert r.merged_dots == {"device/gw-1": VersionVector({"gw-1": 2})}
    # A chunk whose context covers a superseded write drops it (causal join).
    state2 = {"e": [entry("gw-1", "a", 3)], "c": {"gw-1": 3}, "h": {}}
    snap2 = w.envelope("gw-1", SNAPSHOT, {"s": "x", "sc": "device/gw-1", "st": state2})
    r2 = w.ingest(w.batch([(2, "gw-1", "delta", snap2), (3, "gw-1", "delta", snap2)]))
    assert r2.changed == {"device/gw-1": {"a", "b"}}
    assert list(r2.merged_dots["device/gw-1"]) == [Dot("gw-1", 3)]
    assert w.ingestor.replica.scope("device/gw-1").to_dict() == {"a": 3}


def test_presence_is_decoded_into_the_health_tracker() -> None:
    w = World()
    w.health.relay_state(REGION, True, 1, NOW - 10_000)  # the relay's retained birth
    tracker = PresenceTracker(epoch=4)
    tracker.hub_reachable = True
    tracker.observe_state("gw-1", packb({"online": True, "bd": 2}), NOW - 5_000)
    tracker.observe_state("gw-2", packb({"online": False, "bd": 1}), NOW - 5_000)
    report = tracker.changes_since(0, NOW - 1_000)
    payload = packb({"presence": report.to_wire(), "counters": {"stored": 3}})
    r = w.ingest(w.batch([(1, RELAY, "presence", payload)]))
    assert r.acked == [1]
    [item] = r.presence
    assert (item.relay, item.region, item.counters) == (RELAY, REGION, {"stored": 3})
    assert item.report == report
    assert w.health.device("gw-1", NOW) is not None
    states = {h.device: h.state for h in w.health.devices(NOW)}
    assert states == {"gw-1": "online", "gw-2": "offline"}
    region = w.health.region(REGION, NOW)
    assert region is not None and region.last_heard_ms == NOW


def test_aggregates_are_decoded() -> None:
    w = World()
    agg = {
        "device": "gw-1",
        "start_ms": 60_000,
        "interval_ms": 60_000,
        "figures": {"c": [1, 2, 1.5, 2]},
    }
    r = w.ingest(w.batch([(1, "gw-1", "agg", packb(agg))]))
    [got] = r.aggregates
    assert got.to_wire() == {**agg, "figures": {"c": [1.0, 2.0, 1.5, 2]}}
    r2 = w.ingest(w.batch([(2, "gw-2", "agg", packb(agg))]))  # about another device
    assert r2.rejected == Counter(malformed_aggregate=1)


def test_presence_from_wire_round_trips_and_is_strict() -> None:
    report = PresenceTracker(epoch=1).changes_since(0, NOW)
    assert presence_from_wire(report.to_wire()) == report
    good = {
        "v": 1,
        "epoch": 1,
        "at": NOW,
        "hub_reachable": False,
        "since": 0,
        "cursor": 2,
        "more": False,
        "online": 1,
        "offline": 0,
        "devices": {"gw-1": [1, -1, NOW, NOW]},
    }
    assert presence_from_wire(good).devices["gw-1"].bd == -1
    bad: list[dict[str, Any]] = [
        {**good, "v": 2},
        {**good, "v": True},
        {**good, "extra": 1},
        {**good, "epoch": -1},
        {**good, "more": 0},
        {**good, "online": True},
        {**good, "devices": {"gw/1": [1, 1, 0, 0]}},
        {**good, "devices": {"gw-1": [2, 1, 0, 0]}},
        {**good, "devices": {"gw-1": [1, -2, 0, 0]}},
        {**good, "devices": {"gw-1": [1, 1, 0]}},
        {**good, "devices": [1]},
    ]
    for obj in bad:
        with pytest.raises(IngestError) as info:
            presence_from_wire(obj)
        assert info.value.reason == "malformed"
    with pytest.raises(IngestError):
        presence_from_wire([good])


def test_ack_names_the_acked_ids_for_the_relay() -> None:
    w = World()
    r = w.ingest(
        w.batch(
            [
                (10, "gw-1", "event", w.events("gw-1", 1, 1)),
                (11, "gw-1", "event", w.events("gw-1", 5, 1)),  # held
                (12, "gw-9", "event", b"junk"),  # rejected, acked
            ]
        )
    )
    data = w.ingestor.ack(r, w.hub, seq=3, ts=9)
    env = decode_envelope(data, ring(w.hub))
    assert (env.src, env.seq, env.ts) == ("hub", 3, 9)
    assert decode_batch_ack(env) == (RELAY, [10, 12])


def test_cursors_survive_a_restart_of_the_ingestor() -> None:
    w = World()
    w.ingest(w.batch([(1, "gw-1", "event", w.events("gw-1", 1, 4))]))
    saved = w.ingestor.cursors()
    fresh = w.new_ingestor(cursors=saved)
    again = fresh.ingest(w.batch([(1, "gw-1", "event", w.events("gw-1", 1, 4))]), NOW)
    assert not again.events and again.acked == [1]
    for bad in ({("gw-1",): 2}, {("gw-1", "events"): 0}, {("gw-1", "events"): "2"}):
        with pytest.raises(ValueError, match="invalid cursor"):
            fresh.restore_cursors(bad)  # type: ignore[arg-type]
    fresh.restore_cursors({("gw-1", "events"): 2})  # never moves back
    assert fresh.next_seq("gw-1", "events") == 5


def test_device_keys_are_updatable() -> None:
    w = World()
    rotated = Signer.generate()
    payload = w.deltas("gw-1", [entry("gw-1", "k", 1)], signer=rotated)
    r = w.ingest(w.batch([(1, "gw-1", "delta", payload)]))
    assert r.rejected == Counter(bad_device_signature=1)
    w.ingestor.set_device_keys("gw-1", ring(w.devices["gw-1"], rotated))
    r = w.ingest(w.batch([(2, "gw-1", "delta", payload)]))
    assert r.changed == {"device/gw-1": {"k"}}
    w.ingestor.remove_device("gw-1")
    r = w.ingest(w.batch([(3, "gw-1", "delta", payload)]))
    assert r.rejected == Counter(unknown_device=1)


# -- property: any delivery order, duplicates, drops and resends ---------------------------


@st.composite
def outboxes(draw: st.DrawFn) -> tuple[World, list[tuple[int, str, str, bytes]], dict[str, int]]:
    """A relay outbox: per device, events in overlapping-or-contiguous envelopes
    and delta envelopes, interleaved in id order as a relay stores them."""
    w = World()
    per_device: list[list[tuple[str, str, bytes]]] = []
    totals: dict[str, int] = {}
    for device in DEVICES:
        n = draw(st.integers(0, 12))
        totals[device] = n
        envs: list[tuple[str, str, bytes]] = []
        seq = 1
        while seq <= n:
            size = draw(st.integers(1, 4))
            # Start at or before the next seq (a resend after a relay restart
            # overlaps); never after it: the relay forwards streams in order.
            back = draw(st.integers(0, min(2, seq - 1)))
            end = min(n + 1, seq + size)
            # ``first``: the device may have released what its relay stored.
            first = draw(st.integers(1, seq - back))
            payload = w.events(device, seq - back, end - seq + back, first=first)
            envs.append((device, "event", payload))
            seq = end
        writes = totals[f"writes:{device}"] = draw(st.integers(0, 6))
        counter = 1
        while counter <= writes:
            k = draw(st.integers(1, 3))
            entries = [
                entry(device, f"reported/{c % 3}", c)
                for c in range(counter, min(writes, counter + k - 1) + 1)
            ]
            envs.append((device, "delta", w.deltas(device, entries)))
            counter += len(entries)
        per_device.append(envs)
    # Interleave the devices' lists, each kept in its own order.
    merged: list[tuple[str, str, bytes]] = []
    queues = [list(e) for e in per_device]
    while any(queues):
        live = [q for q in queues if q]
        merged.append(draw(st.sampled_from(live)).pop(0))
    items = [(i + 1, d, k, p) for i, (d, k, p) in enumerate(merged)]
    return w, items, totals


@settings(max_examples=200, deadline=None)
@given(outbox=outboxes(), data=st.data())
def test_any_delivery_ingests_each_event_and_dot_exactly_once(
    outbox: tuple[World, list[tuple[int, str, str, bytes]], dict[str, int]], data: st.DataObject
) -> None:
    w, items, totals = outbox
    size = data.draw(st.integers(1, 5), label="batch size")
    batches = [w.batch(items[i : i + size]) for i in range(0, len(items), size)]
    # The network: batches delivered in any order, any number of times, some
    # never; an ack may be lost on the way back.
    deliveries = data.draw(
        st.lists(
            st.tuples(st.integers(0, max(0, len(batches) - 1)), st.booleans()),
            max_size=3 * len(batches) + 1,
        ),
        label="deliveries",
    )
    pending = {i for i, *_ in items}
    results: list[IngestResult] = []
    for index, ack_lost in deliveries:
        if not batches:
            break
        r = w.ingest(batches[index])
        results.append(r)
        if not ack_lost:
            pending -= set(r.acked)
    # The relay resends what is still unacknowledged, in outbox order, as new
    # batches (after a reconnect) until everything is acknowledged.
    for _ in range(len(items) + 1):
        if not pending:
            break
        rest = [i for i in items if i[0] in pending]
        r = w.ingest(w.batch(rest))
        results.append(r)
        pending -= set(r.acked)
    assert not pending
    for device in DEVICES:
        assert seqs(results, device) == list(range(1, totals[device] + 1))
    merged = [dot for r in results for vv in r.merged_dots.values() for dot in vv]
    assert len(merged) == len(set(merged))  # each dot merged once
    replica = w.ingestor.replica
    for device in DEVICES:
        scope = device_scope(device)
        counters = sorted(c for origin, c in merged if origin == device)
        writes = totals[f"writes:{device}"]
        assert counters == list(range(1, writes + 1))
        expected = {f"reported/{c % 3}": c for c in range(1, writes + 1)}
        assert (replica.scope(scope).to_dict() if writes else {}) == expected
    assert all(not r.rejected for r in results)
