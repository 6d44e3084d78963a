"""Optional downsampling of metric streams: per-interval min / max / mean / count.

Pure and I/O-free; the relay passes the time in. Aggregation is an extra: raw
metric events are always forwarded to the hub, so anything this module drops
(late samples, bad values, overflow) is counted, never lost.

Windows are aligned to the interval: a sample at ``ts_ms`` falls in the window
starting at ``ts_ms - ts_ms % interval_ms``. :meth:`Downsampler.flush` closes every
window that ended at least ``grace_ms`` before ``now_ms`` and moves a
watermark past it; a later sample for a window before the watermark is late,
counted and dropped, so a window is never returned twice.

Metric events, as the agent journals them on stream ``"metrics"``::

    [kind, ts_ms, payload]      kind "metric"; payload msgpack {figure: number}
                                (cpu_pct, mem_used_mb, disk_used_pct, temp_c)

Aggregate wire shape (:meth:`Aggregate.to_wire`)::

    {"device": str, "start_ms": int, "interval_ms": int,
     "figures": {name: [min, max, mean, count]}}
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Self

from regional_relay._exceptions import AggregateError
from sync._exceptions import DecodeError
from sync._msgpack_strict import DecodeLimits, unpackb_strict

__all__ = [
    "DEFAULT_MAX_DEVICES",
    "DEFAULT_MAX_FIGURES",
    "DEFAULT_MAX_OPEN_WINDOWS",
    "METRIC_KIND",
    "Aggregate",
    "AggregateCounters",
    "Downsampler",
    "FigureStats",
    "decode_metric_event",
]

log = logging.getLogger(__name__)

METRIC_KIND: Final = "metric"
DEFAULT_MAX_OPEN_WINDOWS: Final = 4
DEFAULT_MAX_DEVICES: Final = 100_000
DEFAULT_MAX_FIGURES: Final = 32
MAX_FIGURE_NAME_LEN: Final = 64

_PAYLOAD_LIMITS: Final = DecodeLimits(
    max_size=16 * 1024, max_depth=2, max_items=256, max_str_len=1024, max_bin_len=1024
)


@dataclass(frozen=True, slots=True)
class FigureStats:
    """Statistics of one figure over one window.

    Attributes:
        min: smallest value.
        max: largest value.
        mean: arithmetic mean.
        count: number of values (at least 1).
    """

    min: float
    max: float
    mean: float
    count: int

    def to_wire(self) -> list[float | int]:
        """Return ``[min, max, mean, count]``."""
        return [self.min, self.max, self.mean, self.count]


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One closed window of one device's metrics.

    Attributes:
        device: the device id.
        start_ms: window start, a multiple of ``interval_ms``.
        interval_ms: window length.
        figures: per figure name, its statistics over the window.
    """

    device: str
    start_ms: int
    interval_ms: int
    figures: Mapping[str, FigureStats] = field(default_factory=dict)

    @property
    def end_ms(self) -> int:
        """Window end (exclusive)."""
        return self.start_ms + self.interval_ms

    def to_wire(self) -> dict[str, object]:
        """Return the msgpack-friendly form (see the module docstring)."""
        return {
            "device": self.device,
            "start_ms": self.start_ms,
            "interval_ms": self.interval_ms,
            "figures": {name: stats.to_wire() for name, stats in self.figures.items()},
        }

    @classmethod
    def from_wire(cls, obj: object) -> Self:
        """Validate and rebuild an aggregate from :meth:`to_wire` output.

        Raises:
            AggregateError: ``obj`` does not have the wire shape.
        """
        if type(obj) is not dict or set(obj) != {"device", "start_ms", "interval_ms", "figures"}:
            raise AggregateError("aggregate is not a map with the expected keys", reason="shape")
        device, start, interval, raw = (
            obj["device"],
            obj["start_ms"],
            obj["interval_ms"],
            obj["figures"],
        )
        if type(device) is not str or type(start) is not int or type(interval) is not int:
            raise AggregateError("aggregate device/start_ms/interval_ms mistyped", reason="shape")
        if interval < 1 or start % interval or type(raw) is not dict:
            raise AggregateError("aggregate window or figures invalid", reason="shape")
        figures: dict[str, FigureStats] = {}
        for name, stats in raw.items():
            if type(stats) is not list or len(stats) != 4:
                raise AggregateError(
                    f"figure {name!r} is not [min, max, mean, count]", reason="shape"
                )
            lo, hi, mean, count = stats
            if (
                type(count) is not int
                or count < 1
                or not all(_is_number(v) for v in (lo, hi, mean))
            ):
                raise AggregateError(f"figure {name!r} has invalid statistics", reason="shape")
            figures[name] = FigureStats(float(lo), float(hi), float(mean), count)
        return cls(device, start, interval, figures)


