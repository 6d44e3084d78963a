"""The invariant checker holds on correct runs and fails on planted bugs."""

from __future__ import annotations

from typing import Any

from simulator.invariants import (
    AppliedEntry,
    DotKey,
    EventKey,
    HealMark,
    Observations,
    ReplicaDigest,
    RunningCopy,
    StateSample,
    check_invariants,
    scope_digest,
)
from sync.crdt import LwwMap
from sync.envelope import decode_envelope
from sync.hlc import HybridLogicalClock
from sync.keys import KeyRing, Signer
from sync.protocol import EVENTS, Replica, SyncSession
from sync.signed import signed_write
from sync.testing import LossyNetwork, ManualClock

HUB = Signer.generate("hub")
RELAY = Signer.generate("relay")
AGENT = Signer.generate("agent")


def ring(*signers: Signer) -> KeyRing:
    r = KeyRing()
    for s in signers:
        r.add(s.public_key_bytes, s.key_id)
    return r


def sample(t: float, **states: dict[str, str]) -> StateSample:
    """``sample(t, scope={replica: digest})``."""
    return StateSample(
        t,
        tuple(
            ReplicaDigest(replica, scope.replace("_", "/"), digest)
            for scope, per in states.items()
            for replica, digest in per.items()
        ),
    )


def test_empty_observations_hold() -> None:
    report = check_invariants(Observations())
    assert report.ok and report.failed() == []
    assert "convergence: ok (0 checked)" in report.summary()


def test_convergence_lag_per_fault() -> None:
    obs = Observations(
        samples=[
            sample(10, device_a={"a": "1", "hub": "0"}, device_b={"b": "1", "hub": "1"}),
            sample(20, device_a={"a": "1", "hub": "1"}, device_b={"b": "2", "hub": "1"}),
            sample(25, device_a={"a": "1", "hub": "1"}, device_b={"b": "2", "hub": "2"}),
        ],
        heals=[HealMark(0, 10.0, "heal"), HealMark(1, 21.0, "link_up")],
    )
    report = check_invariants(obs)
    assert report.ok, report.violations
    # Fault 0: device/b agrees at 10, device/a at 20: the lag is the last scope's.
    # (device/b splitting again at 20 is a new write on its way, not the fault.)
    assert [(x.fault, x.lag_s) for x in report.lags] == [(0, 10.0), (1, 4.0)]


def test_convergence_failures() -> None:
    never = Observations(
        samples=[
            sample(5, device_a={"a": "1", "hub": "0"}),
            sample(9, device_a={"a": "1", "hub": "0"}),
        ],
        heals=[HealMark(3, 4.0)],
    )
    report = check_invariants(never)
    assert report.failed() == ["convergence"]
    assert report.lags[0].lag_s is None
    assert any("never converged: device/a" in str(v) for v in report.violations)
    assert any("split at the end" in str(v) for v in report.violations)

    slow = Observations(
        samples=[
            sample(5, device_a={"a": "1", "hub": "0"}),
            sample(50, device_a={"a": "1", "hub": "1"}),
        ],
        heals=[HealMark(0, 4.0)],
        converge_deadline_s=30,
    )
    report = check_invariants(slow)
    assert report.counts["convergence"] == 1
    assert "over 30 s" in str(report.violations[0])


def test_scope_digest_ignores_order_and_sees_values() -> None:
    a, b = LwwMap(), LwwMap()
    a.set("x", {"p": 1, "q": [1, 2]}, ts=5, origin="o")
    a.set("y", 2, ts=6, origin="o")
    b.set("y", 2, ts=6, origin="o")
    b.set("x", {"q": [1, 2], "p": 1}, ts=5, origin="o")
    assert scope_digest(a) == scope_digest(b)
    b.set("y", 3, ts=7, origin="o")
    assert scope_digest(a) != scope_digest(b)


def test_events_lost_and_duplicated() -> None:
    acked = [EventKey("d1", "events", s) for s in (1, 2, 3)]
    good = Observations(acked_events=acked, hub_events=[*acked, EventKey("d1", "events", 4)])
    assert check_invariants(good).ok
    lost = Observations(acked_events=acked, hub_events=acked[:2])
    report = check_invariants(lost)
    assert report.failed() == ["events"]
    assert str(report.violations[0]) == "events: d1/events#3: acknowledged but lost"
    dup = Observations(acked_events=acked, hub_events=[*acked, acked[1]])
    assert "stored 2 times" in str(check_invariants(dup).violations[0])


