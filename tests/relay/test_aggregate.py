"""Metric downsampling: windows, statistics, late samples, bad values and bounds."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regional_relay._exceptions import AggregateError
from regional_relay.aggregate import (
    Aggregate,
    Downsampler,
    FigureStats,
    decode_metric_event,
)
from sync._msgpack_strict import packb, unpackb_strict

GOOD_VALUES = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
)
BAD_VALUES = st.sampled_from([None, "12", True, False, math.nan, math.inf, -math.inf, [1.0]])
FIGURES = st.dictionaries(
    st.sampled_from(["cpu_pct", "mem_used_mb", "disk_used_pct", "temp_c"]),
    st.one_of(GOOD_VALUES, GOOD_VALUES, GOOD_VALUES, BAD_VALUES),
    max_size=4,
)
SAMPLE = st.tuples(
    st.just("add"), st.sampled_from(["g1", "g2", "g3"]), st.integers(0, 5_000), FIGURES
)
FLUSH: st.SearchStrategy[tuple[str, str, int, dict[str, object]]] = st.tuples(
    st.just("flush"), st.just(""), st.integers(0, 6_000), st.just({})
)


def _good(value: object) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(SAMPLE, SAMPLE, SAMPLE, FLUSH), max_size=80),
    st.integers(1, 2_000),
    st.integers(0, 1_000),
)
def test_windows_match_a_reference_computation(
    ops: list[tuple[str, str, int, dict[str, object]]], interval: int, grace: int
) -> None:
    ds = Downsampler(interval, grace_ms=grace, max_open_windows=10_000)
    reference: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    watermark: int | None = None
    late = bad = 0
    emitted: list[Aggregate] = []

    def flush(now: int) -> None:
        nonlocal watermark
        out = ds.flush(now)
        limit = now - grace
        aligned = limit - limit % interval
        watermark = aligned if watermark is None else max(watermark, aligned)
        for agg in out:
            assert agg.start_ms % interval == 0
            assert agg.end_ms <= now - grace  # only windows that have ended
        emitted.extend(out)

    for op, device, ts, figures in ops:
        if op == "flush":
            flush(ts)
            continue
        start = ts - ts % interval
        if watermark is not None and start < watermark:
            late += 1
            ds.add(device, ts, figures)
            continue
        for name, value in figures.items():
            if _good(value):
                reference[device, start][name].append(float(value))  # type: ignore[arg-type]
            else:
                bad += 1
        ds.add(device, ts, figures)
    flush(10**9)
    assert ds.open_windows == 0

    keys = [(a.device, a.start_ms) for a in emitted]
    assert len(keys) == len(set(keys)), "a window was returned twice"
    expected = {k: dict(v) for k, v in reference.items() if v}
    assert set(keys) == set(expected)
    for agg in emitted:
        want = expected[agg.device, agg.start_ms]
        assert set(agg.figures) == set(want)
        for name, values in want.items():
            stats = agg.figures[name]
            assert stats.count == len(values)
            assert stats.min == min(values)
            assert stats.max == max(values)
            assert math.isclose(
                stats.mean, math.fsum(values) / len(values), rel_tol=1e-9, abs_tol=1e-6
            )
            assert stats.min <= stats.mean <= stats.max
        assert unpackb_strict(packb(agg.to_wire())) == agg.to_wire()
        assert Aggregate.from_wire(agg.to_wire()) == agg
    c = ds.counters()
    assert (c.late, c.bad_values, c.windows_flushed) == (late, bad, len(emitted))
    assert c.values == sum(len(v) for w in expected.values() for v in w.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 12_000)), max_size=40))
def test_flush_never_returns_a_window_twice(samples: list[tuple[int, int]]) -> None:
    ds = Downsampler(1_000)
    seen: set[tuple[str, int]] = set()
    for ts, now in samples:
        ds.add("g", ts, {"cpu_pct": 1.0})
        for agg in ds.flush(now):
            key = (agg.device, agg.start_ms)
            assert key not in seen
            seen.add(key)


def test_basic_window() -> None:
    ds = Downsampler(1_000)
    assert ds.add("g", 1_000, {"cpu_pct": 10, "temp_c": 40.0})
    assert ds.add("g", 1_999, {"cpu_pct": 30.0})
    assert ds.add("g", 2_000, {"cpu_pct": 99.0})
    assert ds.flush(1_999) == []
    (agg,) = ds.flush(2_000)
    assert agg == Aggregate(
        "g",
        1_000,
        1_000,
        {"cpu_pct": FigureStats(10.0, 30.0, 20.0, 2), "temp_c": FigureStats(40.0, 40.0, 40.0, 1)},
    )
    assert agg.to_wire() == {
        "device": "g",
        "start_ms": 1_000,
        "interval_ms": 1_000,
        "figures": {"cpu_pct": [10.0, 30.0, 20.0, 2], "temp_c": [40.0, 40.0, 40.0, 1]},
    }
    assert ds.open_windows == 1
    assert ds.watermark_ms == 2_000


def test_late_sample_is_counted_and_dropped() -> None:
    ds = Downsampler(1_000)
    ds.add("g", 500, {"cpu_pct": 1.0})
    assert len(ds.flush(1_000)) == 1
    assert not ds.add("g", 999, {"cpu_pct": 2.0})
    assert not ds.add("other", 10, {"cpu_pct": 2.0})  # before the watermark, any device
    assert ds.flush(5_000) == []
    assert ds.counters().late == 2
    assert ds.flush(100) == []  # time going backwards never reopens a window
    assert ds.watermark_ms == 5_000


def test_grace_keeps_a_window_open() -> None:
    ds = Downsampler(1_000, grace_ms=500)
    ds.add("g", 100, {"cpu_pct": 1.0})
    assert ds.flush(1_400) == []
    assert ds.add("g", 900, {"cpu_pct": 3.0})
    (agg,) = ds.flush(1_500)
    assert agg.figures["cpu_pct"] == FigureStats(1.0, 3.0, 2.0, 2)


def test_bad_values_are_skipped_and_counted() -> None:
    ds = Downsampler(1_000)
    assert not ds.add(
        "g",
        0,
        {"a": math.nan, "b": math.inf, "c": -math.inf, "d": "1", "e": None, "f": True},
    )
    assert not ds.add("g", 0, {"x" * 65: 1.0, "": 2.0})
    assert ds.add("g", 0, {"cpu_pct": 5, "temp_c": math.nan})
    (agg,) = ds.flush(1_000)
    assert set(agg.figures) == {"cpu_pct"}
    c = ds.counters()
    assert (c.bad_values, c.samples, c.values) == (9, 1, 1)


def test_open_windows_per_device_are_capped() -> None:
    ds = Downsampler(1_000, max_open_windows=2)
    assert ds.add("g", 0, {"cpu_pct": 1.0})
    assert ds.add("g", 1_000, {"cpu_pct": 1.0})
    assert not ds.add("g", 2_000, {"cpu_pct": 1.0})
    assert ds.add("g", 1_500, {"cpu_pct": 1.0})  # an open window still takes samples
    assert ds.add("h", 2_000, {"cpu_pct": 1.0})  # the cap is per device
    assert ds.counters().window_overflow == 1
    ds.flush(1_000)
    assert ds.add("g", 2_000, {"cpu_pct": 1.0})  # room again after a flush


def test_devices_and_figures_are_capped() -> None:
    ds = Downsampler(1_000, max_devices=1, max_figures=2)
    assert ds.add("g", 0, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert ds.add("g", 0, {"c": 3.0, "a": 4.0})
    assert not ds.add("h", 0, {"a": 1.0})
    c = ds.counters()
    assert (c.device_overflow, c.figure_overflow) == (1, 2)
    (agg,) = ds.flush(1_000)
    assert set(agg.figures) == {"a", "b"}
    assert ds.add("h", 1_000, {"a": 1.0})  # the device slot was freed by the flush


def test_add_event_decodes_metric_events() -> None:
    ds = Downsampler(1_000)
    assert ds.add_event("g", ["metric", 10, packb({"cpu_pct": 12.5, "mem_used_mb": 300.1})])
    for item in (
        ["workload", 10, packb({"cpu_pct": 1.0})],  # not a metric
        ["metric", 10, b"\xc1"],  # garbage payload
        ["metric", 10, packb([1.0])],  # not a map
        ["metric", "10", packb({"cpu_pct": 1.0})],  # bad ts
        ["metric", 10, "not bytes"],
        ["metric", 10],
        None,
    ):
        assert not ds.add_event("g", item)
    assert ds.counters().bad_events == 7
    (agg,) = ds.flush(1_000)
    assert agg.figures["mem_used_mb"] == FigureStats(300.1, 300.1, 300.1, 1)


def test_decode_metric_event_reasons() -> None:
    with pytest.raises(AggregateError) as info:
        decode_metric_event(["metric", 1, b"\xc1"])
    assert info.value.reason == "decode"
    with pytest.raises(AggregateError) as info:
        decode_metric_event(["event", 1, packb({})])
    assert info.value.reason == "kind"
    assert decode_metric_event(["metric", 7, packb({"temp_c": 41})]) == (7, {"temp_c": 41})


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        {"device": "g", "start_ms": 0, "interval_ms": 1_000},
        {"device": "g", "start_ms": 5, "interval_ms": 1_000, "figures": {}},
        {"device": "g", "start_ms": 0, "interval_ms": 0, "figures": {}},
        {"device": 1, "start_ms": 0, "interval_ms": 1_000, "figures": {}},
        {"device": "g", "start_ms": 0, "interval_ms": 1_000, "figures": {"a": [1.0, 1.0, 1.0]}},
        {"device": "g", "start_ms": 0, "interval_ms": 1_000, "figures": {"a": [1, 1, 1, 0]}},
        {"device": "g", "start_ms": 0, "interval_ms": 1_000, "figures": {"a": ["1", 1, 1, 1]}},
        {"device": "g", "start_ms": 0, "interval_ms": 1_000, "figures": {"a": [1, 1, math.nan, 1]}},
    ],
)
def test_from_wire_rejects_bad_shapes(wire: object) -> None:
    with pytest.raises(AggregateError):
        Aggregate.from_wire(wire)


def test_bad_configuration() -> None:
    for kwargs in ({"max_open_windows": 0}, {"max_devices": 0}, {"max_figures": 0}):
        with pytest.raises(ValueError, match="bounds"):
            Downsampler(1_000, **kwargs)
    with pytest.raises(ValueError, match="interval"):
        Downsampler(0)
    with pytest.raises(ValueError, match="grace"):
        Downsampler(1_000, grace_ms=-1)
