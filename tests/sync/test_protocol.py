"""Sync protocol: convergence over a hostile network, rebirth, gaps, bad input."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import (
    CrdtError,
    DecodeError,
    ProtocolError,
    SignatureError,
    SyncError,
)
from sync.crdt import causally_stable
from sync.envelope import decode_envelope_unverified, encode_envelope, packb
from sync.hlc import HybridLogicalClock, pack_ts
from sync.keys import KeyRing, Signer
from sync.protocol import EventStream, Replica, SyncSession
from sync.testing import LossyNetwork, ManualClock

SCOPE = "device/d1"
SIGNERS = {name: Signer.generate(name) for name in ("agent", "relay", "hub", "agent2")}


def ring_for(*names: str) -> KeyRing:
    ring = KeyRing()
    for n in names:
        ring.add(SIGNERS[n].public_key_bytes, n)
    return ring


class Node:
    def __init__(self, name: str, clock: ManualClock) -> None:
        self.name = name
        self.replica = Replica(name, HybridLogicalClock(clock))
        self.replica.scope(SCOPE)
        self.sessions: dict[str, SyncSession] = {}

    def connect(
        self, peer: str, clock: ManualClock, net: LossyNetwork, *, bd: int = 0, **kw: Any
    ) -> SyncSession:
        def forward(scope: str, entries: list[list[Any]] | None) -> None:
            # A relay passes what it learnt from one peer on to the others.
            for other, s in self.sessions.items():
                if other != peer:
                    if entries is None:
                        net.send_all(
                            self.name,
                            other,
                            s.send_entries(scope, self.replica.scope(scope).entries_wire()),
                        )
                    else:
                        net.send_all(self.name, other, s.send_entries(scope, entries))

        s = SyncSession(
            self.replica,
            peer,
            SIGNERS[self.name],
            ring_for(peer),
            clock,
            scopes=[SCOPE],
            bd_seq=bd,
            session_id=f"{self.name}->{peer}#{bd}",
            on_change=forward,
            **kw,
        )
        self.sessions[peer] = s
        return s

    def write(self, net: LossyNetwork, key: str, value: Any, delete: bool = False) -> None:
        r = self.replica
        delta = r.delete(SCOPE, key) if delete else r.set(SCOPE, key, value)
        for peer, s in self.sessions.items():
            net.send_all(self.name, peer, s.local_update(SCOPE, delta))


def pump(nodes: dict[str, Node], net: LossyNetwork, clock: ManualClock, rounds: int) -> None:
    for _ in range(rounds):
        msg = net.pop()
        if msg is None:
            clock.advance(700)
            for n in nodes.values():
                for peer, s in n.sessions.items():
                    net.send_all(n.name, peer, s.tick())
            continue
        src, dst, data = msg
        net.send_all(dst, src, nodes[dst].sessions[src].receive(data))


def settle(nodes: dict[str, Node], net: LossyNetwork, clock: ManualClock) -> None:
    net.heal()
    net.loss = net.duplicate = 0.0
    for _ in range(400):
        pump(nodes, net, clock, 200)
        quiet = len(net) == 0 and all(
            s.unacked == 0 for n in nodes.values() for s in n.sessions.values()
        )
        if quiet and converged(nodes):
            return
    raise AssertionError("did not settle")


def converged(nodes: dict[str, Node]) -> bool:
    states = [n.replica.scope(SCOPE) for n in nodes.values()]
    return all(
        s.to_dict() == states[0].to_dict() and s.context == states[0].context for s in states
    )


def chain(seed: int, loss: float, dup: float) -> tuple[dict[str, Node], LossyNetwork, ManualClock]:
    clock = ManualClock()
    net = LossyNetwork(seed, loss=loss, duplicate=dup)
    nodes = {n: Node(n, clock) for n in ("agent", "relay", "hub")}
    for a, b in (("agent", "relay"), ("relay", "hub")):
        sa = nodes[a].connect(b, clock, net)
        sb = nodes[b].connect(a, clock, net)
        net.send_all(a, b, sa.start())
        net.send_all(b, a, sb.start())
    return nodes, net, clock


def scenario(seed: int, writes: int, loss: float = 0.2, dup: float = 0.2) -> dict[str, Node]:
    rng = random.Random(seed)
    nodes, net, clock = chain(seed, loss, dup)
    names = list(nodes)
    for i in range(writes):
        node = nodes[rng.choice(names)]
        node.write(net, f"k{rng.randrange(6)}", i, delete=rng.random() < 0.3)
        if rng.random() < 0.1:
            side = rng.choice(names)
            net.partition([side], [n for n in names if n != side])
        if rng.random() < 0.1:
            net.heal()
        pump(nodes, net, clock, rng.randrange(8))
    settle(nodes, net, clock)
    return nodes


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_three_peers_converge_small(seed: int) -> None:
    nodes = scenario(seed, writes=8)
    assert converged(nodes)


@pytest.mark.parametrize("seed", range(20))
def test_three_peers_converge_seed_sweep(seed: int) -> None:
    nodes = scenario(seed, writes=60, loss=0.3, dup=0.3)
    assert converged(nodes)
    relay = nodes["relay"].sessions["hub"]
    assert relay.stats.sent > 0


def test_away_replica_gets_snapshot_and_no_resurrection() -> None:
    clock = ManualClock()
    net = LossyNetwork(1)
    nodes = {n: Node(n, clock) for n in ("hub", "agent", "agent2")}
    hub = nodes["hub"]
    for a in ("agent", "agent2"):
        net.send_all("hub", a, hub.connect(a, clock, net).start())
        net.send_all(a, "hub", nodes[a].connect("hub", clock, net).start())
    hub.write(net, "doomed", "v1")
    hub.write(net, "kept", "v1")
    settle(nodes, net, clock)
    assert "doomed" in nodes["agent2"].replica.scope(SCOPE)

    # agent2 goes away; meanwhile the hub deletes, agent acks, the hub collects
    # with agent2 taken out of the scope membership.
    net.partition(["agent2"], ["hub", "agent"])
    hub.write(net, "doomed", None, delete=True)
    nodes["agent2"].write(net, "offline", "made while away")
    for _ in range(20):
        pump(nodes, net, clock, 50)
    hub_map = hub.replica.scope(SCOPE)
    acked = [hub.sessions["agent"].peer_vv[SCOPE]]
    assert hub_map.collect_tombstones(causally_stable(hub_map.context, acked)) == 1
    assert hub_map.tombstones == 0

    # agent2 comes back with a new session (bdSeq + 1) on both sides.
    net.heal()
    b = nodes["agent2"]
    s_hub = hub.connect("agent2", clock, net, bd=1)
    s_b = b.connect("hub", clock, net, bd=1)
    net.send_all("agent2", "hub", s_b.start())
    net.send_all("hub", "agent2", s_hub.start())
    settle(nodes, net, clock)
    assert s_hub.stats.snapshots_sent >= 1
    for n in nodes.values():
        m = n.replica.scope(SCOPE)
        assert "doomed" not in m, n.name
        assert m.get("offline") == "made while away"
        assert m.get("kept") == "v1"


def envelope_types(datas: list[bytes]) -> list[str]:
    return [decode_envelope_unverified(d).type for d in datas]


def pair(**kw: Any) -> tuple[SyncSession, SyncSession, ManualClock]:
    clock = ManualClock()
    net = LossyNetwork(0)
    a, h = Node("agent", clock), Node("hub", clock)
    sa = a.connect("hub", clock, net, **kw)
    sh = h.connect("agent", clock, net, **kw)
    exchange(sa, sh, sa.start() + sh.start())
    return sa, sh, clock


def exchange(sa: SyncSession, sh: SyncSession, queue: list[bytes]) -> None:
    """Deliver messages between two sessions, in order, until quiet."""
    while queue:
        m = queue.pop(0)
        from_hub = decode_envelope_unverified(m).src == "hub"
        queue += sa.receive(m) if from_hub else sh.receive(m)


def test_handshake_confirms_both_sessions() -> None:
    sa, sh, _ = pair()
    assert sa.hello_confirmed
    assert sh.hello_confirmed
    assert sa.peer_session == sh.session_id
    assert sh.peer_bd_seq == 0


def test_seq_gap_triggers_rehello() -> None:
    sa, sh, clock = pair(gap_timeout_ms=1000)
    hub = sh.replica
    msgs = [sh.local_update(SCOPE, hub.set(SCOPE, f"k{i}", i))[0] for i in range(3)]
    sa.receive(msgs[0])
    sa.receive(msgs[2])  # msgs[1] lost: a gap
    assert "HELLO" not in envelope_types(sa.tick())
    clock.advance(1000)
    out = sa.tick()
    assert "HELLO" in envelope_types(out)
    assert sa.stats.gaps == 1
    # The re-HELLO brings the lost write back even if the resend were lost too.
    replies = [
        r for m in out if decode_envelope_unverified(m).type == "HELLO" for r in sh.receive(m)
    ]
    for r in replies:
        sa.receive(r)
    assert sa.replica.scope(SCOPE).get("k1") == 1


def test_filled_gap_does_not_rehello() -> None:
    sa, sh, clock = pair(gap_timeout_ms=1000)
    msgs = [sh.local_update(SCOPE, sh.replica.set(SCOPE, f"k{i}", i))[0] for i in range(3)]
    sa.receive(msgs[0])
    sa.receive(msgs[2])
    sa.receive(msgs[1])  # reordered, not lost
    clock.advance(5000)
    assert "HELLO" not in envelope_types(sa.tick())
    assert sa.stats.gaps == 0


def test_resend_backoff_is_bounded_and_stops_on_ack() -> None:
    sa, sh, clock = pair(resend_initial_ms=100, resend_max_ms=800)
    (msg,) = sh.local_update(SCOPE, sh.replica.set(SCOPE, "k", 1))
    times = []
    for t in range(0, 20_000, 50):
        clock.set(clock.ms + 50)
        if sh.tick():
            times.append(t)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps
    assert max(gaps) <= 800 * 1.25 + 50
    assert gaps[-1] >= 800
    acks = sa.receive(msg)
    for a in acks:
        sh.receive(a)
    assert sh.unacked == 0
    clock.advance(10_000)
    assert sh.tick() == []


def test_outbound_queue_is_bounded_and_overflow_recovers() -> None:
    sa, sh, _clock = pair(max_unacked=4)
    sent = []
    for i in range(10):
        sent += sh.local_update(SCOPE, sh.replica.set(SCOPE, f"k{i}", i))
    assert len(sent) == 4
    assert sh.stats.overflows == 6
    for m in sent:
        for a in sa.receive(m):
            sh.receive(a)
    out = sh.tick()
    assert "HELLO" in envelope_types(out)  # resync after the overflow
    exchange(sa, sh, out)
    assert sa.replica.scope(SCOPE).to_dict() == {f"k{i}": i for i in range(10)}


def test_events_stream_with_cursor_and_release() -> None:
    clock = ManualClock()
    net = LossyNetwork(0)
    a, h = Node("agent", clock), Node("hub", clock)
    stream = a.replica.stream("events", capacity=100)
    sa = a.connect("hub", clock, net, streams=["events"], max_batch=3)
    sh = h.connect("agent", clock, net)
    for i in range(7):
        stream.append({"n": i})
    out = sa.start() + sa.tick()
    # Deliver in reverse: out-of-order batches are not acked, so they come back.
    for _ in range(50):
        if not out:
            clock.advance(2000)
            out = sa.tick()
            if not out:
                break
        back = []
        for m in reversed(out):
            back += sh.receive(m)
        out = []
        for r in back:
            out += sa.receive(r)
    inbox = h.replica.inbox["agent", "events"]
    assert inbox.items == [{"n": i} for i in range(7)]
    assert inbox.next_seq == 8
    assert len(stream) == 0  # released only after the hub's application-level ack


def test_event_stream_quota_drop_is_counted() -> None:
    s = EventStream("m", capacity=2)
    for i in range(5):
        assert s.append(i) == i + 1
    assert s.dropped == 3
    assert s.read(1, 10) == (4, [3, 4])
    s.release(5)
    assert s.read(1, 10) == (5, [4])
    with pytest.raises(ValueError, match="capacity"):
        EventStream("x", capacity=0)


def _state(s: SyncSession) -> tuple[Any, ...]:
    m = s.replica.scope(SCOPE)
    return (m.to_wire(), s.stats.received, s.peer_session, s.unacked, s.replica.hlc.last)


def _forge(
    type_: str, body: object, *, src: str = "hub", signer: str = "hub", ts: int | None = None
) -> bytes:
    stamp = pack_ts(1_700_000_000_000, 0) if ts is None else ts
    return encode_envelope(type_, src, 99, stamp, packb(body), SIGNERS[signer])


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", DecodeError),
        (b"\x00garbage", DecodeError),
        (b"\x81\xa1v\x01", DecodeError),
        (_forge("DELTAS", {}, signer="relay"), SignatureError),  # unknown key
        (_forge("DELTAS", {}, src="agent2"), ProtocolError),  # wrong sender
        (_forge("NOPE", {"s": "x"}), ProtocolError),
        (_forge("DELTAS", {"s": "x"}), ProtocolError),
        (_forge("DELTAS", {"s": "x", "sc": "other", "d": [], "c": None}), ProtocolError),
        (
            _forge("DELTAS", {"s": "x", "sc": SCOPE, "d": [["k", 1, "a", 0, False, 1]], "c": None}),
            CrdtError,
        ),
        (_forge("DELTAS", {"s": "x", "sc": SCOPE, "d": [["k"]], "c": None}), CrdtError),
        (_forge("DELTAS", {"s": "x", "sc": SCOPE, "d": [], "c": {"a": -1}}), CrdtError),
        (_forge("SNAPSHOT", {"s": "x", "sc": SCOPE, "st": {"e": []}}), CrdtError),
        (
            _forge("HELLO", {"s": "x", "bd": -1, "r": True, "ps": None, "vv": {}, "ev": {}}),
            ProtocolError,
        ),
        (
            _forge("HELLO", {"s": "x", "bd": 0, "r": 1, "ps": None, "vv": {}, "ev": {}}),
            ProtocolError,
        ),
        (
            _forge(
                "HELLO",
                {"s": "x", "bd": 0, "r": True, "ps": None, "vv": {SCOPE: {"a": "z"}}, "ev": {}},
            ),
            CrdtError,
        ),
        (
            _forge("EVENTS", {"s": "x", "st": "e", "from": 0, "first": 0, "items": []}),
            ProtocolError,
        ),
        (_forge("ACK", {"s": "x", "ps": None, "a": ["1"], "vv": {}, "ev": {}}), ProtocolError),
        (_forge("ACK", {"s": "", "ps": None, "a": [], "vv": {}, "ev": {}}), ProtocolError),
    ],
)
def test_bad_input_raises_typed_error_and_changes_nothing(
    data: bytes, error: type[SyncError]
) -> None:
    sa, sh, _ = pair()
    sh.local_update(SCOPE, sh.replica.set(SCOPE, "k", 1))
    before = _state(sa)
    with pytest.raises(error):
        sa.receive(data)
    assert _state(sa) == before


FAR_AHEAD = pack_ts(1_900_000_000_000, 7)  # 2030, years past the five-minute bound


def test_a_peer_clock_far_ahead_is_merged_but_never_drags_ours() -> None:
    sa, _sh, clock = pair()
    bound = (clock.now_ms() + sa.replica.hlc.max_skew_ms) << 16 | 0xFFFF
    data = _forge(
        "DELTAS",
        {"s": "x", "sc": SCOPE, "d": [["k", FAR_AHEAD, "hub", 1, False, "v"]], "c": None},
        ts=FAR_AHEAD,
    )
    out = sa.receive(data)
    # Merged with the writer's own timestamp and acknowledged: a device whose
    # clock jumped ahead is not shut out until real time catches up.
    entry = sa.replica.scope(SCOPE).entry("k")
    assert entry is not None and entry[0] == FAR_AHEAD
    assert [decode_envelope_unverified(m).type for m in out] == ["ACK"]
    # The envelope's and the entry's timestamps were both clamped, and counted.
    assert sa.stats.clock_skew == 2
    assert sa.replica.hlc.skew_clamped == 2
    # The clock stopped at the bound; the ACK then took the next timestamp.
    assert sa.replica.hlc.last == bound + 1


def test_own_history_far_ahead_is_adopted_in_full() -> None:
    """Entries this node wrote itself (handed back after it lost its journal)
    move its clock past them, skew or not: its next write must win over them."""
    sa, _sh, _clock = pair()
    data = _forge(
        "DELTAS",
        {"s": "x", "sc": SCOPE, "d": [["k", FAR_AHEAD, "agent", 1, False, "old"]], "c": None},
    )
    sa.receive(data)
    assert sa.stats.clock_skew == 0
    assert sa.replica.hlc.last >= FAR_AHEAD
    sa.replica.set(SCOPE, "k", "new")
    assert sa.replica.scope(SCOPE).get("k") == "new"


def test_tampered_envelope_is_refused() -> None:
    sa, sh, _ = pair()
    (msg,) = sh.local_update(SCOPE, sh.replica.set(SCOPE, "k", "value"))
    tampered = msg.replace(b"value", b"VALUE")
    before = _state(sa)
    with pytest.raises(SignatureError):
        sa.receive(tampered)
    assert _state(sa) == before
    sa.receive(msg)
    assert sa.replica.scope(SCOPE).get("k") == "value"


def test_stale_bdseq_hello_refused() -> None:
    sa, _sh, _ = pair(bd=3)
    old = _forge("HELLO", {"s": "old", "bd": 2, "r": True, "ps": None, "vv": {}, "ev": {}})
    with pytest.raises(ProtocolError, match="stale bdSeq"):
        sa.receive(old)


# -- size cap: chunked snapshots and batches ------------------------------------------


class RecordingNetwork(LossyNetwork):
    """A lossy network that also records ``(src, dst, type, size)`` of every send."""

    def __init__(self, seed: int, **kw: Any) -> None:
        super().__init__(seed, **kw)
        self.log: list[tuple[str, str, str, int]] = []

    def send(self, src: str, dst: str, data: bytes) -> None:
        self.log.append((src, dst, decode_envelope_unverified(data).type, len(data)))
        super().send(src, dst, data)


def test_big_scope_snapshot_is_chunked_over_lossy_network_without_resurrection() -> None:
    clock = ManualClock()
    net = RecordingNetwork(7)
    nodes = {n: Node(n, clock) for n in ("hub", "agent", "agent2")}
    hub = nodes["hub"]
    value = "x" * 100
    for i in range(2_000):  # written before any session: sent by catch-up batches
        hub.replica.set(SCOPE, f"k{i:05d}", value)
    for a in ("agent", "agent2"):
        net.send_all("hub", a, hub.connect(a, clock, net).start())
        net.send_all(a, "hub", nodes[a].connect("hub", clock, net).start())
    settle(nodes, net, clock)
    assert len(nodes["agent2"].replica.scope(SCOPE)) == 2_000

    # agent2 goes away. The hub writes 18,000 more keys, deletes 3,000 (old and
    # new) and overwrites 1,000; the agent catches up and acks; the hub collects
    # the tombstones without agent2.
    net.partition(["agent2"], ["hub", "agent"])
    for i in range(2_000, 20_000):
        hub.replica.set(SCOPE, f"k{i:05d}", value)
    deleted = {f"k{i:05d}" for i in range(0, 15_000, 5)}
    for key in sorted(deleted):
        hub.replica.delete(SCOPE, key)
    for i in range(1, 5_000, 5):
        hub.write(net, f"k{i:05d}", "new")
    b = nodes["agent2"]
    b.write(net, "offline", "made while away")
    clock.advance(10)
    b.write(net, "k00000", "rewritten after the delete")  # newer than the hub's delete
    hub_map = hub.replica.scope(SCOPE)
    to_agent = hub.sessions["agent"]
    for _ in range(100):
        pump(nodes, net, clock, 200)
        if to_agent.peer_vv[SCOPE].dominates(hub_map.context):
            break
    acked = [to_agent.peer_vv[SCOPE]]
    assert hub_map.collect_tombstones(causally_stable(hub_map.context, acked)) == len(deleted)

    # agent2 comes back with new sessions, over a network losing and duplicating
    # 20% of the messages.
    net.heal()
    net.loss = net.duplicate = 0.2
    start = len(net.log)
    s_hub = hub.connect("agent2", clock, net, bd=1)
    s_b = b.connect("hub", clock, net, bd=1)
    net.send_all("agent2", "hub", s_b.start())
    net.send_all("hub", "agent2", s_hub.start())
    for _ in range(30):
        pump(nodes, net, clock, 200)
    settle(nodes, net, clock)

    assert s_hub.stats.snapshots_sent >= 1
    snapshots = [
        n for src, dst, t, n in net.log[start:] if (src, dst, t) == ("hub", "agent2", "SNAPSHOT")
    ]
    assert len(snapshots) > 10  # ~3 MB of state: many chunks, each under the cap
    assert max(size for *_, size in net.log) <= 256 * 1024
    assert converged(nodes)
    for n in nodes.values():
        m = n.replica.scope(SCOPE)
        back = deleted.intersection(m.keys()) - {"k00000"}
        assert not back, (n.name, sorted(back)[:5])
        assert m.get("k00000") == "rewritten after the delete", n.name
        assert m.get("offline") == "made while away", n.name
        assert m.get("k00001") == "new", n.name
        assert m.get("k00002") == value, n.name
        assert len(m) == 20_000 - len(deleted) + 2, n.name


def _diverged(seed: int) -> tuple[Replica, Replica, ManualClock]:
    """A hub and an away replica sharing a history, then diverging; the hub
    collected every tombstone (so the away replica needs a snapshot)."""
    rng = random.Random(seed)
    clock = ManualClock()
    hub = Replica("hub", HybridLogicalClock(clock))
    away = Replica("agent2", HybridLogicalClock(clock))
    for i in range(rng.randrange(1, 30)):
        clock.advance(rng.randrange(3))
        key = f"k{rng.randrange(12)}"
        (hub.delete(SCOPE, key) if rng.random() < 0.3 else hub.set(SCOPE, key, i))
    away.scope(SCOPE).merge_state(hub.scope(SCOPE))
    for i in range(rng.randrange(30)):
        clock.advance(rng.randrange(3))
        writer = hub if rng.random() < 0.7 else away
        key = f"k{rng.randrange(16)}"
        if rng.random() < 0.4:
            writer.delete(SCOPE, key)
        else:
            writer.set(SCOPE, key, 100 + i)
    # At least one tombstone the away replica lacks, collected: a snapshot is due.
    hub.delete(SCOPE, hub.scope(SCOPE).keys()[0] if hub.scope(SCOPE).keys() else "k0")
    hub_map = hub.scope(SCOPE)
    assert hub_map.collect_tombstones(hub_map.context.copy()) >= 1
    return hub, away, clock


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_snapshot_chunks_in_any_order_equal_the_full_state_join(seed: int, batch: int) -> None:
    hub, away, clock = _diverged(seed)
    expected = away.scope(SCOPE).join(hub.scope(SCOPE))
    sh = SyncSession(
        hub, "agent2", SIGNERS["hub"], ring_for("agent2"), clock, session_id="h", max_batch=batch
    )
    sa = SyncSession(away, "hub", SIGNERS["agent2"], ring_for("hub"), clock, session_id="a")
    out = [m for h in sa.start() for m in sh.receive(h)]
    chunks = [m for m in out if decode_envelope_unverified(m).type == "SNAPSHOT"]
    assert chunks
    rng = random.Random(seed)
    deliveries = chunks + rng.sample(chunks, rng.randrange(len(chunks) + 1))
    rng.shuffle(deliveries)
    allowed = set(expected.keys()) | set(away.scope(SCOPE).keys())
    for m in deliveries:
        sa.receive(m)
        # No prefix of the deliveries brings a key the full join would not
        # have: a chunk never revives what the hub deleted.
        assert set(away.scope(SCOPE).keys()) <= allowed
    assert away.scope(SCOPE) == expected


def pair_loaded(keys: int, value: Any, **kw: Any) -> tuple[SyncSession, SyncSession, list[bytes]]:
    """A confirmed pair whose hub then got ``keys`` writes; returns the catch-up."""
    sa, sh, _ = pair(**kw)
    for i in range(keys):
        sh.replica.set(SCOPE, f"k{i:05d}", value)
    # A re-HELLO from the agent makes the hub send what it lacks.
    out = [r for h in sa.start() for r in sh.receive(h)]
    return sa, sh, out


def test_deltas_batch_cut_by_bytes_not_only_by_count() -> None:
    # 500 entries of 1 KiB values pack to ~520 KiB: max_batch alone would overflow.
    sa, sh, out = pair_loaded(1_200, "v" * 1024)
    deltas = [m for m in out if decode_envelope_unverified(m).type == "DELTAS"]
    assert len(deltas) > 1_200 // 500 + 1
    assert all(len(m) <= 200 * 1024 + 1024 for m in deltas)
    exchange(sa, sh, out)
    assert sa.replica.scope(SCOPE).to_dict() == sh.replica.scope(SCOPE).to_dict()
    # A forwarded batch goes through the same cut.
    fwd = sh.send_entries(SCOPE, sh.replica.scope(SCOPE).entries_wire())
    assert fwd == []  # the peer has acknowledged everything
    sh.peer_vv.clear()
    fwd = sh.send_entries(SCOPE, sh.replica.scope(SCOPE).entries_wire())
    assert len(fwd) > 3
    assert all(len(m) <= 200 * 1024 + 1024 for m in fwd)


def test_entry_too_large_for_any_envelope_is_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sa, sh, _ = pair()
    delta = sh.replica.set(SCOPE, "huge", "v" * (300 * 1024))
    with caplog.at_level("WARNING", logger="sync.protocol"):
        assert sh.local_update(SCOPE, delta) == []
    assert sh.stats.oversize == 1
    assert "not sent" in caplog.text
    # The session goes on: the next write is sent with the next seq, no gap.
    (msg,) = sh.local_update(SCOPE, sh.replica.set(SCOPE, "small", 1))
    sa.receive(msg)
    assert sa.replica.scope(SCOPE).get("small") == 1
    assert sa.stats.gaps == 0
    assert sa._gap_since is None


def test_events_batch_shrinks_to_fit() -> None:
    clock = ManualClock()
    net = LossyNetwork(0)
    a, h = Node("agent", clock), Node("hub", clock)
    stream = a.replica.stream("events", capacity=100)
    sa = a.connect("hub", clock, net, streams=["events"])
    sh = h.connect("agent", clock, net)
    for i in range(12):
        stream.append({"n": i, "blob": b"\0" * 60_000})
    out = sa.start() + sa.tick()
    events = [m for m in out if decode_envelope_unverified(m).type == "EVENTS"]
    assert len(events) >= 4  # 720 KB of events: at most 3 per 200 KiB body
    assert all(len(m) <= 200 * 1024 + 1024 for m in events)
    exchange(sa, sh, out)
    assert [e["n"] for e in h.replica.inbox["agent", "events"].items] == list(range(12))