def _events_over_duplicating_network(dedupe: bool) -> Observations:
    """An agent uploads 300 events to a hub over a network that duplicates and loses.

    With ``dedupe`` the hub stores what its session accepted (the protocol's
    per-stream cursor); without, it stores every event of every EVENTS message
    it receives, as a hub with dedupe disabled would.
    """
    clock = ManualClock()
    net = LossyNetwork(11, loss=0.1, duplicate=0.3)
    agent = Replica("agent", HybridLogicalClock(clock))
    hub = Replica("hub", HybridLogicalClock(clock))
    a = SyncSession(
        agent,
        "hub",
        AGENT,
        ring(HUB),
        clock,
        scopes=[],
        streams=["events"],
        session_id="a",
        max_batch=10,
    )
    h = SyncSession(hub, "agent", HUB, ring(AGENT), clock, scopes=[], session_id="h")
    for i in range(300):
        agent.stream("events").append({"n": i})
    net.send_all("agent", "hub", a.start())
    net.send_all("hub", "agent", h.start())
    naive: list[EventKey] = []
    for _ in range(20_000):
        msg = net.pop()
        if msg is None:
            if len(agent.streams["events"]) == 0 and a.unacked == 0:
                break
            clock.advance(700)
            net.send_all("agent", "hub", a.tick())
            net.send_all("hub", "agent", h.tick())
            continue
        src, _dst, data = msg
        if src == "agent":
            env = decode_envelope(data, ring(AGENT))
            if env.type == EVENTS:
                body: Any = env.decode_body()
                naive += [
                    EventKey("agent", "events", body["from"] + i) for i in range(len(body["items"]))
                ]
            net.send_all("hub", "agent", h.receive(data))
        else:
            net.send_all("agent", "hub", a.receive(data))
    acked_upto = agent.streams["events"].first_seq
    assert acked_upto == 301, "the upload did not finish"
    acked = [EventKey("agent", "events", s) for s in range(1, acked_upto)]
    inbox = hub.inbox[("agent", "events")]
    stored = [EventKey("agent", "events", i + 1) for i in range(len(inbox.items))]
    return Observations(acked_events=acked, hub_events=stored if dedupe else naive)


def test_planted_bug_hub_without_dedupe_fails_the_checker() -> None:
    assert check_invariants(_events_over_duplicating_network(dedupe=True)).ok
    report = check_invariants(_events_over_duplicating_network(dedupe=False))
    assert report.failed() == ["events"]
    assert report.counts["events"] > 0
    assert all("stored" in v.detail for v in report.violations)


def test_deltas_covered_by_hub_vector() -> None:
    clock = ManualClock()
    device = Replica("d1", HybridLogicalClock(clock))
    hub = Replica("hub", HybridLogicalClock(clock))
    acked: list[DotKey] = []
    for i in range(5):
        delta = device.set("device/d1", f"k{i}", i)
        for _, (_ts, origin, counter, _del, _v) in delta.entries():
            acked.append(DotKey("device/d1", origin, counter))
        if i < 4:
            hub.scope("device/d1").apply_entries(delta.entries_wire(), None)
    obs = Observations(
        acked_dots=acked[:4], hub_vectors={"device/d1": hub.scope("device/d1").context}
    )
    assert check_invariants(obs).ok
    obs.acked_dots = acked
    report = check_invariants(obs)
    assert report.failed() == ["deltas"]
    assert "(d1, 5)" in report.violations[0].subject
    assert check_invariants(Observations(acked_dots=acked[:1])).failed() == ["deltas"]


def test_single_copy_per_replica_slot() -> None:
    running = [
        RunningCopy("web", 0, "d1"),
        RunningCopy("web", 1, "d2"),
        RunningCopy("agent", 0, "d1"),
        RunningCopy("agent", 0, "d2"),
    ]
    obs = Observations(running=running, replicas={"web": 2})
    assert check_invariants(obs).ok  # "agent" is an "each" deployment: not checked
    obs.running.append(RunningCopy("web", 1, "d3"))
    report = check_invariants(obs)
    assert report.failed() == ["single_copy"]
    assert str(report.violations[0]) == "single_copy: web[1]: running on 2: d2, d3"
    obs.running = [RunningCopy("web", 2, "d9")]
    assert "beyond" in check_invariants(obs).violations[0].detail


def test_desired_applied_only_with_hub_signature() -> None:
    clock = ManualClock()
    hub = Replica("hub", HybridLogicalClock(clock))
    relay = Replica("relay", HybridLogicalClock(clock))
    scope = "desired/d1"
    signed_write(hub, scope, "web", {"image": "x"}, HUB)
    good = [AppliedEntry("d1", scope, tuple(e)) for e in hub.scope(scope).entries_wire()]
    obs = Observations(applied_desired=good, hub_keys=ring(HUB))
    report = check_invariants(obs)
    assert report.ok and report.checked["signed_desired"] == 1
    # A relay signs with its own key; an unsigned write; a tampered value.
    signed_write(relay, scope, "evil", {"image": "y"}, RELAY)
    forged = [AppliedEntry("d1", scope, tuple(e)) for e in relay.scope(scope).entries_wire()]
    plain = LwwMap()
    plain.set("web", {"image": "z"}, ts=1, origin="hub")
    unsigned = [AppliedEntry("d1", scope, tuple(e)) for e in plain.entries_wire()]
    entry = list(good[0].entry)
    entry[5] = {**entry[5], "v": {"image": "tampered"}}
    tampered = [AppliedEntry("d1", scope, tuple(entry))]
    obs.applied_desired = good + forged + unsigned + tampered
    report = check_invariants(obs)
    assert report.failed() == ["signed_desired"]
    assert report.counts["signed_desired"] == 3
    assert check_invariants(Observations(applied_desired=good)).failed() == ["signed_desired"]