@dataclass(frozen=True, slots=True)
class AggregateCounters:
    """Counters for ``/metrics``-style export; all monotonic.

    Attributes:
        samples: samples aggregated (at least one figure taken).
        values: figure values aggregated.
        late: samples dropped because their window was already flushed.
        bad_values: figure values skipped (not a finite int or float, bool
            included, or a name that is not a short str).
        bad_events: events that could not be decoded (garbage payload, not a
            metric, bad timestamp).
        window_overflow: samples dropped because their device already had
            ``max_open_windows`` open windows.
        device_overflow: samples dropped because ``max_devices`` devices had
            open windows.
        figure_overflow: values dropped because their window already held
            ``max_figures`` figures.
        windows_flushed: windows returned by :meth:`Downsampler.flush`.
    """

    samples: int = 0
    values: int = 0
    late: int = 0
    bad_values: int = 0
    bad_events: int = 0
    window_overflow: int = 0
    device_overflow: int = 0
    figure_overflow: int = 0
    windows_flushed: int = 0


def _is_number(value: object) -> bool:
    return (type(value) is float and math.isfinite(value)) or type(value) is int


def decode_metric_event(item: object) -> tuple[int, dict[str, object]]:
    """Decode a metric event ``[kind, ts_ms, payload]`` of the ``metrics`` stream.

    Args:
        item: the event as carried in a stream delta.

    Returns:
        ``(ts_ms, figures)``; figure values are not checked here (see
        :meth:`Downsampler.add`).

    Raises:
        AggregateError: not a metric event, or garbage (``reason`` says which).
    """
    if type(item) is not list or len(item) != 3:
        raise AggregateError("event is not [kind, ts_ms, payload]", reason="shape")
    kind, ts, payload = item
    if kind != METRIC_KIND:
        raise AggregateError(f"event kind {kind!r} is not a metric", reason="kind")
    if type(ts) is not int:
        raise AggregateError("event ts_ms is not an int", reason="shape")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise AggregateError("event payload is not bytes", reason="shape")
    try:
        figures = unpackb_strict(payload, limits=_PAYLOAD_LIMITS)
    except DecodeError as exc:
        raise AggregateError(f"metric payload: {exc}", reason="decode") from exc
    if type(figures) is not dict:
        raise AggregateError("metric payload is not a map", reason="shape")
    return ts, figures


class _Acc:
    """Running statistics of one figure in one window."""

    __slots__ = ("count", "hi", "lo", "mean")

    def __init__(self, value: float) -> None:
        self.lo = self.hi = self.mean = value
        self.count = 1

    def add(self, value: float) -> None:
        self.count += 1
        self.lo = min(self.lo, value)
        self.hi = max(self.hi, value)
        # Incremental mean: no running sum that could overflow.
        self.mean += (value - self.mean) / self.count

    def stats(self) -> FigureStats:
        # Rounding can push the incremental mean a hair outside [lo, hi].
        return FigureStats(self.lo, self.hi, min(max(self.mean, self.lo), self.hi), self.count)


