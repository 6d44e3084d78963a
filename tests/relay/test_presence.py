"""Device presence: the bdSeq rule, summaries and deltas, garbage and bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regional_relay._exceptions import PresenceError, RelayError
from regional_relay.presence import (
    UNKNOWN_BD,
    DevicePresence,
    PresenceTracker,
    decode_state,
    supersedes,
)
from sync._exceptions import NovaCronError, TopicError
from sync._msgpack_strict import packb, unpackb_strict


def birth(bd: int) -> bytes:
    return packb({"online": True, "bd": bd})


def death(bd: int) -> bytes:
    return packb({"online": False, "bd": bd})


# -- the bdSeq rule ------------------------------------------------------------------------


def test_late_death_of_old_session_is_ignored() -> None:
    t = PresenceTracker()
    assert t.observe_state("dev-1", birth(1), 100) is not None
    change = t.observe_state("dev-1", birth(2), 200)  # reconnected before the Will fired
    assert change is not None
    assert change.new_session
    assert change.was_online is True
    assert t.observe_state("dev-1", death(1), 300) is None  # the old session's Will
    state = t.get("dev-1")
    assert state == DevicePresence(online=True, bd=2, last_seen_ms=200, since_ms=200)
    assert t.counters().stale_deaths == 1
    assert t.online_count == 1
    assert t.offline_count == 0


def test_death_of_current_session_marks_offline() -> None:
    t = PresenceTracker()
    t.observe_state("d", birth(5), 100)
    change = t.observe_state("d", death(5), 400)
    assert change is not None
    assert (change.online, change.was_online, change.bd, change.new_session) == (
        False,
        True,
        5,
        False,
    )
    state = t.get("d")
    assert state is not None
    assert (state.online, state.last_seen_ms, state.since_ms) == (False, 100, 400)
    assert (t.online_count, t.offline_count) == (0, 1)


def test_stale_birth_is_ignored_and_counted() -> None:
    t = PresenceTracker()
    t.observe_state("d", death(7), 100)
    assert t.observe_state("d", birth(6), 200) is None
    assert t.get("d") == DevicePresence(False, 7, 0, 100)
    assert t.counters().stale_births == 1


def test_equal_bd_birth_wins_and_duplicates_are_counted() -> None:
    t = PresenceTracker()
    t.observe_state("d", death(3), 100)
    assert t.observe_state("d", birth(3), 200) is not None
    assert t.observe_state("d", birth(3), 300) is None
    c = t.counters()
    assert (c.births, c.deaths, c.duplicates) == (1, 1, 1)
    assert t.get("d") == DevicePresence(True, 3, 300, 200)  # a live duplicate is traffic


def test_retained_birth_does_not_move_last_seen() -> None:
    t = PresenceTracker()
    t.observe_state("d", birth(3), 1_000, retained=True)
    assert t.get("d") == DevicePresence(True, 3, 0, 1_000)
    t.observe_traffic("d", 1_500)
    state = t.get("d")
    assert state is not None
    assert state.last_seen_ms == 1_500


def test_traffic_first_then_state() -> None:
    t = PresenceTracker()
    change = t.observe_traffic("d", 50)
    assert change is not None
    assert (change.online, change.bd) == (True, UNKNOWN_BD)
    assert t.observe_traffic("d", 60) is None
    change = t.observe_state("d", death(4), 70)
    assert change is not None
    assert (change.online, change.previous_bd) == (False, UNKNOWN_BD)
    assert t.observe_traffic("d", 80) is None  # traffic never flips a known device
    state = t.get("d")
    assert state is not None
    assert (state.online, state.last_seen_ms) == (False, 80)


def test_supersedes() -> None:
    assert supersedes(3, 3)
    assert supersedes(3, 4)
    assert not supersedes(3, 2)
    assert supersedes(UNKNOWN_BD, 0)


@st.composite
def sessions_interleaved(draw: st.DrawFn) -> list[tuple[bool, int]]:
    """Births/deaths of increasing sessions, each session's birth before its death,
    delivered in any interleaving across sessions (late Wills anywhere later)."""
    bds = sorted(draw(st.sets(st.integers(0, 2**40), min_size=1, max_size=8)))
    per_session: list[list[tuple[bool, int]]] = []
    for bd in bds:
        kinds = draw(st.sampled_from([(True,), (False,), (True, False)]))
        per_session.append([(k, bd) for k in kinds])
    slots = [i for i, msgs in enumerate(per_session) for _ in msgs]
    slots = draw(st.permutations(slots))
    cursors = [0] * len(per_session)
    out = []
    for i in slots:
        out.append(per_session[i][cursors[i]])
        cursors[i] += 1
    return out


@settings(max_examples=200, deadline=None)
@given(sessions_interleaved())
def test_final_state_is_that_of_the_highest_session(messages: list[tuple[bool, int]]) -> None:
    t = PresenceTracker()
    top = -1
    top_died = False
    for step, (online, bd) in enumerate(messages):
        t.observe_state("dev", packb({"online": online, "bd": bd}), step)
        if bd > top:
            top, top_died = bd, False
        if bd == top and not online:
            top_died = True
        state = t.get("dev")
        assert state is not None
        assert state.bd == top
        # A live device (its highest session born, not dead) is never marked offline.
        assert state.online is (not top_died)
    assert t.online_count + t.offline_count == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=1, max_size=30))
def test_any_order_last_message_of_highest_bd_wins(messages: list[tuple[bool, int]]) -> None:
    t = PresenceTracker()
    stale = 0
    running = -1
    for step, (online, bd) in enumerate(messages):
        if bd < running:
            stale += 1
        running = max(running, bd)
        t.observe_state("dev", packb({"online": online, "bd": bd}), step)
        t.observe_traffic("dev", step)  # traffic never changes the online flag
    top = max(bd for _, bd in messages)
    expected_online = [online for online, bd in messages if bd == top][-1]
    state = t.get("dev")
    assert state is not None
    assert (state.online, state.bd) == (expected_online, top)
    c = t.counters()
    assert c.stale_births + c.stale_deaths == stale
    assert c.births + c.deaths + c.duplicates + stale == len(messages)


# -- summaries and deltas ------------------------------------------------------------------


def test_summary_shape_is_msgpack_friendly() -> None:
    t = PresenceTracker(epoch=9)
    t.observe_state("a", birth(1), 10)
    t.observe_state("b", death(2), 20)
    t.hub_reachable = True
    wire = t.summary(30)
    assert unpackb_strict(packb(wire)) == wire
    assert wire == {
        "v": 1,
        "epoch": 9,
        "at": 30,
        "hub_reachable": True,
        "since": 0,
        "cursor": 2,
        "more": False,
        "online": 1,
        "offline": 1,
        "devices": {"a": [1, 1, 10, 10], "b": [0, 2, 0, 20]},
    }
    t.hub_reachable = False
    assert t.summary(40)["hub_reachable"] is False


def test_deltas_list_only_changed_devices() -> None:
    t = PresenceTracker(seen_granularity_ms=1_000)
    for i in range(5):
        t.observe_state(f"d{i}", birth(1), 0)
    first = t.changes_since(0, 0)
    assert len(first.devices) == 5
    assert not first.more
    assert t.changes_since(first.cursor, 1).devices == {}
    t.observe_state("d3", death(1), 10)
    t.observe_traffic("d1", 500)  # below the granularity: not a change
    t.observe_traffic("d2", 1_000)  # at the granularity: a change
    delta = t.changes_since(first.cursor, 20)
    assert list(delta.devices) == ["d3", "d2"]
    assert delta.online == 4
    assert delta.offline == 1
    d1 = t.get("d1")
    assert d1 is not None
    assert d1.last_seen_ms == 500  # still tracked, just not a delta


def test_paging_and_foreign_cursor() -> None:
    t = PresenceTracker()
    for i in range(10):
        t.observe_state(f"d{i}", birth(1), i)
    seen: list[str] = []
    cursor = 0
    while True:
        page = t.changes_since(cursor, 100, limit=3)
        seen.extend(page.devices)
        assert len(page.devices) <= 3
        cursor = page.cursor
        if not page.more:
            break
    assert seen == [f"d{i}" for i in range(10)]
    everything = t.changes_since(10_000, 0, limit=None)  # cursor of another epoch
    assert everything.since == 0
    assert len(everything.devices) == 10
    with pytest.raises(ValueError, match="limit"):
        t.changes_since(0, 0, limit=0)


def test_log_compaction_keeps_deltas_right() -> None:
    t = PresenceTracker()
    t.observe_state("a", birth(0), 0)
    t.observe_state("b", birth(0), 0)
    mid = t.cursor
    for bd in range(1, 3_000):
        t.observe_state("a", birth(bd), bd)
    assert len(t._log_versions) < 2_000  # compacted
    delta = t.changes_since(mid, 0)
    assert list(delta.devices) == ["a"]
    assert delta.devices["a"].bd == 2_999
    assert set(t.changes_since(0, 0).devices) == {"a", "b"}


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["birth", "death", "traffic", "sync"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(0, 5),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_OPS, st.integers(1, 3))
def test_hub_replica_from_deltas_equals_tracker(ops: list[tuple[str, str, int]], page: int) -> None:
    """A hub applying every page from its acked cursor ends up with the same view."""
    t = PresenceTracker(seen_granularity_ms=0)
    replica: dict[str, list[int]] = {}
    cursor = 0

    def sync(now: int) -> int:
        c = cursor
        while True:
            report = t.changes_since(c, now, limit=page)
            replica.update({k: v.to_wire() for k, v in report.devices.items()})
            c = report.cursor
            if not report.more:
                return c

    for now, (op, device, bd) in enumerate(ops):
        if op == "birth":
            t.observe_state(device, birth(bd), now)
        elif op == "death":
            t.observe_state(device, death(bd), now)
        elif op == "traffic":
            t.observe_traffic(device, now)
        else:
            cursor = sync(now)
    cursor = sync(len(ops))
    assert replica == t.summary(0)["devices"]


# -- garbage and bounds --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x81",  # truncated map
        packb([True, 1]),
        packb({"online": 1, "bd": 1}),
        packb({"online": True, "bd": -1}),
        packb({"online": True, "bd": True}),
        packb({"online": True, "bd": 1.0}),
        packb({"online": True}),
        packb({"bd": 1}),
        packb({"online": True, "bd": 1, "x": [[[1]]]}),  # too deep for a state
        packb({"online": True, "bd": 1, "pad": "x" * 2_000}),  # oversize
        b"\xd4\x01\x00",  # ext type
        b"\x81\x01\xc3",  # int map key
        packb({"online": True, "bd": 1}) + b"\x00",  # trailing bytes
    ],
)
def test_garbage_payload_raises_typed_error(payload: bytes) -> None:
    t = PresenceTracker()
    t.observe_state("d", birth(3), 10)
    with pytest.raises(PresenceError) as info:
        t.observe_state("d", payload, 20)
    assert isinstance(info.value, RelayError)
    assert isinstance(info.value, NovaCronError)
    assert info.value.device == "d"
    assert info.value.reason in {"decode", "shape"}
    assert t.get("d") == DevicePresence(True, 3, 10, 10)
    assert t.counters().garbage == 1
    assert t.observe_state("d", death(3), 30) is not None  # still works


def test_garbage_for_unknown_device_tracks_nothing() -> None:
    t = PresenceTracker()
    with pytest.raises(PresenceError):
        t.observe_state("new", b"garbage", 0)
    assert "new" not in t
    assert len(t) == 0


def test_decode_state_ignores_extra_keys() -> None:
    assert decode_state(packb({"online": False, "bd": 2**64 - 1, "fw": "1.2"})) == (
        False,
        2**64 - 1,
    )


def test_invalid_device_id_is_refused() -> None:
    t = PresenceTracker()
    with pytest.raises(TopicError):
        t.observe_state("a/b", birth(1), 0)
    with pytest.raises(TopicError):
        t.observe_traffic("#", 0)


def test_device_cap_refuses_and_counts() -> None:
    t = PresenceTracker(max_devices=2)
    assert t.observe_state("a", birth(1), 0) is not None
    assert t.observe_traffic("b", 0) is not None
    assert t.observe_state("c", birth(1), 0) is None
    assert t.observe_traffic("d", 0) is None
    assert "c" not in t
    assert len(t) == 2
    assert t.counters().refused_devices == 2
    assert t.observe_state("a", death(1), 5) is not None  # known devices still tracked
    assert t.observe_state("b", birth(1), 5) is not None


def test_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_devices"):
        PresenceTracker(max_devices=0)
    with pytest.raises(ValueError, match="granularity"):
        PresenceTracker(seen_granularity_ms=-1)
