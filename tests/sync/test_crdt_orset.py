"""Add-wins OR-set: semantics, lattice laws, convergence."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import CrdtError
from sync.crdt import ORSet

ELEMENTS: list[str | int] = ["x", "y", "z", 7]
step = st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 3))


def run_history(steps: list[tuple[int, int, int]]) -> list[ORSet]:
    reps = [ORSet() for _ in range(3)]
    for kind, r, x in steps:
        if kind == 0:
            reps[r].add(ELEMENTS[x], origin=f"r{r}")
        elif kind == 1:
            reps[r].remove(ELEMENTS[x])
        else:
            reps[r].merge(reps[x % 3])
    return reps


def test_add_wins_over_concurrent_remove() -> None:
    a, b = ORSet(), ORSet()
    b.merge(a.add("x", origin="a"))
    removed = b.remove("x")
    readded = a.add("x", origin="a")  # concurrent with b's remove
    a.merge(removed)
    b.merge(readded)
    assert "x" in a
    assert a == b
    # A remove that observed every add does remove.
    gone = a.remove("x")
    b.merge(gone)
    assert "x" not in b
    assert b.elements == frozenset()
    assert len(b) == 0
    assert a.remove("never").to_wire() == {"e": [], "c": {}}


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=40))
def test_join_laws(steps: list[tuple[int, int, int]]) -> None:
    a, b, c = run_history(steps)
    assert a.join(b) == b.join(a)
    assert a.join(b).join(c) == a.join(b.join(c))
    assert a.join(a) == a
    assert ORSet.from_wire(a.to_wire()) == a


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=40), st.integers(0, 2**32))
def test_five_replicas_converge(steps: list[tuple[int, int, int]], seed: int) -> None:
    rng = random.Random(seed)
    n = 5
    reps = [ORSet() for _ in range(n)]
    inflight: list[tuple[int, ORSet]] = []
    for kind, raw_r, x in steps:
        r = (raw_r + x) % n
        delta = reps[r].add(ELEMENTS[x], origin=f"r{r}") if kind else reps[r].remove(ELEMENTS[x])
        inflight.extend((p, delta) for p in range(n) if p != r)
        for _ in range(rng.randrange(3)):
            if inflight:
                i = rng.randrange(len(inflight))
                p, d = inflight[i] if rng.random() < 0.3 else inflight.pop(i)
                reps[p].merge(d)
    rng.shuffle(inflight)
    for p, d in inflight:
        reps[p].merge(d)
    for rep in reps:
        assert rep == reps[0]


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"e": []},
        {"e": {}, "c": {}},
        {"e": [["x"]], "c": {"a": 1}},
        {"e": [["x", []]], "c": {"a": 1}},
        {"e": [[1.5, [["a", 1]]]], "c": {"a": 1}},
        {"e": [["x", [["a", 2]]]], "c": {"a": 1}},
        {"e": [["x", [["a", 1]]], ["x", [["a", 1]]]], "c": {"a": 1}},
        {"e": [["x", [["a"]]]], "c": {"a": 1}},
        {"e": [[True, [["a", 1]]]], "c": {"a": 1}},
    ],
)
def test_from_wire_rejects(bad: object) -> None:
    with pytest.raises(CrdtError):
        ORSet.from_wire(bad)