class Downsampler:
    """Per-device, per-interval aggregation of metric figures.

    Args:
        interval_ms: window length.
        grace_ms: how long after its end a window stays open for samples that
            arrive late (agents buffer while their link is down).
        max_open_windows: most open windows per device; a sample that would
            open another is dropped and counted.
        max_devices: most devices with open windows; counted likewise.
        max_figures: most figures per window; further names are counted.

    Raises:
        ValueError: a bound is not positive, or ``grace_ms`` is negative.
    """

    def __init__(
        self,
        interval_ms: int,
        *,
        grace_ms: int = 0,
        max_open_windows: int = DEFAULT_MAX_OPEN_WINDOWS,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_figures: int = DEFAULT_MAX_FIGURES,
    ) -> None:
        if type(interval_ms) is not int or interval_ms < 1:
            raise ValueError("interval_ms must be a positive int")
        if grace_ms < 0:
            raise ValueError("grace_ms must not be negative")
        if min(max_open_windows, max_devices, max_figures) < 1:
            raise ValueError("bounds must be positive")
        self.interval_ms = interval_ms
        self.grace_ms = grace_ms
        self.max_open_windows = max_open_windows
        self.max_devices = max_devices
        self.max_figures = max_figures
        self._open: dict[str, dict[int, dict[str, _Acc]]] = {}
        self._heap: list[tuple[int, str]] = []  # (start_ms, device) of every open window
        self._watermark: int | None = None  # windows starting before it are closed
        self._samples = self._values = self._late = self._bad_values = 0
        self._bad_events = self._window_overflow = self._device_overflow = 0
        self._figure_overflow = self._flushed = 0

    @property
    def watermark_ms(self) -> int | None:
        """Windows starting before this are closed (None before the first flush)."""
        return self._watermark

    @property
    def open_windows(self) -> int:
        """Open windows over all devices."""
        return len(self._heap)

    def counters(self) -> AggregateCounters:
        """Return a snapshot of the counters."""
        return AggregateCounters(
            samples=self._samples,
            values=self._values,
            late=self._late,
            bad_values=self._bad_values,
            bad_events=self._bad_events,
            window_overflow=self._window_overflow,
            device_overflow=self._device_overflow,
            figure_overflow=self._figure_overflow,
            windows_flushed=self._flushed,
        )

    def add(self, device: str, ts_ms: int, figures: Mapping[str, object]) -> bool:
        """Add one sample.

        Args:
            device: the device id.
            ts_ms: the sample's timestamp (the agent's clock).
            figures: figure name to value; values that are not finite numbers
                (bools included) are skipped and counted.

        Returns:
            True if at least one value was aggregated.
        """
        start = ts_ms - ts_ms % self.interval_ms
        if self._watermark is not None and start < self._watermark:
            self._late += 1
            return False
        good: list[tuple[str, float]] = []
        for name, value in figures.items():
            if (
                type(name) is str
                and 0 < len(name) <= MAX_FIGURE_NAME_LEN
                and (type(value) is int or (type(value) is float and math.isfinite(value)))
            ):
                good.append((name, float(value)))
            else:
                self._bad_values += 1
        if not good:
            return False
        windows = self._open.get(device)
        if windows is None:
            if len(self._open) >= self.max_devices:
                self._device_overflow += 1
                return False
            windows = self._open[device] = {}
        window = windows.get(start)
        if window is None:
            if len(windows) >= self.max_open_windows:
                self._window_overflow += 1
                return False
            window = windows[start] = {}
            heapq.heappush(self._heap, (start, device))
        taken = 0
        for name, value in good:
            acc = window.get(name)
            if acc is not None:
                acc.add(value)
            elif len(window) < self.max_figures:
                window[name] = _Acc(value)
            else:
                self._figure_overflow += 1
                continue
            taken += 1
        if not taken:
            return False
        self._samples += 1
        self._values += taken
        return True

    def add_event(self, device: str, item: object) -> bool:
        """Add a metric event ``[kind, ts_ms, payload]`` (see the module docstring).

        Garbage and non-metric events are counted as ``bad_events`` and
        otherwise ignored: aggregation never stops the raw forwarding.

        Returns:
            True if at least one value was aggregated.
        """
        try:
            ts, figures = decode_metric_event(item)
        except AggregateError as exc:
            self._bad_events += 1
            log.debug("metric event of %s not aggregated: %s", device, exc)
            return False
        return self.add(device, ts, figures)

    def flush(self, now_ms: int) -> list[Aggregate]:
        """Close and return every window that ended ``grace_ms`` or more ago.

        Args:
            now_ms: the current time (the relay's clock).

        Returns:
            The closed windows, ordered by start then device; each window is
            returned once only.
        """
        limit = now_ms - self.grace_ms
        watermark = limit - limit % self.interval_ms
        if self._watermark is not None and watermark <= self._watermark:
            watermark = self._watermark
        self._watermark = watermark
        out: list[Aggregate] = []
        heap = self._heap
        while heap and heap[0][0] < watermark:
            start, device = heapq.heappop(heap)
            windows = self._open[device]
            accs = windows.pop(start)
            if not windows:
                del self._open[device]
            out.append(
                Aggregate(
                    device,
                    start,
                    self.interval_ms,
                    {name: acc.stats() for name, acc in accs.items()},
                )
            )
        self._flushed += len(out)
        return out
