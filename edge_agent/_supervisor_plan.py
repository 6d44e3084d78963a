"""The supervisor's decisions, as a pure function of what it knows.

Given the desired spec of one workload, a local override, what the driver
observes and the supervisor's own record, :func:`decide` returns the one
action to take and updates the record. No I/O, no clock reads: the caller
passes ``now`` (monotonic seconds) and a random source for jitter, so the
simulator's deterministic mode can drive it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from edge_agent.drivers.base import ActualState
from sync.models import WorkloadPhase, WorkloadSpec

ActionKind = Literal["apply", "start", "stop", "remove", "none"]

# A workload that stays up this long is no longer "crash looping": its attempt
# counter starts again from zero.
STABLE_AFTER_S = 60.0


@dataclass(slots=True)
class WorkloadRecord:
    """What the supervisor remembers about one workload between passes.

    Attributes:
        name: workload name.
        phase: the supervisor's view (refines the driver's observation).
        version: spec version this record is about; a new version resets it.
        attempts: consecutive failed starts or crashes since it last ran stably.
        restarts: total restarts made by the supervisor.
        next_start_at: monotonic time before which no restart is attempted.
        running_since: monotonic time the workload was first seen running.
        reason: why it is in its phase (last exit, failure, rejection).
        healthy: last health verdict (None: no check or not yet run).
        health_failures: consecutive failed health checks.
        next_health_at: monotonic time of the next health check.
    """

    name: str
    phase: WorkloadPhase = "pending"
    version: str = ""
    attempts: int = 0
    restarts: int = 0
    next_start_at: float = 0.0
    running_since: float | None = None
    reason: str = ""
    healthy: bool | None = None
    health_failures: int = 0
    next_health_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """One action for the shell to carry out, and the phase it leads to."""

    action: ActionKind
    phase: WorkloadPhase
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Exponential backoff with jitter, bounded by ``max_s``."""

    initial_s: float = 1.0
    max_s: float = 60.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        """Delay before restart number ``attempt`` (1-based)."""
        base = min(self.max_s, math.ldexp(self.initial_s, min(max(0, attempt - 1), 64)))
        spread = base * self.jitter
        return max(0.0, base + self.rng.uniform(-spread, spread))


def _exit_reason(actual: ActualState) -> str:
    if actual.reason:
        return actual.reason
    if actual.exit_code is not None:
        return f"exited with code {actual.exit_code}"
    return f"{actual.phase}"


def _wants_restart(spec: WorkloadSpec, actual: ActualState) -> bool:
    if actual.phase == "failed":
        return True
    match spec.restart.mode:
        case "always":
            return True
        case "on-failure":
            return actual.exit_code != 0
        case "never":
            return False


def decide(
    spec: WorkloadSpec,
    override: Literal["stop", "start"] | None,
    actual: ActualState,
    record: WorkloadRecord,
    *,
    now: float,
    backoff: BackoffPolicy,
    max_attempts_cap: int,
) -> Decision:
    """Decide the next action for a desired workload and update ``record``.

    Args:
        spec: the desired spec.
        override: a local override in force, if any.
        actual: what the driver observes now.
        record: the supervisor's memory of this workload (mutated).
        now: monotonic seconds.
        backoff: restart delay policy.
        max_attempts_cap: ceiling on ``spec.restart.max_attempts``.

    Returns:
        The action to carry out and the resulting phase.
    """
    if record.version != spec.version:
        # A changed spec is a new workload: forget the old crash history.
        record.version = spec.version
        record.attempts = 0
        record.next_start_at = 0.0
        if record.phase in ("failed", "exited"):
            record.phase = "pending"

    if actual.phase == "conflict":
        return Decision("none", "failed", actual.reason or "name held by a foreign workload")

    if override == "stop":
        record.running_since = None
        if actual.phase == "running":
            return Decision("stop", "stopped", "stopped by local override")
        return Decision("none", "stopped", "stopped by local override")

    version_differs = actual.phase != "missing" and actual.version not in (None, spec.version)
    if version_differs:
        return Decision("apply", "starting", f"replacing version {actual.version}")

    if actual.phase == "running":
        if record.running_since is None:
            record.running_since = now
        elif now - record.running_since >= STABLE_AFTER_S:
            record.attempts = 0
        return Decision("none", "running", "")

    record.running_since = None
    max_attempts = min(spec.restart.max_attempts, max_attempts_cap)

    if record.phase == "failed":
        return Decision("none", "failed", record.reason)
    if record.phase == "exited" and actual.phase == "exited":
        return Decision("none", "exited", record.reason)

    if record.phase == "backoff":
        if now >= record.next_start_at:
            return Decision("apply", "starting", f"restart attempt {record.attempts + 1}")
        return Decision("none", "backoff", record.reason)

    if actual.phase == "missing" and record.phase in ("pending", "stopped"):
        return Decision("apply", "starting", "")

    if actual.phase == "exited" and record.phase == "stopped":
        # The stop override was just cleared: start it again, no crash counted.
        return Decision("apply", "starting", "local override cleared")

    # It was meant to run (starting/running) and is not: a crash, an exit, a
    # failed start, or it vanished.
    reason = _exit_reason(actual)
    if actual.phase == "exited" and not _wants_restart(spec, actual):
        return Decision("none", "exited", reason)
    record.attempts += 1
    if record.attempts >= max_attempts:
        return Decision(
            "none", "failed", f"gave up after {record.attempts} attempts; last: {reason}"
        )
    record.next_start_at = now + backoff.delay(record.attempts)
    return Decision("none", "backoff", reason)
