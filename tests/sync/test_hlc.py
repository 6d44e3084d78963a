"""Hybrid logical clock: packing, monotonicity, skew bound, counter overflow."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sync._exceptions import ClockSkewError, CrdtError
from sync.hlc import (
    MAX_COUNTER,
    MAX_PHYSICAL_MS,
    HybridLogicalClock,
    SystemClock,
    pack_ts,
    unpack_ts,
)
from sync.testing import ManualClock

START = 1_700_000_000_000
SKEW = 300_000


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX_PHYSICAL_MS), st.integers(0, MAX_COUNTER))
def test_pack_unpack_roundtrip(ms: int, counter: int) -> None:
    ts = pack_ts(ms, counter)
    assert ts == ms << 16 | counter
    assert unpack_ts(ts) == (ms, counter)


@pytest.mark.parametrize(
    ("ms", "counter"), [(-1, 0), (MAX_PHYSICAL_MS + 1, 0), (0, -1), (0, 65536)]
)
def test_pack_rejects_out_of_range(ms: int, counter: int) -> None:
    with pytest.raises(CrdtError):
        pack_ts(ms, counter)


@pytest.mark.parametrize("bad", [-1, 1 << 64, "1", 1.0, True])
def test_unpack_and_update_reject_invalid(bad: object) -> None:
    with pytest.raises(CrdtError):
        unpack_ts(bad)  # type: ignore[arg-type]
    hlc = HybridLogicalClock(ManualClock(START))
    with pytest.raises(CrdtError):
        hlc.update(bad)  # type: ignore[arg-type]


def test_now_follows_wall_clock() -> None:
    clock = ManualClock(START)
    hlc = HybridLogicalClock(clock)
    assert hlc.now() == pack_ts(START, 0)
    assert hlc.now() == pack_ts(START, 1)
    clock.advance(5)
    assert hlc.now() == pack_ts(START + 5, 0)


def test_backward_jump_keeps_monotonic() -> None:
    clock = ManualClock(START)
    hlc = HybridLogicalClock(clock)
    first = hlc.now()
    clock.advance(-60_000)
    second = hlc.now()
    assert second > first
    assert unpack_ts(second) == (START, 1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["now", "update", "jump"]),
            st.integers(-400_000, 400_000),
            st.integers(0, MAX_COUNTER),
        ),
        max_size=60,
    )
)
@example([("now", 0, 0), ("jump", -1_000_001, 0), ("now", 0, 0)])  # clock stepped back
def test_monotonic_and_skew_bounded(ops: list[tuple[str, int, int]]) -> None:
    clock = ManualClock(START)
    hlc = HybridLogicalClock(clock, max_skew_ms=SKEW)
    last = 0
    rejected = 0
    seen = peak = START
    for kind, delta_ms, counter in ops:
        if kind == "jump":
            clock.advance(delta_ms)
            continue
        if kind == "now":
            ts = hlc.now()
        else:
            remote = pack_ts(max(clock.now_ms() + delta_ms, 0), counter)
            before = hlc.last
            try:
                ts = hlc.update(remote)
            except ClockSkewError as exc:
                rejected += 1
                assert delta_ms > SKEW
                assert exc.max_skew_ms == SKEW
                assert hlc.last == before
                continue
            assert ts > remote
        assert ts > last
        # Never behind the wall clock, and never ahead of the largest physical
        # time it saw (local or accepted remote) by more than an overflow carry.
        seen = max(seen, clock.now_ms())
        if kind == "update":
            seen = max(seen, unpack_ts(remote)[0])
        assert unpack_ts(ts)[0] >= clock.now_ms()
        assert unpack_ts(ts)[0] <= seen + 1
        # Ahead of the wall clock's peak by at most the accepted skew: a clock that
        # stepped back leaves the HLC at its old time (monotonic), never further.
        peak = max(peak, clock.now_ms())
        assert unpack_ts(ts)[0] <= peak + SKEW + 1
        last = ts
    assert hlc.skew_rejections == rejected


def test_skew_boundary() -> None:
    clock = ManualClock(START)
    hlc = HybridLogicalClock(clock, max_skew_ms=SKEW)
    ok = pack_ts(START + SKEW, 7)
    assert hlc.update(ok) == ok + 1
    with pytest.raises(ClockSkewError) as info:
        hlc.update(pack_ts(START + SKEW + 1, 0))
    assert info.value.remote_ms == START + SKEW + 1
    assert info.value.local_ms == START
    assert hlc.skew_rejections == 1
    with pytest.raises(ClockSkewError):
        hlc.update(pack_ts(START + 10 * SKEW, 0))
    assert hlc.skew_rejections == 2
    assert hlc.last == ok + 1  # refused timestamps leave the clock where it was


def test_gateway_booted_in_2040_cannot_win() -> None:
    hlc = HybridLogicalClock(ManualClock(START))
    in_2040 = pack_ts(2_208_988_800_000, 0)
    with pytest.raises(ClockSkewError):
        hlc.update(in_2040)
    assert hlc.now() < in_2040


def test_observe_clamps_at_the_skew_bound_and_counts() -> None:
    clock = ManualClock(START)
    hlc = HybridLogicalClock(clock, max_skew_ms=SKEW)
    assert hlc.observe(pack_ts(START + SKEW, 7))
    assert hlc.last == pack_ts(START + SKEW, 7)
    assert hlc.skew_clamped == 0
    in_2040 = pack_ts(2_208_988_800_000, 0)
    assert not hlc.observe(in_2040)
    assert hlc.skew_clamped == 1
    assert hlc.last == pack_ts(START + SKEW, MAX_COUNTER)
    held = hlc.now()
    assert held < in_2040
    # An old timestamp never moves the clock back.
    assert hlc.observe(pack_ts(START - 1, 0))
    assert hlc.last == held
    with pytest.raises(CrdtError):
        hlc.observe(-1)


def test_adopt_takes_own_history_back_whatever_the_skew() -> None:
    hlc = HybridLogicalClock(ManualClock(START), max_skew_ms=SKEW)
    written_when_ahead = pack_ts(START + 100 * SKEW, 3)
    hlc.adopt(written_when_ahead)
    assert hlc.now() == written_when_ahead + 1
    hlc.adopt(pack_ts(START, 0))  # older: no effect
    assert hlc.last == written_when_ahead + 1
    assert (hlc.skew_rejections, hlc.skew_clamped) == (0, 0)
    with pytest.raises(CrdtError):
        hlc.adopt(1 << 64)


def test_counter_overflow_advances_physical() -> None:
    clock = ManualClock(START)
    hlc = HybridLogicalClock(clock, last=pack_ts(START, MAX_COUNTER - 1))
    assert hlc.now() == pack_ts(START, MAX_COUNTER)
    assert hlc.now() == pack_ts(START + 1, 0)
    assert hlc.now() == pack_ts(START + 1, 1)
    clock.advance(2)
    assert hlc.now() == pack_ts(START + 2, 0)


def test_update_overflow() -> None:
    hlc = HybridLogicalClock(ManualClock(START))
    assert hlc.update(pack_ts(START, MAX_COUNTER)) == pack_ts(START + 1, 0)


def test_many_events_in_one_millisecond() -> None:
    hlc = HybridLogicalClock(ManualClock(START))
    stamps = [hlc.now() for _ in range(MAX_COUNTER + 10)]
    assert stamps == sorted(set(stamps))
    assert unpack_ts(stamps[-1]) == (START + 1, 8)


def test_clock_out_of_range_is_clamped() -> None:
    assert HybridLogicalClock(ManualClock(-5)).now() == 1  # 0 is the initial `last`
    assert HybridLogicalClock(ManualClock(MAX_PHYSICAL_MS + 9)).now() == pack_ts(MAX_PHYSICAL_MS, 0)


def test_constructor_validation_and_system_clock() -> None:
    with pytest.raises(ValueError, match="max_skew_ms"):
        HybridLogicalClock(ManualClock(), max_skew_ms=-1)
    with pytest.raises(CrdtError):
        HybridLogicalClock(ManualClock(), last=-1)
    assert SystemClock().now_ms() > START
