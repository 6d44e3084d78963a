"""PN-counter: lattice laws, delta equivalence, convergence."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import CrdtError
from sync.crdt import PNCounter

ORIGINS = ["a", "b", "c", "d", "e"]
op = st.tuples(st.sampled_from(ORIGINS), st.booleans(), st.integers(0, 50))


def build(ops: list[tuple[str, bool, int]]) -> PNCounter:
    c = PNCounter()
    for origin, up, amount in ops:
        if up:
            c.increment(origin, amount)
        else:
            c.decrement(origin, amount)
    return c


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=20), st.lists(op, max_size=20), st.lists(op, max_size=20))
def test_join_laws(
    xs: list[tuple[str, bool, int]],
    ys: list[tuple[str, bool, int]],
    zs: list[tuple[str, bool, int]],
) -> None:
    a, b, c = build(xs), build(ys), build(zs)
    assert a.join(b) == b.join(a)
    assert a.join(b).join(c) == a.join(b.join(c))
    assert a.join(a) == a
    assert PNCounter.from_wire(a.to_wire()) == a


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=40), st.integers(0, 2**32), st.floats(0, 0.5))
def test_five_replicas_converge(ops: list[tuple[str, bool, int]], seed: int, dup: float) -> None:
    rng = random.Random(seed)
    reps = {o: PNCounter() for o in ORIGINS}
    inflight: list[tuple[str, PNCounter]] = []
    expected = 0
    for origin, up, amount in ops:
        rep = reps[origin]
        delta = rep.increment(origin, amount) if up else rep.decrement(origin, amount)
        expected += amount if up else -amount
        inflight.extend((peer, delta) for peer in ORIGINS if peer != origin)
        # Deliver a few at random, sometimes keeping them for a duplicate later.
        for _ in range(rng.randrange(3)):
            if inflight:
                i = rng.randrange(len(inflight))
                peer, d = inflight[i] if rng.random() < dup else inflight.pop(i)
                reps[peer].merge(d)
    rng.shuffle(inflight)
    for peer, d in inflight:
        reps[peer].merge(d)
    for rep in reps.values():
        assert rep.value == expected
        assert rep == reps["a"]


def test_counter_basics() -> None:
    c = PNCounter()
    d1 = c.increment("a", 5)
    d2 = c.decrement("a", 2)
    assert c.value == 3
    assert d1.to_wire() == {"p": {"a": 5}, "n": {}}
    assert d2.to_wire() == {"p": {}, "n": {"a": 2}}
    assert repr(c) == "PNCounter(3)"
    with pytest.raises(CrdtError):
        c.increment("a", -1)
    with pytest.raises(CrdtError):
        c.increment("", 1)


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"p": {}},
        {"p": [], "n": {}},
        {"p": {"a": -1}, "n": {}},
        {"p": {1: 1}, "n": {}},
        {"p": {"a": 1.0}, "n": {}},
    ],
)
def test_from_wire_rejects(bad: object) -> None:
    with pytest.raises(CrdtError):
        PNCounter.from_wire(bad)
