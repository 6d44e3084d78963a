"""Applying a fault timeline to a real run: the asyncio shell around :class:`FaultTimeline`.

:class:`FaultInjector` sleeps until each action's time and hands it to a
:class:`FaultTarget`, the narrow Protocol the real-process runner implements
(it owns the processes, brokers and proxies). :class:`ProxyNetwork` is the part
of such a target that needs nothing but TCP proxies: one proxy per region
between the region's relay and the hub's broker (``partition_region``), and
optionally one per device between the device and its relay broker
(``flap_devices``).

Every applied action is recorded with its real time, so the invariant checker
can time convergence from the moment a heal really happened, and a target that
fails to apply an action (a process that will not restart) is recorded too:
the run goes on and the failure shows in the report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from simulator.faults import Action, FaultTimeline
from simulator.invariants import HealMark
from simulator.netproxy import TcpProxy

__all__ = ["AppliedAction", "FaultInjector", "FaultTarget", "ProxyNetwork"]

log = logging.getLogger(__name__)


class FaultTarget(Protocol):
    """Something that can apply fault actions (the real-process runner)."""

    async def apply(self, action: Action) -> None:
        """Apply one action; raise to report that it could not be applied."""
        ...


@dataclass(frozen=True, slots=True)
class AppliedAction:
    """An action as it happened: planned time, real time (both from the run start)."""

    action: Action
    at_s: float
    error: str = ""


class FaultInjector:
    """Play a timeline against a target in real time.

    Args:
        timeline: the actions.
        target: who applies them.
        clock: monotonic seconds (injected for tests).
        speed: timeline seconds per real second (``2.0`` plays twice as fast).
    """

    def __init__(
        self,
        timeline: FaultTimeline,
        target: FaultTarget,
        *,
        clock: Callable[[], float] = time.monotonic,
        speed: float = 1.0,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.timeline = timeline
        self.target = target
        self._clock = clock
        self.speed = speed
        self.applied: list[AppliedAction] = []
        self.failed = 0

    async def run(self, start: float | None = None) -> None:
        """Apply every action at its time; return after the last one.

        Args:
            start: the run's start on ``clock`` (default: now).
        """
        t0 = self._clock() if start is None else start
        for action in self.timeline:
            delay = t0 + action.t / self.speed - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            error = ""
            try:
                await self.target.apply(action)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a target failure is data for the report, not a crash
                self.failed += 1
                error = f"{type(exc).__name__}: {exc}"
                log.warning("fault action %s at %.1f s failed: %s", action.kind, action.t, error)
            self.applied.append(AppliedAction(action, (self._clock() - t0) * self.speed, error))

    def heal_marks(self) -> list[HealMark]:
        """Per fault, when its last disruption really ended (for the invariants)."""
        last: dict[int, float] = {}
        for a in self.applied:
            if a.action.heals and not a.error:
                last[a.action.fault] = max(last.get(a.action.fault, 0.0), a.at_s)
        kinds = self.timeline.schedule.faults
        return [HealMark(f, t, kinds[f].kind) for f, t in sorted(last.items())]


class ProxyNetwork:
    """The network part of a fault target, made of :class:`TcpProxy` instances.

    Args:
        region_proxies: region -> the proxy between its relay and the hub broker.
        device_proxies: device -> the proxy between it and its relay broker.
    """

    def __init__(
        self,
        region_proxies: Mapping[str, TcpProxy],
        device_proxies: Mapping[str, TcpProxy] | None = None,
    ) -> None:
        self.regions = dict(region_proxies)
        self.devices = dict(device_proxies or {})

    def handles(self, action: Action) -> bool:
        """Whether this network applies ``action`` (others go to processes)."""
        if action.kind in ("partition", "heal"):
            return action.region in self.regions
        if action.kind in ("link_down", "link_up"):
            return action.device in self.devices
        return False

    async def apply(self, action: Action) -> None:
        """Cut or heal a region or a device link.

        Raises:
            KeyError: the action names a region or device without a proxy.
        """
        match action.kind:
            case "partition":
                self.regions[action.region or ""].partition("cut")
            case "heal":
                self.regions[action.region or ""].heal()
            case "link_down":
                self.devices[action.device or ""].partition("cut")
            case "link_up":
                self.devices[action.device or ""].heal()
            case _:
                raise KeyError(f"{action.kind} is not a network action")

    def proxies(self) -> Iterable[TcpProxy]:
        """Every proxy (to start and close them)."""
        yield from self.regions.values()
        yield from self.devices.values()
