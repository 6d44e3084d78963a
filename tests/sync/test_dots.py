"""Version vectors against a reference model: a plain set of dots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import CrdtError
from sync.dots import Dot, VersionVector

ORIGINS = ["a", "b", "c"]
dots_st = st.builds(Dot, st.sampled_from(ORIGINS), st.integers(1, 24))
dot_lists = st.lists(dots_st, max_size=60)


def build(dots: list[Dot]) -> VersionVector:
    vv = VersionVector()
    for d in dots:
        vv.add(d)
    return vv


def check_model(vv: VersionVector, model: set[Dot]) -> None:
    for origin in [*ORIGINS, "zz"]:
        for c in range(1, 30):
            assert (Dot(origin, c) in vv) == (Dot(origin, c) in model)
            assert vv.contains(origin, c) == (Dot(origin, c) in model)
        counters = sorted(d.counter for d in model if d.origin == origin)
        prefix = 0
        while prefix + 1 in counters:
            prefix += 1
        assert vv.contiguous(origin) == prefix
        assert vv.highest(origin) == (counters[-1] if counters else 0)
        holes = [c for c in range(1, vv.highest(origin)) if c not in counters]
        from_gaps = [c for lo, hi in vv.gaps(origin) for c in range(lo, hi + 1)]
        assert from_gaps == holes
    assert len(vv) == len(model)
    assert set(vv) == model
    assert bool(vv) == bool(model)


def expand(ranges: dict[str, list[tuple[int, int]]]) -> set[Dot]:
    return {Dot(o, c) for o, rs in ranges.items() for lo, hi in rs for c in range(lo, hi + 1)}


@settings(max_examples=200, deadline=None)
@given(dot_lists)
def test_add_tracks_gaps(dots: list[Dot]) -> None:
    vv = VersionVector()
    model: set[Dot] = set()
    for d in dots:
        assert vv.add(d) == (d not in model)
        model.add(d)
    check_model(vv, model)
    assert VersionVector.from_wire(vv.to_wire()) == vv


@settings(max_examples=200, deadline=None)
@given(dot_lists, dot_lists)
def test_set_operations(xs: list[Dot], ys: list[Dot]) -> None:
    a, b = build(xs), build(ys)
    ma, mb = set(xs), set(ys)
    check_model(a.union(b), ma | mb)
    check_model(a.meet(b), ma & mb)
    check_model(a.difference(b), ma - mb)
    assert expand(a.missing_from(b)) == mb - ma
    assert a.dominates(b) == (ma >= mb)
    assert a.union(b) == b.union(a)
    assert a.meet(b) == b.meet(a)
    merged = a.copy()
    merged.merge(b)
    assert merged == a.union(b)
    assert a == build(xs)  # copy-on-union left the operands alone


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ORIGINS), st.integers(1, 20), st.integers(0, 10), dot_lists)
def test_add_range(origin: str, lo: int, span: int, dots: list[Dot]) -> None:
    vv = build(dots)
    vv.add_range(origin, lo, lo + span)
    check_model(vv, set(dots) | {Dot(origin, c) for c in range(lo, lo + span + 1)})


def test_next_counter_and_max_constructor() -> None:
    vv = VersionVector({"a": 3, "b": 0})
    assert vv.origins() == ["a"]
    assert vv.next_counter("a") == 4
    vv.add(Dot("a", 9))
    assert vv.next_counter("a") == 10
    assert vv.to_wire() == {"a": [3, [[9, 9]]]}
    assert "not a dot" not in vv
    assert VersionVector() != "x"


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {1: 2},
        {"": 1},
        {"a": -1},
        {"a": 1.5},
        {"a": True},
        {"a": [1]},
        {"a": [1, []]},
        {"a": [1, [[2, 3]]]},  # no hole above the prefix
        {"a": [0, [[3, 2]]]},
        {"a": [0, [[2, 3], [3, 4]]]},  # overlapping
        {"a": [0, [[5, 6], [2, 3]]]},  # unsorted
        {"a": [0, [[2, 3, 4]]]},
        {"a": [0, [["2", 3]]]},
        {"a": [0, [[2, 1 << 63]]]},
        {"a": [0, [[2, 10_000_000]]]},  # too many gap counters
        {"a": [0, "x"]},
    ],
)
def test_from_wire_rejects(bad: object) -> None:
    with pytest.raises(CrdtError):
        VersionVector.from_wire(bad)
