"""The invariants a simulated run must keep, checked over plain observations.

Pure and synchronous: the real-process runner and the deterministic simulator
both record what they saw into an :class:`Observations` and call
:func:`check_invariants` (periodically, and once at the end). Nothing here
knows about MQTT, processes or virtual time.

The invariants (issue #6, DESIGN.md "Simulator"):

``convergence``
    After each heal, every scope's replicas hold equal states again. The
    scopes split at the first sample at or after the heal are what the fault
    left behind; the time from the heal to the sample where the last of them
    agreed is the fault's convergence lag (at the resolution of the samples).
    A scope still split at the last sample after a heal is a violation; so is
    a lag over ``converge_deadline_s`` when one is set.
``events``
    Every event ``(device, stream, seq)`` the agent saw acknowledged is in the
    hub's store, and no event is stored twice.
``deltas``
    Every delta dot the agent (or relay) saw acknowledged is covered by the
    hub's version vector of that scope.
``single_copy``
    For ``replicas`` deployments, at most one running copy of each replica slot
    across all devices.
``signed_desired``
    Every desired entry an agent applied verifies with the hub's key
    (:func:`sync.signed.verify_entry`).

The checker must be able to fail: ``tests/sim/test_invariants.py`` feeds it
what a hub without dedupe by dot would store, and it reports the duplicates.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final, Literal

from sync._exceptions import SignatureError
from sync.crdt import LwwMap
from sync.dots import VersionVector
from sync.envelope import packb
from sync.keys import KeyRing
from sync.signed import verify_entry

__all__ = [
    "FLEET_INVARIANTS",
    "LOCAL_INVARIANTS",
    "AppliedEntry",
    "ConvergenceLag",
    "DotKey",
    "EventKey",
    "HealMark",
    "Invariant",
    "InvariantReport",
    "Observations",
    "ReplicaDigest",
    "RunningCopy",
    "StateSample",
    "Violation",
    "check_invariants",
    "merge_reports",
    "scope_digest",
]

Invariant = Literal["convergence", "events", "deltas", "single_copy", "signed_desired"]
INVARIANTS: tuple[Invariant, ...] = (
    "convergence",
    "events",
    "deltas",
    "single_copy",
    "signed_desired",
)
LOCAL_INVARIANTS: tuple[Invariant, ...] = ("events", "deltas", "signed_desired")
"""Checked over one device's (or region's) observations alone."""
FLEET_INVARIANTS: tuple[Invariant, ...] = ("convergence", "single_copy")
"""Checked over the whole fleet's samples and workloads."""
MAX_VIOLATIONS_KEPT = 1_000


_PLAIN: Final = frozenset({str, int, float, bool, bytes, type(None)})
_STR: Final = frozenset({str})


def _canon(obj: Any) -> Any:
    if type(obj) in _PLAIN:  # the common case, without the isinstance checks
        return obj
    if isinstance(obj, dict):
        # Keys that are all plain str sort the same by themselves as by str(key).
        items = sorted(
            obj.items(),
            key=itemgetter(0) if _STR.issuperset(map(type, obj)) else lambda kv: str(kv[0]),
        )
        return [[_canon(k), _canon(v)] for k, v in items]
    if isinstance(obj, list | tuple):
        return [_canon(x) for x in obj]
    return obj


def scope_digest(state: LwwMap | Mapping[str, Any]) -> str:
    """A short digest of a scope's visible state (key -> value), order-independent."""
    items = state.to_dict() if isinstance(state, LwwMap) else dict(state)
    return hashlib.sha256(packb(_canon(items))).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ReplicaDigest:
    """One replica's state of one scope, at one sample."""

    replica: str
    scope: str
    digest: str


@dataclass(frozen=True, slots=True)
class StateSample:
    """The digests of some replicas at time ``t`` (seconds from the start)."""

    t: float
    digests: tuple[ReplicaDigest, ...]

    def split_scopes(self) -> set[str]:
        """Scopes whose replicas disagree in this sample."""
        seen: dict[str, str] = {}
        split: set[str] = set()
        for d in self.digests:
            first = seen.setdefault(d.scope, d.digest)
            if first != d.digest:
                split.add(d.scope)
        return split

    def scopes(self) -> set[str]:
        """Scopes present in this sample."""
        return {d.scope for d in self.digests}


@dataclass(frozen=True, slots=True)
class HealMark:
    """A fault's disruption ended at ``t`` (convergence is timed from here)."""

    fault: int
    t: float
    kind: str = ""


@dataclass(frozen=True, slots=True)
class EventKey:
    """One event of a device stream."""

    device: str
    stream: str
    seq: int


@dataclass(frozen=True, slots=True)
class DotKey:
    """One delta: the dot ``(origin, counter)`` of a write in ``scope``."""

    scope: str
    origin: str
    counter: int


