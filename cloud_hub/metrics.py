"""``/metrics``: the hub's state in the Prometheus text exposition format (0.0.4).

Families (all prefixed ``novacron_hub_``):

* ``devices{status}`` (gauge): devices per stored health state
  (:meth:`cloud_hub.store.Store.count_devices`);
* ``ingest_<key>_total`` (counter) or ``ingest_<key>`` (gauge, for
  :data:`GAUGE_KEYS`): each entry of the stats provider (the reconciler's
  ingest figures and the controller's counters): a number or boolean, a
  mapping of them (label ``reason`` for :data:`REASON_KEYS` such as
  ``ingest_rejected_total{reason}``, else ``key``), or a mapping of mappings
  (labels ``key`` and ``counter``);
* ``rollout_phase{deployment,phase}`` (gauge, 1), ``rollout_targets``,
  ``rollout_succeeded``, ``rollout_failed``, ``rollout_skipped``,
  ``rollout_wave`` (gauges per deployment): rollout progress;
* ``api_requests_total{method,route,status}`` (counter): API calls;
* ``events_published_total``, ``events_dropped_total``, ``event_subscribers``.

:func:`render` is pure; the app gathers its inputs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cloud_hub._exceptions import RolloutDecodeError
from cloud_hub.rollout import Rollout
from cloud_hub.store import RolloutRecord

__all__ = [
    "CONTENT_TYPE",
    "GAUGE_KEYS",
    "REASON_KEYS",
    "RequestCounter",
    "Sample",
    "escape_label",
    "render",
    "rollout_samples",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
PREFIX: Final = "novacron_hub_"
_NAME_RE: Final = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class RequestCounter:
    """API calls by (method, route pattern, status); bounded by the route table."""

    counts: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def add(self, method: str, route: str, status: int) -> None:
        """Count one call."""
        self.counts[(method, route, status)] += 1


@dataclass(frozen=True, slots=True)
class Sample:
    """One line: family name (without prefix), labels, value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def escape_label(value: str) -> str:
    """Escape a label value for the text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric_name(key: str) -> str:
    return _NAME_RE.sub("_", key).strip("_").lower() or "unnamed"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        return None
    return float(value)


GAUGE_KEYS: Final = frozenset({"queue_depth", "devices", "connected", "held", "relays_online"})
"""Stats entries that are levels, not counts (exposed as gauges without ``_total``)."""
REASON_KEYS: Final = frozenset({"rejected", "refused", "uplink_rejected"})
"""Stats mappings keyed by a reason (label ``reason``; other mappings use ``key``)."""


def _stats_samples(stats: Mapping[str, Any]) -> list[tuple[Sample, str, str]]:
    """Samples of the stats provider's entries: numbers and booleans, or mappings of
    them (one label), or mappings of mappings (a second label, ``counter``)."""
    out: list[tuple[Sample, str, str]] = []
    for key, value in sorted(stats.items()):
        gauge = key in GAUGE_KEYS
        name = f"ingest_{_metric_name(key)}" + ("" if gauge else "_total")
        kind, text = ("gauge", f"Hub {key}.") if gauge else ("counter", f"Hub {key} count.")
        if not isinstance(value, Mapping):
            num = _number(value)
            if num is not None:
                out.append((Sample(name, (), num), kind, text))
            continue
        label = "reason" if key in REASON_KEYS else "key"
        for sub, inner in sorted(value.items(), key=lambda kv: str(kv[0])):
            if isinstance(inner, Mapping):
                for counter, n in sorted(inner.items(), key=lambda kv: str(kv[0])):
                    num = _number(n)
                    if num is not None:
                        labels = ((label, str(sub)), ("counter", str(counter)))
                        out.append((Sample(name, labels, num), kind, text))
            elif (num := _number(inner)) is not None:
                out.append((Sample(name, ((label, str(sub)),), num), kind, text))
    return out


def _format_value(number: float) -> str:
    value = float(number)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def rollout_samples(rollouts: Iterable[RolloutRecord]) -> list[Sample]:
    """Rollout progress samples from the stored rollout states.

    A state that cannot be restored (:class:`~cloud_hub._exceptions.RolloutDecodeError`)
    shows only its phase.
    """
    out: list[Sample] = []
    for r in rollouts:
        dep = (("deployment", r.deployment),)
        out.append(Sample("rollout_phase", (*dep, ("phase", r.phase)), 1))
        try:
            status = Rollout.from_dict(r.state).status()
        except RolloutDecodeError:
            continue
        out += [
            Sample("rollout_targets", dep, sum(w.size for w in status.waves)),
            Sample("rollout_succeeded", dep, status.succeeded),
            Sample("rollout_failed", dep, status.failures),
            Sample("rollout_skipped", dep, status.skipped),
        ]
        if status.current_wave is not None:
            out.append(Sample("rollout_wave", dep, status.current_wave))
    return out


_HELP: Final = {
    "devices": ("gauge", "Enrolled devices by health status."),
    "rollout_phase": ("gauge", "Current rollout phase of each deployment (1)."),
    "rollout_targets": ("gauge", "Devices a rollout targets."),
    "rollout_succeeded": ("gauge", "Devices running a rollout's version healthy."),
    "rollout_failed": ("gauge", "Devices that failed a rollout's version."),
    "rollout_skipped": ("gauge", "Devices skipped by a rollout for being offline."),
    "rollout_wave": ("gauge", "Index of a rollout's current wave."),
    "api_requests_total": ("counter", "API requests by method, route and status."),
    "events_published_total": ("counter", "Fleet events published."),
    "events_dropped_total": ("counter", "Fleet events dropped for slow subscribers."),
    "event_subscribers": ("gauge", "Open event-stream subscribers."),
}


def render(
    *,
    device_counts: Mapping[Any, int],
    ingest: Mapping[str, Any],
    rollouts: Iterable[RolloutRecord],
    requests: RequestCounter,
    events_published: int,
    events_dropped: int,
    event_subscribers: int,
) -> str:
    """Render every family as Prometheus text."""
    samples: list[Sample] = [
        Sample("devices", (("status", status),), n) for status, n in sorted(device_counts.items())
    ]
    types: dict[str, tuple[str, str]] = dict(_HELP)
    for sample, kind, text in _stats_samples(ingest):
        types[sample.name] = (kind, text)
        samples.append(sample)
    samples.extend(rollout_samples(rollouts))
    samples.extend(
        Sample(
            "api_requests_total",
            (("method", method), ("route", route), ("status", str(status))),
            n,
        )
        for (method, route, status), n in sorted(requests.counts.items())
    )
    samples += [
        Sample("events_published_total", (), events_published),
        Sample("events_dropped_total", (), events_dropped),
        Sample("event_subscribers", (), event_subscribers),
    ]
    lines: list[str] = []
    seen: set[str] = set()
    by_name: dict[str, list[Sample]] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append(s)
    for name in [*dict.fromkeys(s.name for s in samples)]:
        if name in seen:
            continue
        seen.add(name)
        kind, text = types.get(name, ("gauge", name))
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
        for s in by_name[name]:
            labels = ",".join(f'{k}="{escape_label(v)}"' for k, v in s.labels)
            label_text = f"{{{labels}}}" if labels else ""
            lines.append(f"{PREFIX}{name}{label_text} {_format_value(s.value)}")
    return "\n".join(lines) + "\n"
