"""Staged rollouts: a pure, deterministic state machine per deployment version.

The hub keeps one :class:`Rollout` per deployment being rolled out, feeds it the
workload status its devices report, the devices' presence and the time, and
carries out the :class:`SetDesired` actions it produces (as hub-signed
desired-state deltas). No I/O, no clock of its own: every input carries ``now``
in milliseconds, and the engine's time only moves forward (an input with an older
``now`` than one already seen is evaluated at the newest time seen). The same
inputs therefore always give the same actions and status, which the simulator's
deterministic mode relies on. :meth:`Rollout.to_dict` / :meth:`Rollout.from_dict`
let the hub persist it between inputs.

Rules
-----

* Targets (ordered by placement) are split into waves (:func:`plan_waves`). At
  :meth:`Rollout.start` the first wave's devices get ``SetDesired(new version)``;
  each later wave gets it when the one before it closes.
* A device **succeeds** when its latest report is of the new version, phase
  ``running`` and ``healthy`` not False (None: no health check configured). It
  **fails** at once when it reports the new version ``failed`` or ``rejected``
  (the supervisor gave up, or the driver refused it). Anything else keeps it
  pending; a later report may turn a failed or skipped device into a succeeded
  one, so the counts always show the fleet's current truth.
* A wave **closes** when the successes reach ``ceil(success_threshold x (wave
  size - skipped))``, or when ``wave_timeout_ms`` have passed since it started:
  then its pending online devices count as failed and its pending offline ones
  as skipped. A closed wave is never reopened.
* An **offline** device (see :meth:`Rollout.device_presence`) stays pending until
  it has been offline for ``offline_deadline_ms`` within the current wave
  (measured from the later of going offline and the wave's start); then it is
  skipped: not a failure, and it no longer counts in the wave's size. Its
  desired version stays set, so it catches up when it returns, and its later
  report counts as a success of its wave.
* When the failed devices (less those an operator accepted by resuming) exceed
  ``failure_budget``, the rollout pauses (``on_failure="pause"``) or rolls back
  (``on_failure="rollback"``): every device already sent the new version gets
  ``SetDesired(previous version)``. With no previous version (a first deploy)
  the rollback cannot happen and the rollout ends ``failed``.
* Operator commands: :meth:`Rollout.pause`, :meth:`Rollout.resume` (accepts the
  failures seen so far, restarts the open wave's timer, or moves past a wave that
  had already closed) and :meth:`Rollout.undo` (roll back).

Phases: ``pending`` (not started) -> ``progressing`` <-> ``paused``, ending in
``succeeded`` (every wave closed), ``failed`` or ``rolled_back``. Late reports
still update the counts of an ended rollout.

Each rollout is its own object with its own state and timers, so a stuck
rollout cannot hold back another (issue 5: "independent deployments never block
each other").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final, Literal, Self, get_args

from cloud_hub._exceptions import RolloutDecodeError, RolloutStateError
from sync.models import WorkloadPhase

__all__ = [
    "ROLLOUT_WIRE_VERSION",
    "TERMINAL_PHASES",
    "DeviceOutcome",
    "OnFailure",
    "Rollout",
    "RolloutPhase",
    "RolloutStatus",
    "SetDesired",
    "WaveCloser",
    "WaveSpec",
    "WaveStatus",
    "plan_waves",
]

log = logging.getLogger(__name__)

RolloutPhase = Literal["pending", "progressing", "paused", "succeeded", "failed", "rolled_back"]
DeviceOutcome = Literal["pending", "succeeded", "failed", "skipped"]
OnFailure = Literal["pause", "rollback"]
WaveCloser = Literal["threshold", "timeout"]
WaveSpec = int | str
"""A wave's size: an int is a device count, a string ``"25%"`` a percentage of
all targets (a bare ``"5"`` is a count too)."""

ROLLOUT_WIRE_VERSION: Final = 1
TERMINAL_PHASES: Final[frozenset[str]] = frozenset({"succeeded", "failed", "rolled_back"})
"""Phases a rollout never leaves (``paused`` waits for an operator instead)."""

_PHASES: Final = frozenset(get_args(RolloutPhase))
_OUTCOMES: Final = frozenset(get_args(DeviceOutcome))
_CLOSERS: Final = frozenset(get_args(WaveCloser))
_FAILED_PHASES: Final[frozenset[str]] = frozenset({"failed", "rejected"})


def plan_waves(n_targets: int, wave_specs: Sequence[WaveSpec]) -> list[int]:
    """Split ``n_targets`` devices into wave sizes.

    Each spec is the size of one wave (not a cumulative total): a count, or a
    percentage of ``n_targets`` rounded up (so ``"10%"`` of 5 devices is one
    device, never zero). Waves stop once every target is placed; targets left
    after the last spec form one final wave. The sizes therefore always add up
    to ``n_targets`` and none is zero.

    Args:
        n_targets: number of target devices.
        wave_specs: sizes, e.g. ``[1, "10%", "50%"]``.

    Returns:
        The wave sizes, in order (empty for no targets).

    Raises:
        ValueError: ``n_targets`` is negative, or a spec is not a positive count
            or a percentage in ``(0, 100]``.
        TypeError: a spec is a bool.
    """
    if n_targets < 0:
        raise ValueError("n_targets must not be negative")
    sizes: list[int] = []
    remaining = n_targets
    for spec in wave_specs:
        size = _spec_size(spec, n_targets)  # validates every spec, even unused ones
        if remaining:
            size = min(size, remaining)
            sizes.append(size)
            remaining -= size
    if remaining:
        sizes.append(remaining)
    return sizes


def _spec_size(spec: WaveSpec, n_targets: int) -> int:
    if isinstance(spec, bool):
        raise TypeError(f"invalid wave spec {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"wave count must be positive, got {spec}")
        return spec
    text = spec.strip()
    if not text.endswith("%"):
        if not text.isdigit():
            raise ValueError(f"invalid wave spec {spec!r}: a count or a percentage")
        return _spec_size(int(text), n_targets)
    try:
        percent = Fraction(text[:-1].strip())
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"invalid wave percentage {spec!r}") from exc
    if not 0 < percent <= 100:
        raise ValueError(f"wave percentage must be in (0, 100], got {spec!r}")
    return max(1, math.ceil(percent * n_targets / 100))


@dataclass(frozen=True, slots=True)
class SetDesired:
    """Action: set the deployment's desired version on one device.

    Attributes:
        deployment: the deployment (workload) name.
        device: the device id.
        version: the version the device should run.
    """

    deployment: str
    device: str
    version: str


@dataclass(frozen=True, slots=True)
class WaveStatus:
    """Progress of one wave.

    Attributes:
        index: the wave's position, from 0.
        size: devices in the wave.
        needed: successes the wave needs to close by threshold, given its
            skipped devices.
        succeeded: devices whose latest report is the new version, healthy.
        failed: devices that reported failure or were online at the timeout.
        pending: devices neither succeeded, failed nor skipped.
        skipped: devices skipped for being offline past the deadline.
        offline: pending or skipped devices currently offline.
        started_ms: when the wave started (restarted on resume), None if not yet.
        closed_ms: when it closed, None while open.
        closed_by: ``"threshold"`` or ``"timeout"``, None while open.
    """

    index: int
    size: int
    needed: int
    succeeded: int
    failed: int
    pending: int
    skipped: int
    offline: int
    started_ms: int | None
    closed_ms: int | None
    closed_by: WaveCloser | None


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """An observable snapshot of a rollout, for the API, CLI and metrics.

    Attributes:
        deployment: the deployment name.
        version: the version being rolled out.
        previous_version: the version a rollback returns to, None if none.
        phase: see the module docstring.
        current_wave: index of the wave in progress (the last one once every
            wave closed), None before the start.
        waves: per-wave progress.
        failures: devices failed now, over all waves.
        counted_failures: failures counted against the budget (not accepted
            by a resume).
        failure_budget: failures tolerated before ``on_failure`` applies.
        reason: why the rollout is in its phase (empty while progressing).
    """

    deployment: str
    version: str
    previous_version: str | None
    phase: RolloutPhase
    current_wave: int | None
    waves: tuple[WaveStatus, ...]
    failures: int
    counted_failures: int
    failure_budget: int
    reason: str

    @property
    def succeeded(self) -> int:
        """Devices that run the new version healthy, over all waves."""
        return sum(w.succeeded for w in self.waves)

    @property
    def skipped(self) -> int:
        """Devices skipped for being offline, over all waves."""
        return sum(w.skipped for w in self.waves)


class Rollout:
    """The rollout of one deployment version over its placed target devices.

    Args:
        deployment: the deployment name (carried in every action).
        version: the version to roll out.
        targets: device ids, in placement order; waves take them in this order.
        waves: wave sizes (see :func:`plan_waves`); they must add up to the
            number of targets.
        success_threshold: fraction of a wave's (non-skipped) devices that must
            succeed for it to close, in ``(0, 1]``.
        wave_timeout_ms: how long a wave may stay open.
        offline_deadline_ms: how long a device may stay offline in a wave before
            it is skipped.
        failure_budget: failures tolerated before ``on_failure`` applies.
        on_failure: ``"pause"`` or ``"rollback"``.
        previous_version: the version a rollback returns to; None for a first
            deploy (rollback is then impossible).

    Raises:
        ValueError: an argument is out of range, a target is duplicated, or the
            waves do not cover the targets exactly.
        TypeError: ``targets`` is a string.
    """

    def __init__(
        self,
        deployment: str,
        version: str,
        targets: Sequence[str],
        waves: Sequence[int],
        *,
        success_threshold: float = 1.0,
        wave_timeout_ms: int = 600_000,
        offline_deadline_ms: int = 300_000,
        failure_budget: int = 0,
        on_failure: OnFailure = "pause",
        previous_version: str | None = None,
    ) -> None:
        if not deployment or not version:
            raise ValueError("deployment and version must not be empty")
        if previous_version == version:
            raise ValueError("previous_version must differ from version")
        if isinstance(targets, str):
            raise TypeError("targets must be a sequence of device ids, not a string")
        if len(set(targets)) != len(targets):
            raise ValueError("targets must not repeat a device")
        if any(isinstance(w, bool) or w < 1 for w in waves) or sum(waves) != len(targets):
            raise ValueError("waves must be positive sizes adding up to the number of targets")
        if not 0 < success_threshold <= 1:
            raise ValueError("success_threshold must be in (0, 1]")
        if wave_timeout_ms < 1 or offline_deadline_ms < 0 or failure_budget < 0:
            raise ValueError("timeouts and failure_budget out of range")
        if on_failure not in ("pause", "rollback"):
            raise ValueError("on_failure must be 'pause' or 'rollback'")
        self.deployment = deployment
        self.version = version
        self.previous_version = previous_version
        self.targets: tuple[str, ...] = tuple(targets)
        self.waves: tuple[int, ...] = tuple(waves)
        self.success_threshold = success_threshold
        # Exact fraction so that 0.9 x 10 needs 9 successes, not 10.
        self._threshold = Fraction(success_threshold).limit_denominator(1_000_000)
        self.wave_timeout_ms = wave_timeout_ms
        self.offline_deadline_ms = offline_deadline_ms
        self.failure_budget = failure_budget
        self.on_failure: OnFailure = on_failure

        self._members: list[tuple[str, ...]] = []
        self._wave_of: dict[str, int] = {}
        start = 0
        for index, size in enumerate(self.waves):
            members = self.targets[start : start + size]
            self._members.append(members)
            self._wave_of.update(dict.fromkeys(members, index))
            start += size

        self._phase: RolloutPhase = "pending"
        self._reason = ""
        self._current: int | None = None
        self._now = 0
        self._started: list[int | None] = [None] * len(self.waves)
        self._closed: list[int | None] = [None] * len(self.waves)
        self._closed_by: list[WaveCloser | None] = [None] * len(self.waves)
        self._outcome: dict[str, DeviceOutcome] = dict.fromkeys(self.targets, "pending")
        self._offline_since: dict[str, int] = {}
        """Devices currently offline, and since when (engine time)."""
        self._desired: dict[str, str] = {}
        """Versions this rollout asked devices to run."""
        self._accepted: set[str] = set()
        """Failed devices an operator accepted by resuming."""
        self._actions: list[SetDesired] = []

    # -- queries -----------------------------------------------------------------------

    @property
    def phase(self) -> RolloutPhase:
        """The current phase."""
        return self._phase

    @property
    def actions(self) -> tuple[SetDesired, ...]:
        """Actions produced and not yet taken (see :meth:`take_actions`)."""
        return tuple(self._actions)

    def take_actions(self) -> list[SetDesired]:
        """Return the pending actions, in order, and forget them.

        ``SetDesired`` is idempotent, so the hub may write the desired-state
        deltas and persist :meth:`to_dict` in one transaction, or simply redo
        them after a crash.
        """
        taken, self._actions = self._actions, []
        return taken

    def desired(self, device: str) -> str | None:
        """Return the version this rollout last asked ``device`` to run, if any."""
        return self._desired.get(device)

    def outcome(self, device: str) -> DeviceOutcome:
        """Return a target device's outcome.

        Raises:
            KeyError: ``device`` is not a target.
        """
        return self._outcome[device]

    def status(self) -> RolloutStatus:
        """Return a snapshot of the rollout's progress."""
        waves: list[WaveStatus] = []
        for index, members in enumerate(self._members):
            counts = dict.fromkeys(_OUTCOMES, 0)
            offline = 0
            for device in members:
                outcome = self._outcome[device]
                counts[outcome] += 1
                if device in self._offline_since and outcome in ("pending", "skipped"):
                    offline += 1
            waves.append(
                WaveStatus(
                    index=index,
                    size=len(members),
                    needed=self._needed(len(members) - counts["skipped"]),
                    succeeded=counts["succeeded"],
                    failed=counts["failed"],
                    pending=counts["pending"],
                    skipped=counts["skipped"],
                    offline=offline,
                    started_ms=self._started[index],
                    closed_ms=self._closed[index],
                    closed_by=self._closed_by[index],
                )
            )
        return RolloutStatus(
            deployment=self.deployment,
            version=self.version,
            previous_version=self.previous_version,
            phase=self._phase,
            current_wave=self._current,
            waves=tuple(waves),
            failures=sum(w.failed for w in waves),
            counted_failures=self._counted_failures(),
            failure_budget=self.failure_budget,
            reason=self._reason,
        )

    # -- inputs ------------------------------------------------------------------------

    def start(self, now: int) -> None:
        """Start the rollout: the first wave's devices get the new version.

        Raises:
            RolloutStateError: the rollout was already started.
        """
        if self._phase != "pending":
            raise self._state_error("start", "already started")
        self._clock(now)
        self._set_phase("progressing", "")
        if not self.waves:
            self._set_phase("succeeded", "no target devices")
            return
        self._start_wave(0)
        self._evaluate()

    def report(
        self,
        device: str,
        version: str,
        healthy: bool | None,
        phase: WorkloadPhase,
        now: int,
    ) -> None:
        """Apply a device's reported status of the deployment's workload.

        Reports from devices that are not targets are ignored.

        Args:
            device: the reporting device.
            version: the version it runs (``WorkloadStatus.version``).
            healthy: its health (``WorkloadStatus.healthy``; None: no check).
            phase: its phase (``WorkloadStatus.phase``).
            now: the current time in milliseconds.
        """
        self._clock(now)
        current = self._outcome.get(device)
        if current is not None:
            if version == self.version and phase == "running" and healthy is not False:
                self._outcome[device] = "succeeded"
            elif version == self.version and phase in _FAILED_PHASES:
                self._outcome[device] = "failed"
            elif current == "succeeded":
                self._outcome[device] = "pending"
        self._evaluate()

    def device_presence(self, device: str, online: bool, now: int) -> None:
        """Apply a change of a device's presence (from the hub's health view).

        Only an explicit offline counts: an unreachable region is not the same
        as an offline device, and the caller should not report it as offline.

        Args:
            device: the device; ignored if not a target.
            online: whether it is online.
            now: the current time in milliseconds.
        """
        self._clock(now)
        if device in self._outcome:
            if online:
                self._offline_since.pop(device, None)
            else:
                self._offline_since.setdefault(device, self._now)
        self._evaluate()

    def tick(self, now: int) -> None:
        """Let time pass: apply wave timeouts and offline deadlines.

        Args:
            now: the current time in milliseconds.
        """
        self._clock(now)
        self._evaluate()

    # -- commands ----------------------------------------------------------------------

    def pause(self, now: int | None = None) -> None:
        """Stop advancing until :meth:`resume`; reports are still recorded.

        Args:
            now: the current time, if known (else the latest time seen).

        Raises:
            RolloutStateError: the rollout is not progressing (pausing a paused
                rollout does nothing).
        """
        if self._phase == "paused":
            return
        if self._phase != "progressing":
            raise self._state_error("pause", "only a progressing rollout can be paused")
        if now is not None:
            self._clock(now)
        self._set_phase("paused", "paused by operator")

    def resume(self, now: int | None = None) -> None:
        """Continue a paused rollout.

        The failures seen so far are accepted (they no longer count against the
        budget); an open wave gets a fresh timeout from now, and a wave that had
        already closed (e.g. by timeout, then paused on failures) is moved past.

        Args:
            now: the current time, if known (else the latest time seen).

        Raises:
            RolloutStateError: the rollout is not paused (resuming a progressing
                rollout does nothing).
        """
        if self._phase == "progressing":
            return
        if self._phase != "paused":
            raise self._state_error("resume", "only a paused rollout can be resumed")
        if now is not None:
            self._clock(now)
        self._accepted = {d for d, o in self._outcome.items() if o == "failed"}
        self._set_phase("progressing", "")
        current = self._current
        if current is not None and self._closed[current] is None:
            self._started[current] = self._now
        self._evaluate()

    def undo(self, now: int | None = None) -> None:
        """Roll back: every device sent the new version gets the previous one.

        Allowed in every phase but ``rolled_back``, including after success.

        Args:
            now: the current time, if known (else the latest time seen).

        Raises:
            RolloutStateError: already rolled back, or there is no previous
                version to return to.
        """
        if self._phase == "rolled_back":
            raise self._state_error("undo", "already rolled back")
        if self.previous_version is None:
            raise self._state_error("undo", "no previous version to roll back to")
        if now is not None:
            self._clock(now)
        self._rollback("undone by operator")

    # -- persistence -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON- and msgpack-friendly form of the whole state."""
        return {
            "v": ROLLOUT_WIRE_VERSION,
            "deployment": self.deployment,
            "version": self.version,
            "previous_version": self.previous_version,
            "targets": list(self.targets),
            "waves": list(self.waves),
            "success_threshold": self.success_threshold,
            "wave_timeout_ms": self.wave_timeout_ms,
            "offline_deadline_ms": self.offline_deadline_ms,
            "failure_budget": self.failure_budget,
            "on_failure": self.on_failure,
            "phase": self._phase,
            "reason": self._reason,
            "current": self._current,
            "now": self._now,
            "started": list(self._started),
            "closed": list(self._closed),
            "closed_by": list(self._closed_by),
            "outcome": [self._outcome[d] for d in self.targets],
            "offline_since": dict(self._offline_since),
            "desired": dict(self._desired),
            "accepted": sorted(self._accepted),
            "actions": [[a.device, a.version] for a in self._actions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Restore a rollout saved by :meth:`to_dict`.

        Raises:
            RolloutDecodeError: the data is malformed or inconsistent.
        """
        deployment = data.get("deployment") if isinstance(data, Mapping) else None
        name = deployment if isinstance(deployment, str) else ""
        try:
            return cls._from_dict(data, name)
        except RolloutDecodeError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RolloutDecodeError(str(exc) or type(exc).__name__, deployment=name) from exc

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], name: str) -> Self:
        d = _Reader(data, name)
        if d.get("v", int) != ROLLOUT_WIRE_VERSION:
            raise d.error("v", "unsupported version")
        targets: list[str] = d.list_of("targets", str)
        waves: list[int] = d.list_of("waves", int)
        self = cls(
            d.get("deployment", str),
            d.get("version", str),
            targets,
            waves,
            success_threshold=d.get("success_threshold", float, int),
            wave_timeout_ms=d.get("wave_timeout_ms", int),
            offline_deadline_ms=d.get("offline_deadline_ms", int),
            failure_budget=d.get("failure_budget", int),
            on_failure=d.choice("on_failure", ("pause", "rollback")),
            previous_version=d.get("previous_version", str, _NONE),
        )
        self._phase = d.choice("phase", _PHASES)
        self._reason = d.get("reason", str) if data.get("reason") else ""
        self._current = current = d.get("current", int, _NONE)
        self._now = d.get("now", int)
        self._started = d.list_of("started", int, _NONE, length=len(waves))
        self._closed = d.list_of("closed", int, _NONE, length=len(waves))
        self._closed_by = d.list_of("closed_by", str, _NONE, length=len(waves))
        if not set(self._closed_by) <= {*_CLOSERS, None}:
            raise d.error("closed_by", "unknown wave closer")
        if current is None:
            if self._phase in ("progressing", "paused"):
                raise d.error("current", "no current wave in a started rollout")
        elif not 0 <= current < len(waves) or self._started[current] is None:
            raise d.error("current", "not a started wave")
        outcomes = d.list_of("outcome", str, length=len(targets))
        if not set(outcomes) <= _OUTCOMES:
            raise d.error("outcome", "unknown outcome")
        self._outcome = dict(zip(targets, outcomes, strict=True))
        self._offline_since = d.target_map("offline_since", int, self._outcome)
        self._desired = d.target_map("desired", str, self._outcome)
        self._accepted = set(d.list_of("accepted", str))
        if not self._accepted <= self._outcome.keys():
            raise d.error("accepted", "unknown device")
        for item in d.list_of("actions", list):
            if (
                len(item) != 2
                or item[0] not in self._outcome
                or item[1] not in {self.version, self.previous_version} - {None}
            ):
                raise d.error("actions", "bad action")
            self._actions.append(SetDesired(self.deployment, item[0], item[1]))
        return self

    # -- internals ---------------------------------------------------------------------

    def _clock(self, now: int) -> None:
        self._now = max(self._now, now)

    def _state_error(self, command: str, message: str) -> RolloutStateError:
        return RolloutStateError(
            f"cannot {command} ({self._phase}): {message}",
            command=command,
            phase=self._phase,
            deployment=self.deployment,
        )

    def _set_phase(self, phase: RolloutPhase, reason: str) -> None:
        if phase != self._phase:
            log.info(
                "rollout %s %s: %s -> %s %s",
                self.deployment,
                self.version,
                self._phase,
                phase,
                reason,
            )
        self._phase = phase
        self._reason = reason

    def _needed(self, size: int) -> int:
        return math.ceil(self._threshold * size)

    def _counted_failures(self) -> int:
        return sum(1 for d, o in self._outcome.items() if o == "failed" and d not in self._accepted)

    def _emit(self, device: str, version: str) -> None:
        self._desired[device] = version
        self._actions.append(SetDesired(self.deployment, device, version))

    def _start_wave(self, index: int) -> None:
        self._current = index
        self._started[index] = self._now
        log.info("rollout %s %s: wave %s started", self.deployment, self.version, index)
        for device in self._members[index]:
            self._emit(device, self.version)

    def _evaluate(self) -> None:
        while self._phase == "progressing":
            if self._counted_failures() > self.failure_budget:
                self._on_budget_exceeded()
                return
            index = self._current
            assert index is not None  # progressing implies started
            if self._closed[index] is None:
                if not self._try_close(index):
                    return
                continue  # closing may add failures: check the budget again
            if index + 1 < len(self.waves):
                self._start_wave(index + 1)
            else:
                self._set_phase("succeeded", "every wave completed")

    def _try_close(self, index: int) -> bool:
        started = self._started[index]
        assert started is not None
        members = self._members[index]
        now = self._now
        for device in members:
            since = self._offline_since.get(device)
            if (
                since is not None
                and self._outcome[device] == "pending"
                and now - max(since, started) >= self.offline_deadline_ms
            ):
                self._outcome[device] = "skipped"
        outcomes = [self._outcome[d] for d in members]
        skipped = outcomes.count("skipped")
        if outcomes.count("succeeded") >= self._needed(len(members) - skipped):
            self._close(index, "threshold")
            return True
        if now - started >= self.wave_timeout_ms:
            for device in members:
                if self._outcome[device] == "pending":
                    offline = device in self._offline_since
                    self._outcome[device] = "skipped" if offline else "failed"
            self._close(index, "timeout")
            return True
        return False

    def _close(self, index: int, by: WaveCloser) -> None:
        self._closed[index] = self._now
        self._closed_by[index] = by
        log.info("rollout %s %s: wave %s closed by %s", self.deployment, self.version, index, by)

    def _on_budget_exceeded(self) -> None:
        reason = f"{self._counted_failures()} failures exceed the budget of {self.failure_budget}"
        if self.on_failure == "pause":
            self._set_phase("paused", reason)
        elif self.previous_version is None:
            self._set_phase("failed", f"{reason}; no previous version to roll back to")
        else:
            self._rollback(f"{reason}; rolled back automatically")

    def _rollback(self, reason: str) -> None:
        previous = self.previous_version
        assert previous is not None
        for device in self.targets:
            if self._desired.get(device) == self.version:
                self._emit(device, previous)
        self._set_phase("rolled_back", reason)


_NONE = type(None)


class _Reader:
    """Field access for :meth:`Rollout.from_dict` that raises decode errors."""

    def __init__(self, data: Mapping[str, Any], deployment: str) -> None:
        if not isinstance(data, Mapping):
            raise RolloutDecodeError("not a mapping")
        self.data = data
        self.deployment = deployment

    def error(self, key: str, message: str) -> RolloutDecodeError:
        return RolloutDecodeError(message, field=key, deployment=self.deployment)

    def get(self, key: str, *kinds: type) -> Any:
        """Return ``data[key]`` if its exact type is one of ``kinds``."""
        if key not in self.data:
            raise self.error(key, "missing")
        value = self.data[key]
        if type(value) not in kinds or value == "":
            raise self.error(key, f"not {' or '.join(k.__name__ for k in kinds)}")
        return value

    def choice(self, key: str, choices: Collection[str]) -> Any:
        value = self.get(key, str)
        if value not in choices:
            raise self.error(key, f"not one of {sorted(choices)}")
        return value

    def list_of(self, key: str, *kinds: type, length: int | None = None) -> list[Any]:
        value = self.get(key, list)
        if (length is not None and len(value) != length) or any(
            type(v) not in kinds for v in value
        ):
            raise self.error(key, "not a list of the expected items")
        return list(value)

    def target_map(self, key: str, kind: type, targets: Collection[str]) -> dict[str, Any]:
        value = self.get(key, dict)
        if any(k not in targets or type(v) is not kind for k, v in value.items()):
            raise self.error(key, f"not a map of target devices to {kind.__name__}")
        return dict(value)