@dataclass(frozen=True, slots=True)
class RunningCopy:
    """A device running replica ``slot`` of a ``replicas`` deployment."""

    deployment: str
    slot: int
    device: str


@dataclass(frozen=True, slots=True)
class AppliedEntry:
    """A desired-state entry an agent applied, in wire form.

    ``entry`` is ``[key, ts, origin, counter, deleted, value]`` as
    :meth:`sync.crdt.LwwMap.entries_wire` gives it.
    """

    device: str
    scope: str
    entry: tuple[Any, ...]


@dataclass
class Observations:
    """Everything a run saw that the invariants are checked against.

    Lists may be appended to while the run goes on; :func:`check_invariants`
    reads a consistent view only if the caller does not mutate during the call.
    """

    samples: list[StateSample] = field(default_factory=list)
    heals: list[HealMark] = field(default_factory=list)
    acked_events: list[EventKey] = field(default_factory=list)
    hub_events: list[EventKey] = field(default_factory=list)
    """What the hub's store holds, one item per stored row (duplicates included)."""
    acked_dots: list[DotKey] = field(default_factory=list)
    hub_vectors: dict[str, VersionVector] = field(default_factory=dict)
    running: list[RunningCopy] = field(default_factory=list)
    replicas: dict[str, int] = field(default_factory=dict)
    """``replicas`` deployments: name -> replica count."""
    applied_desired: list[AppliedEntry] = field(default_factory=list)
    hub_keys: KeyRing | None = None
    converge_deadline_s: float | None = None
    final_must_converge: bool = True


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant."""

    invariant: Invariant
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.subject}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ConvergenceLag:
    """How long after a heal every scope agreed again (``None``: never, in this run)."""

    fault: int
    heal_t: float
    lag_s: float | None
    kind: str = ""


@dataclass(frozen=True)
class InvariantReport:
    """The outcome of a check: violations (capped), their counts, convergence lags."""

    violations: tuple[Violation, ...]
    counts: Mapping[str, int]
    lags: tuple[ConvergenceLag, ...]
    checked: Mapping[str, int]
    """How many items each invariant looked at (a check of nothing proves nothing)."""

    @property
    def ok(self) -> bool:
        """Whether every invariant held."""
        return not any(self.counts.values())

    def failed(self) -> list[str]:
        """Names of the invariants that failed, in a fixed order."""
        return [name for name in INVARIANTS if self.counts.get(name, 0)]

    def summary(self) -> str:
        """One line per invariant: ``name: ok (n checked)`` or ``name: FAILED (k)``."""
        lines = []
        for name in INVARIANTS:
            bad = self.counts.get(name, 0)
            state = f"FAILED ({bad})" if bad else "ok"
            lines.append(f"{name}: {state} ({self.checked.get(name, 0)} checked)")
        return "\n".join(lines)


class _Collector:
    def __init__(self) -> None:
        self.kept: list[Violation] = []
        self.counts: Counter[str] = Counter()
        self.checked: Counter[str] = Counter()

    def add(self, invariant: Invariant, subject: str, detail: str) -> None:
        self.counts[invariant] += 1
        if len(self.kept) < MAX_VIOLATIONS_KEPT:
            self.kept.append(Violation(invariant, subject, detail))


def _convergence(obs: Observations, out: _Collector) -> list[ConvergenceLag]:
    samples = sorted(obs.samples, key=lambda s: s.t)
    # (t, scopes present, scopes split) once per sample, not once per heal.
    info = [(s.t, s.scopes(), s.split_scopes()) for s in samples]
    lags: list[ConvergenceLag] = []
    for heal in sorted(obs.heals, key=lambda h: (h.t, h.fault)):
        out.checked["convergence"] += 1
        after = [i for i in info if i[0] >= heal.t]
        # What the fault left split: the scopes split at the first sample after
        # the heal. Scopes written later are new traffic, not the fault's doing.
        pending: set[str] = set(after[0][2]) if after else set()
        done_at = after[0][0] if after else heal.t
        for t, present, split in after[1:]:
            if not pending:
                break
            agreed = (present & pending) - split
            if agreed:
                pending -= agreed
                done_at = t
        if not after or pending:
            lags.append(ConvergenceLag(heal.fault, heal.t, None, heal.kind))
            shown = ", ".join(sorted(pending)[:5]) or "no sample after the heal"
            out.add("convergence", f"fault {heal.fault}", f"never converged: {shown}")
            continue
        lag = done_at - heal.t
        lags.append(ConvergenceLag(heal.fault, heal.t, lag, heal.kind))
        if obs.converge_deadline_s is not None and lag > obs.converge_deadline_s:
            out.add(
                "convergence",
                f"fault {heal.fault}",
                f"converged {lag:.1f} s after heal, over {obs.converge_deadline_s:g} s",
            )
    if obs.final_must_converge and samples:
        last = samples[-1]
        out.checked["convergence"] += len(last.scopes())
        for scope in sorted(last.split_scopes()):
            replicas = sorted({d.digest for d in last.digests if d.scope == scope})
            out.add("convergence", scope, f"split at the end: {len(replicas)} distinct states")
    return lags


def _events(obs: Observations, out: _Collector) -> None:
    # Millions of events in a long run: find the violations, then sort only them.
    stored = Counter(obs.hub_events)
    out.checked["events"] += len(obs.acked_events) + len(stored)
    twice = [kv for kv in stored.items() if kv[1] > 1]
    for key, n in sorted(twice, key=lambda kv: (kv[0].device, kv[0].stream, kv[0].seq)):
        out.add("events", f"{key.device}/{key.stream}#{key.seq}", f"stored {n} times")
    lost = [key for key in set(obs.acked_events) if key not in stored]
    for key in sorted(lost, key=lambda k: (k.device, k.stream, k.seq)):
        out.add("events", f"{key.device}/{key.stream}#{key.seq}", "acknowledged but lost")


def _deltas(obs: Observations, out: _Collector) -> None:
    out.checked["deltas"] += len(obs.acked_dots)
    lost = []
    for dot in set(obs.acked_dots):
        vector = obs.hub_vectors.get(dot.scope)
        if vector is None or not vector.contains(dot.origin, dot.counter):
            lost.append(dot)
    for dot in sorted(lost, key=lambda d: (d.scope, d.origin, d.counter)):
        out.add("deltas", f"{dot.scope} ({dot.origin}, {dot.counter})", "acknowledged but lost")


def _single_copy(obs: Observations, out: _Collector) -> None:
    per_slot: dict[tuple[str, int], set[str]] = {}
    for c in obs.running:
        if c.deployment in obs.replicas:
            per_slot.setdefault((c.deployment, c.slot), set()).add(c.device)
    out.checked["single_copy"] += len(per_slot)
    for (deployment, slot), devices in sorted(per_slot.items()):
        if len(devices) > 1:
            shown = ", ".join(sorted(devices)[:5])
            out.add("single_copy", f"{deployment}[{slot}]", f"running on {len(devices)}: {shown}")
        if not 0 <= slot < obs.replicas[deployment]:
            out.add("single_copy", f"{deployment}[{slot}]", "slot beyond the replica count")


def _signed(obs: Observations, out: _Collector) -> None:
    out.checked["signed_desired"] += len(obs.applied_desired)
    for a in obs.applied_desired:
        subject = f"{a.device} {a.scope} {a.entry[0] if a.entry else '?'}"
        if obs.hub_keys is None:
            out.add("signed_desired", subject, "no hub key to verify with")
            continue
        try:
            verify_entry(obs.hub_keys, a.scope, list(a.entry))
        except (SignatureError, ValueError, TypeError) as exc:
            out.add("signed_desired", subject, f"applied without a valid hub signature: {exc}")


def check_invariants(
    obs: Observations, *, only: Collection[Invariant] = INVARIANTS
) -> InvariantReport:
    """Check every invariant (or those in ``only``) over ``obs``.

    Returns:
        The report; :attr:`InvariantReport.ok` is false when any invariant failed.
    """
    out = _Collector()
    lags = _convergence(obs, out) if "convergence" in only else []
    for name, check in (
        ("events", _events),
        ("deltas", _deltas),
        ("single_copy", _single_copy),
        ("signed_desired", _signed),
    ):
        if name in only:
            check(obs, out)
    counts: dict[str, int] = {name: out.counts.get(name, 0) for name in INVARIANTS}
    checked: dict[str, int] = {name: out.checked.get(name, 0) for name in INVARIANTS}
    return InvariantReport(tuple(out.kept), counts, tuple(lags), checked)


def merge_reports(reports: Sequence[InvariantReport]) -> InvariantReport:
    """One report of checks made in parts (each invariant's violations in part order).

    For a run checked piecewise: :data:`LOCAL_INVARIANTS` per region, the
    others over the whole fleet. Counts and checked items add up; at most
    :data:`MAX_VIOLATIONS_KEPT` violations are kept, in :data:`INVARIANTS` order.
    """
    kept = [v for name in INVARIANTS for r in reports for v in r.violations if v.invariant == name][
        :MAX_VIOLATIONS_KEPT
    ]
    counts: dict[str, int] = {n: sum(r.counts.get(n, 0) for r in reports) for n in INVARIANTS}
    checked: dict[str, int] = {n: sum(r.checked.get(n, 0) for r in reports) for n in INVARIANTS}
    lags = tuple(lag for r in reports for lag in r.lags)
    return InvariantReport(tuple(kept), counts, lags, checked)
