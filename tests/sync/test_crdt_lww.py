"""LWW map: lattice laws, convergence under a hostile network, tombstone GC."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import CrdtError
from sync.crdt import LwwMap, causally_stable
from sync.dots import Dot, VersionVector

KEYS = ["k0", "k1", "k2", "k3"]

# One step of a history on three replicas: (kind, replica, other/key, ts/value)
step = st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 3), st.integers(0, 5))


def run_history(steps: list[tuple[int, int, int, int]], n: int = 3) -> list[LwwMap]:
    reps = [LwwMap() for _ in range(n)]
    names = [f"r{i}" for i in range(n)]
    for kind, raw_r, x, v in steps:
        r = raw_r % n
        if kind == 0:
            reps[r].set(KEYS[x], v, ts=v, origin=names[r])  # small ts: many ties
        elif kind == 1:
            reps[r].delete(KEYS[x], ts=v, origin=names[r])
        elif kind == 2:
            reps[r].merge_state(reps[x % n])
        else:
            stable = causally_stable(reps[r].context, [p.context for p in reps])
            reps[r].collect_tombstones(stable)
    return reps


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=40))
def test_join_laws(steps: list[tuple[int, int, int, int]]) -> None:
    a, b, c = run_history(steps)
    assert a.join(b) == b.join(a)
    assert a.join(b).join(c) == a.join(b.join(c))
    assert a.join(a) == a
    assert a.join(b).join(b) == a.join(b)
    assert a.join(LwwMap()) == a
    assert LwwMap.from_wire(a.to_wire()) == a


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=30), st.sampled_from(KEYS), st.integers(0, 5), st.booleans())
def test_delta_join_laws(
    steps: list[tuple[int, int, int, int]], key: str, ts: int, delete: bool
) -> None:
    a, b, _ = run_history(steps)
    before = a.copy()
    delta = a.delete(key, ts=ts, origin="r0") if delete else a.set(key, ts, ts=ts, origin="r0")
    assert before.join(delta) == a
    assert delta.join(before) == a
    # The delta, however delivered, has the same effect on a third party.
    via_state, via_delta, via_wire = b.copy(), b.copy(), b.copy()
    via_state.merge_state(delta)
    via_delta.merge_delta(delta)
    via_wire.merge_batch(delta.entries_wire(), delta.context.to_wire())
    assert via_state == via_delta == via_wire
    assert via_state.join(delta) == via_state  # idempotent


def test_lww_basics() -> None:
    m = LwwMap()
    m.set("a", 1, ts=10, origin="x")
    m.set("a", 2, ts=5, origin="y")  # older: loses
    assert m["a"] == 1
    m.set("a", 3, ts=10, origin="z")  # same ts, greater origin wins
    assert m.get("a") == 3
    m.delete("a", ts=11, origin="x")
    assert "a" not in m
    assert m.get("a", "gone") == "gone"
    with pytest.raises(KeyError):
        _ = m["a"]
    assert m.tombstones == 1
    assert len(m) == 0
    m.set("b", None, ts=12, origin="x")
    assert "b" in m
    assert m.keys() == ["b"]
    assert m.items() == [("b", None)]
    assert m.to_dict() == {"b": None}
    assert m.max_ts == 12
    assert m.entry("a") == (11, "x", 2, True, None)
    assert m.context.to_wire() == {"x": 3, "y": 1, "z": 1}
    assert 5 not in m
    assert repr(m) == "LwwMap(1 live, 1 tombstones)"


def test_gc_keeps_unstable_tombstones_and_grows_horizon() -> None:
    a, b = LwwMap(), LwwMap()
    b.merge_state(a.set("k", "v", ts=1, origin="a"))
    a.delete("k", ts=2, origin="a")
    # b has not seen the delete: not stable.
    assert a.collect_tombstones(causally_stable(a.context, [a.context, b.context])) == 0
    assert a.tombstones == 1
    assert not a.needs_snapshot(b.context)
    # b is away: the operator drops it from the scope membership, a collects.
    assert a.collect_tombstones(causally_stable(a.context, [a.context])) == 1
    assert a.tombstones == 0
    assert a.needs_snapshot(b.context)
    # A delta merge would leave b with the deleted key; the snapshot does not.
    delta_only = b.copy()
    delta_only.merge_batch(a.entries_wire(b.context), a.context.difference(b.context).to_wire())
    assert "k" in delta_only
    b.merge_state(LwwMap.from_wire(a.to_wire()))
    assert "k" not in b
    assert b.horizon == a.horizon


def test_late_concurrent_write_blocks_gc() -> None:
    # b writes k (older ts) concurrently with a's delete; a must not collect
    # the tombstone until it has seen b's write, or k would come back at a.
    a, b = LwwMap(), LwwMap()
    a.delete("k", ts=10, origin="a")
    w = b.set("k", "old", ts=5, origin="b")
    b.merge_state(a)  # b saw the delete, acks; a has not seen w yet
    acked = [a.context.copy(), b.context.copy()]
    assert causally_stable(a.context, acked) == VersionVector()
    a.collect_tombstones(causally_stable(a.context, acked))
    a.merge_delta(w)
    assert "k" not in a


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"e": [], "c": {}},
        {"e": {}, "c": {}, "h": {}},
        {"e": [["k", 1, "a", 1, False]], "c": {"a": 1}, "h": {}},
        {"e": [[1, 1, "a", 1, False, None]], "c": {"a": 1}, "h": {}},
        {"e": [["k", -1, "a", 1, False, None]], "c": {"a": 1}, "h": {}},
        {"e": [["k", 1, "", 1, False, None]], "c": {"a": 1}, "h": {}},
        {"e": [["k", 1, "a", 0, False, None]], "c": {"a": 1}, "h": {}},
        {"e": [["k", 1, "a", 1, 0, None]], "c": {"a": 1}, "h": {}},
        {"e": [["k", 1, "a", 1, True, "v"]], "c": {"a": 1}, "h": {}},
        {"e": [["k", 1, "a", 2, False, None]], "c": {"a": 1}, "h": {}},  # dot not in ctx
        {"e": [["k", 1, "a", 1, False, 1], ["k", 1, "a", 1, False, 1]], "c": {"a": 1}, "h": {}},
        {"e": [], "c": {"a": "x"}, "h": {}},
    ],
)
def test_from_wire_rejects(bad: object) -> None:
    with pytest.raises(CrdtError):
        LwwMap.from_wire(bad)


def test_merge_batch_is_atomic() -> None:
    m = LwwMap()
    good = ["a", 1, "x", 1, False, "v"]
    with pytest.raises(CrdtError):
        m.merge_batch([good, ["b", 1, "x", 2, "no", None]])
    with pytest.raises(CrdtError):
        m.merge_batch("nope")
    with pytest.raises(CrdtError):
        m.merge_batch([good], {"x": -3})
    assert m == LwwMap()
    assert m.merge_batch([good, good]) == 1
    assert m.merge_batch([good]) == 0
    with pytest.raises(CrdtError):
        m.set(1, 1, ts=1, origin="x")  # type: ignore[arg-type]
    with pytest.raises(CrdtError):
        m.set("k", 1, ts=-1, origin="x")


# -- convergence of five replicas over a hostile network ----------------------------

N = 5
NAMES = [f"n{i}" for i in range(N)]
net_step = st.tuples(
    st.integers(0, 9), st.integers(0, N - 1), st.integers(0, N - 1), st.integers(0, 1000)
)


class World:
    """Five replicas, per-link queues of deltas, partitions, acks and GC."""

    def __init__(self) -> None:
        self.reps = {n: LwwMap() for n in NAMES}
        self.ghost = LwwMap()  # sees every delta at once and never collects
        self.links: dict[tuple[str, str], list[LwwMap]] = {
            (a, b): [] for a in NAMES for b in NAMES if a != b
        }
        self.cut: set[str] = set()
        self.acked = {n: VersionVector() for n in NAMES}
        self.ts = 0
        self.collected = 0

    def connected(self, a: str, b: str) -> bool:
        return a == b or (a not in self.cut and b not in self.cut)

    def deliver(self, delta: LwwMap, dst: str, how: int) -> None:
        rep = self.reps[dst]
        if how == 0:
            rep.merge_delta(delta)
        elif how == 1:
            rep.merge_batch(delta.entries_wire(), delta.context.to_wire())
        else:
            rep.merge_state(delta)

    def step(self, kind: int, a: int, b: int, v: int) -> None:
        src, dst = NAMES[a], NAMES[b]
        if kind <= 3:  # local write or delete, streamed to every peer
            self.ts += 1
            key = KEYS[v % len(KEYS)]
            rep = self.reps[src]
            if kind == 3:
                delta = rep.delete(key, ts=self.ts, origin=src)
            else:
                delta = rep.set(key, v, ts=self.ts, origin=src)
            self.ghost.merge_state(delta)
            for peer in NAMES:
                if peer != src:
                    self.links[src, peer].append(delta)
        elif kind <= 6 and src != dst:  # delivery attempt: maybe lost, maybe kept
            queue = self.links[src, dst]
            if queue and self.connected(src, dst):
                i = v % len(queue)
                self.deliver(queue[i], dst, v % 3)
                if v % 4:  # acked: dropped from the sender's queue; else resent later
                    queue.pop(i)
        elif kind == 7 and self.connected(src, dst):  # anti-entropy with full state
            self.reps[dst].merge_state(self.reps[src])
        elif kind == 8:  # ack to the coordinator, then GC at the acker
            self.acked[src] = self.reps[src].context.copy()
            rep = self.reps[src]
            self.collected += rep.collect_tombstones(
                causally_stable(rep.context, self.acked.values())
            )
        elif kind == 9:  # partition toggles
            self.cut ^= {src}

    def heal_and_drain(self) -> None:
        self.cut.clear()
        for (_, dst), queue in sorted(self.links.items()):
            for delta in queue:
                self.deliver(delta, dst, 0)
            queue.clear()


@settings(max_examples=200, deadline=None)
@given(st.lists(net_step, min_size=10, max_size=150))
def test_five_replicas_converge_without_resurrection(
    steps: list[tuple[int, int, int, int]],
) -> None:
    world = World()
    for s in steps:
        world.step(*s)
        for rep in world.reps.values():
            # Safety at every step: no replica shows a value the ghost deleted
            # with a newer write than the one shown.
            for key, value in rep.items():
                g = world.ghost.entry(key)
                e = rep.entry(key)
                assert g is not None and e is not None
                assert g[0] >= e[0], (key, value)
    world.heal_and_drain()
    truth = world.ghost.to_dict()
    for rep in world.reps.values():
        assert rep.to_dict() == truth
        assert rep.context == world.ghost.context
    # Once everyone has acknowledged everything, every tombstone can go.
    for n in NAMES:
        world.acked[n] = world.reps[n].context.copy()
    for rep in world.reps.values():
        rep.collect_tombstones(causally_stable(rep.context, world.acked.values()))
        assert rep.tombstones == 0
        assert rep.to_dict() == truth


def test_dot_namedtuple_membership() -> None:
    m = LwwMap()
    m.set("a", 1, ts=1, origin="x")
    assert Dot("x", 1) in m.context
