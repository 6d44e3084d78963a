"""Deterministic mode: virtual time, a simulated network, the real sync logic.

One process, one thread, no I/O and no wall clock: a priority queue of timed
events (message deliveries, session timers, workload crashes, telemetry,
rollouts, faults, samples) drives device agents, relays and a hub built from
the project's pure cores (see :mod:`simulator._detnodes`). Every random choice
comes from generators seeded by :attr:`SimConfig.seed`, and keys are derived
from it too, so a seed replays a run exactly and gives the same report bytes.

The network: device links take latency, jitter and loss from the device's
firmware profile; links go down with ``flap_devices``; a region's relay loses
the hub with ``partition_region`` (messages in flight across the cut are lost
when they arrive); brokers, relays and the hub can be killed and restarted (a
restart keeps what production keeps on disk: replicas, outboxes, cursors, and
starts new sessions).

At ``duration_s`` new activity stops, every fault is healed, and the run goes
on (up to ``settle_max_s``) until it is quiet; then the invariants are checked
over what was observed (:mod:`simulator.invariants`).
"""

from __future__ import annotations

import gc
import heapq
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware_profiles._loader import load_profile
from simulator._detnodes import (
    FORWARDER,
    HUB,
    Signatures,
    SimDevice,
    SimHub,
    SimRelay,
    desired_scope,
    device_scope,
    relay_id,
)
from simulator.faults import Action, FaultSchedule, FaultTimeline
from simulator.fleet import Fleet, FleetSpec, assign_fleet, default_fleet_spec, outage_means
from simulator.invariants import (
    AppliedEntry,
    DotKey,
    EventKey,
    HealMark,
    InvariantReport,
    Observations,
    ReplicaDigest,
    RunningCopy,
    StateSample,
    check_invariants,
    scope_digest,
)
from simulator.progress import Progress
from simulator.report import ReportBuilder, RunReport

__all__ = ["DeterministicSim", "SimConfig", "SimResult", "run_deterministic"]

log = logging.getLogger(__name__)

_START_MS = 1_700_000_000_000
_SERIES = {
    "devices_online": ("Devices online", "Devices"),
    "converged_devices": ("Devices converged", "Devices"),
    "split_scopes": ("Scopes not converged", "Convergence"),
    "msgs_per_s": ("Messages delivered /s", "Message rates"),
    "lost_per_s": ("Messages lost /s", "Message rates"),
    "outbox_items": ("Relay outbox items", "Outbox depths"),
    "device_events_pending": ("Device events not yet acknowledged", "Outbox depths"),
}


@dataclass(frozen=True)
class SimConfig:
    """Parameters of a deterministic run (all times in simulated seconds)."""

    devices: int = 100
    regions: int | None = 2
    duration_s: float = 600.0
    seed: int = 0
    tick_ms: int = 1_000
    sample_s: float = 5.0
    sweep_s: float = 600.0
    settle_max_s: float = 1_800.0
    connect_spread_s: float = 10.0
    event_interval_s: float = 900.0
    status_interval_s: float = 600.0
    """Each device writes a ``status`` key this often (state churn to converge)."""
    crash_mean_s: float = 43_200.0
    rollout_every_s: float | None = 3_600.0
    rollout_spread_s: float = 120.0
    web_replicas: int = 3
    move_after_s: float = 120.0
    move_check_s: float = 30.0
    hub_latency_ms: float = 20.0
    extra_loss: float = 0.0
    """Added to every device link's loss probability (swarm runs raise it)."""
    event_capacity: int = 1_000_000
    outbox_capacity: int = 1_000_000
    converge_deadline_s: float | None = None
    dedupe: bool = True
    """``False`` plants a bug: the hub stores duplicate events (the checker must fail)."""
    signatures: str = "modeled"
    """``"modeled"``: keyed BLAKE2b tags stand in for Ed25519 signatures
    (:class:`~simulator._detnodes.ModeledKey`); ``"ed25519"``: real ones."""
    verify_cache: bool = True
    """With Ed25519, compute each verification once per run (exact; see ``VerifyCache``)."""


@dataclass
class SimResult:
    """What a run produced."""

    report: RunReport
    invariants: InvariantReport
    wall_s: float
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Link:
    latency_ms: float
    jitter_ms: float
    loss: float


class DeterministicSim:
    """One seeded run. Build it, then :meth:`run` it once.

    Args:
        config: run parameters.
        schedule: faults (``None``: none).
        fleet_spec: the fleet file (default: every built-in profile).
        schedule_source: the schedule's file name, for errors.
        progress: called with a :class:`~simulator.progress.Progress` at every
            sample (to show it; it must not change anything).
    """

    def __init__(
        self,
        config: SimConfig,
        schedule: FaultSchedule | None = None,
        fleet_spec: FleetSpec | None = None,
        *,
        schedule_source: str = "",
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.config = config
        self._progress = progress
        spec = fleet_spec or default_fleet_spec()
        self.fleet: Fleet = assign_fleet(
            spec, config.devices, regions=config.regions, seed=config.seed
        )
        self.schedule = schedule or FaultSchedule()
        profiles = sorted({d.profile for d in self.fleet.devices})
        self.timeline = FaultTimeline(
            self.schedule,
            self.fleet.devices,
            config.seed,
            outage_means=outage_means(profiles),
            horizon_s=config.duration_s,
            source=schedule_source,
        )
        self._links: dict[str, _Link] = {}
        for name in profiles:
            link = load_profile(name).link
            loss = min(1.0, link.loss_pct / 100 + config.extra_loss)
            self._links[name] = _Link(link.latency_ms, link.jitter_ms, loss)
        self._hub_link = _Link(config.hub_latency_ms, config.hub_latency_ms / 4, 0.0)
        self.now = _START_MS
        self._heap: list[tuple[int, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._ticks: set[tuple[str, str]] = set()
        self.net_rng = random.Random(config.seed * 2 + 1)
        self.work_rng = random.Random(config.seed * 2 + 2)
        self.counters: Counter[str] = Counter()
        self._build()

    # -- construction --------------------------------------------------------------

    def _build(self) -> None:
        seed = self.config.seed
        keys = self.keys = Signatures(seed, self.config.signatures, cache=self.config.verify_cache)
        hub_signer = keys.signer(HUB)
        hub_keys = keys.ring(hub_signer)
        relay_signers = {r: keys.signer(relay_id(r)) for r in self.fleet.regions}
        self.devices: dict[str, SimDevice] = {}
        for ref in self.fleet.devices:
            self.devices[ref.device_id] = SimDevice(
                ref.device_id,
                ref.region,
                ref.profile,
                signer=keys.signer(ref.device_id),
                relay_keys=keys.ring(relay_signers[ref.region]),
                hub_keys=hub_keys,
                wire=self,
                event_capacity=self.config.event_capacity,
            )
        self.relays: dict[str, SimRelay] = {}
        for region in self.fleet.regions:
            members = [d for d in self.devices.values() if d.region == region]
            relay = SimRelay(
                region,
                members,
                signer=relay_signers[region],
                hub_keys=hub_keys,
                wire=self,
                outbox_capacity=self.config.outbox_capacity,
                keys=keys,
            )
            self.relays[relay.id] = relay
        self.hub = SimHub(
            self.relays.values(),
            self.devices.values(),
            signer=hub_signer,
            wire=self,
            keys=keys,
            dedupe=self.config.dedupe,
        )
        self.hub_keys = hub_keys
        # Link and process state.
        self.dev_up = dict.fromkeys(self.devices, True)
        # Kept as they change, so a sample costs O(regions + changes), not O(devices).
        self._members = Counter(d.region for d in self.devices.values())
        self._down = Counter[str]()
        self._events_len: dict[str, int] = {}
        self._events_touched: set[str] = set()
        self._events_pending = 0
        self.region_broker_up = dict.fromkeys(self.fleet.regions, True)
        self.relay_up = dict.fromkeys(self.fleet.regions, True)
        self.partitioned = dict.fromkeys(self.fleet.regions, False)
        self.hub_up = True
        self.hub_broker_up = True
        self.active = True
        # Convergence tracking.
        self._replicas: dict[str, tuple[str, ...]] = {}
        for d in self.devices.values():
            for scope in (d.scope, d.desired):
                self._replicas[scope] = (d.id, d.relay, HUB)
        self._digests: dict[str, dict[str, str]] = {s: {} for s in self._replicas}
        self._dirty: set[tuple[str, str]] = set()
        self._split: set[str] = set()
        self.samples: list[StateSample] = []
        # Workloads.
        self.web: dict[int, str] = {}
        self._web_gen = 0
        self._offline_since: dict[str, int] = {}
        self._version = 1
        self.builder = ReportBuilder(
            "NovaCron deterministic simulation",
            {
                "mode": "deterministic",
                "seed": self.config.seed,
                "devices": self.config.devices,
                "regions": len(self.fleet.regions),
                "duration_s": self.config.duration_s,
                "faults": len(self.schedule.faults),
                "dedupe": self.config.dedupe,
                "signatures": self.config.signatures,
            },
            _SERIES,
        )
        self._last_sample: tuple[int, int, int] = (self.now, 0, 0)

    # -- the Wire protocol for nodes --------------------------------------------------

    def now_ms(self) -> int:
        """Virtual time in ms."""
        return self.now

    def _at(self, t_ms: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t_ms, self._seq, fn, arg))

    def _after_s(self, seconds: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._at(self.now + max(1, round(seconds * 1000)), fn, arg)

    def _region_of(self, node: str) -> str:
        return self.devices[node].region if node in self.devices else self.relays[node].region

    def link_ok(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` can talk now."""
        if b == FORWARDER:
            b = HUB
        if HUB in (a, b):
            region = self.relays[b if a == HUB else a].region
            return (
                self.hub_up
                and self.hub_broker_up
                and self.relay_up[region]
                and not self.partitioned[region]
            )
        device = a if a in self.devices else b
        region = self.devices[device].region
        return self.dev_up[device] and self.region_broker_up[region] and self.relay_up[region]

    def _link(self, a: str, b: str) -> _Link:
        if HUB in (a, b):
            return self._hub_link
        device = self.devices[a] if a in self.devices else self.devices[b]
        return self._links[device.profile]

    def send(self, src: str, dst: str, data: bytes) -> None:
        """Put a message on the virtual network (lost if the link is down or by chance)."""
        counters = self.counters
        counters["sent"] += 1
        # link_ok and _link, inlined: this runs for every message.
        device = self.devices.get(src) or self.devices.get(dst)
        if device is None:
            ok = self.link_ok(src, dst)
            link = self._hub_link
        else:
            region = device.region
            ok = self.dev_up[device.id] and self.region_broker_up[region] and self.relay_up[region]
            link = self._links[device.profile]
        if not ok:
            counters["lost_down"] += 1
            return
        rng = self.net_rng
        if link.loss and rng.random() < link.loss:
            counters["lost_random"] += 1
            return
        delay = link.latency_ms + link.jitter_ms * rng.random()
        self._seq += 1
        heapq.heappush(
            self._heap,
            (self.now + max(1, round(delay)), self._seq, self._deliver, (src, dst, data, device)),
        )

    def _deliver(self, msg: tuple[str, str, bytes, SimDevice | None]) -> None:
        src, dst, data, device = msg
        if device is None:
            ok = self.link_ok(src, dst)
        else:
            region = device.region
            ok = self.dev_up[device.id] and self.region_broker_up[region] and self.relay_up[region]
        if not ok:
            self.counters["lost_in_flight"] += 1
            return
        self.counters["delivered"] += 1
        if dst == HUB:
            self.hub.receive(src, data)
        elif device is not None and dst == device.id:
            device.receive(data)
        else:
            self.relays[dst].receive(src, data)

    def wake(self, node: str, peer: str) -> None:
        """Schedule a timer tick of ``node``'s session with ``peer``.

        A device's event stream changes only around a wake (an append, an
        acknowledgement received, a reconnect), so the device is also noted for
        the next sample's count of pending events.
        """
        if node in self.devices:
            self._events_touched.add(node)
        key = (node, peer)
        if key in self._ticks:
            return
        self._ticks.add(key)
        self._at(self.now + self.config.tick_ms, self._tick, key)

    def _tick(self, key: tuple[str, str]) -> None:
        self._ticks.discard(key)
        node, peer = key
        if not self.link_ok(node, peer):
            return  # the reconnect wakes it
        if node == HUB:
            busy = self.hub.tick(peer)
        elif node in self.relays:
            busy = self.relays[node].tick(peer)
        else:
            busy = self.devices[node].tick()
        if busy:
            self.wake(node, peer)

    def _set_dev_up(self, device: str, *, up: bool) -> None:
        if self.dev_up[device] != up:
            self.dev_up[device] = up
            self._down[self.devices[device].region] += -1 if up else 1

    def _online(self) -> int:
        """Devices whose link to their relay is up (as :meth:`link_ok`)."""
        return sum(
            members - self._down[region]
            for region, members in self._members.items()
            if self.region_broker_up[region] and self.relay_up[region]
        )

    def _pending_events(self) -> int:
        """Events held by devices, not yet acknowledged by their relays."""
        for device in self._events_touched:
            n = len(self.devices[device].events)
            self._events_pending += n - self._events_len.get(device, 0)
            self._events_len[device] = n
        self._events_touched.clear()
        return self._events_pending

    def dirty(self, replica: str, scope: str) -> None:
        """Mark ``replica``'s copy of ``scope`` for re-digest at the next sample."""
        self._dirty.add((replica, scope))

    # -- activity ----------------------------------------------------------------------

    def _start(self) -> None:
        for relay in self.relays.values():
            relay.reconnect_hub()
        self.hub.start()
        for d in self.devices.values():
            self._after_s(
                self.work_rng.random() * self.config.connect_spread_s, self._connect, d.id
            )
            if self.config.event_interval_s > 0:
                phase = self.work_rng.random() * self.config.event_interval_s
                self._after_s(phase, self._telemetry, (d.id, 0))
            if self.config.status_interval_s > 0:
                phase = self.work_rng.random() * self.config.status_interval_s
                self._after_s(phase, self._status, (d.id, 0))
            if self.config.crash_mean_s > 0:
                gap = self.work_rng.expovariate(1 / self.config.crash_mean_s)
                self._after_s(gap, self._crash, d.id)
        self._after_s(1.0, self._initial_desired)
        if self.config.rollout_every_s:
            self._after_s(self.config.rollout_every_s, self._rollout)
        for action in self.timeline:
            self._at(_START_MS + round(action.t * 1000), self._fault, action)
        self._after_s(self.config.sample_s, self._sample)
        self._after_s(self.config.sweep_s, self._sweep)
        if self.config.web_replicas:
            self._after_s(self.config.move_check_s, self._check_moves)

    def _connect(self, device: str) -> None:
        if self.link_ok(device, self.devices[device].relay):
            self.devices[device].connect()

    def _telemetry(self, arg: tuple[str, int]) -> None:
        device, n = arg
        if not self.active:
            return
        self.devices[device].telemetry(n)
        self._after_s(self.config.event_interval_s, self._telemetry, (device, n + 1))

    def _status(self, arg: tuple[str, int]) -> None:
        device, n = arg
        if not self.active:
            return
        self.devices[device].status(n)
        self._after_s(self.config.status_interval_s, self._status, (device, n + 1))

    def _crash(self, device: str) -> None:
        if not self.active:
            return
        self.devices[device].crash(self.work_rng)
        self._after_s(self.work_rng.expovariate(1 / self.config.crash_mean_s), self._crash, device)

    def _initial_desired(self, _: object = None) -> None:
        for d in sorted(self.devices):
            self.hub.set_desired(d, "telemetry", {"deployment": "telemetry", "version": "1"})
        hosts = self.work_rng.sample(
            sorted(self.devices), min(self.config.web_replicas, len(self.devices))
        )
        for slot, device in enumerate(hosts):
            self._place_web(slot, device)

    def _place_web(self, slot: int, device: str) -> None:
        self._web_gen += 1
        self.web[slot] = device
        spec = {"deployment": "web", "slot": slot, "version": "1", "gen": self._web_gen}
        self.hub.set_desired(device, "web", spec)

    def _rollout(self, _: object = None) -> None:
        if not self.active:
            return
        self._version += 1
        spec = {"deployment": "telemetry", "version": str(self._version)}
        for d in sorted(self.devices):
            self._after_s(
                self.work_rng.random() * self.config.rollout_spread_s, self._roll_one, (d, spec)
            )
        self._after_s(self.config.rollout_every_s or 0, self._rollout)

    def _roll_one(self, arg: tuple[str, dict[str, Any]]) -> None:
        if self.hub_up:
            self.hub.set_desired(arg[0], "telemetry", arg[1])

    def _hub_sees(self, device: str) -> bool:
        d = self.devices[device]
        return self.link_ok(device, d.relay) and self.link_ok(d.relay, HUB)

    def _check_moves(self, _: object = None) -> None:
        """The controller's lost-device rebalance, for the ``web`` replicas."""
        if self.active and self.hub_up:
            for slot, device in sorted(self.web.items()):
                if self._hub_sees(device):
                    self._offline_since.pop(device, None)
                    continue
                since = self._offline_since.setdefault(device, self.now)
                if self.now - since < self.config.move_after_s * 1000:
                    continue
                hosting = set(self.web.values())
                candidates = [
                    d for d in sorted(self.devices) if d not in hosting and self._hub_sees(d)
                ]
                if not candidates:
                    continue
                target = self.work_rng.choice(candidates)
                self.hub.set_desired(device, "web", None)
                self._offline_since.pop(device, None)
                self.counters["web_moves"] += 1
                self._place_web(slot, target)
        if self.active:
            self._after_s(self.config.move_check_s, self._check_moves)

    def _sweep(self, _: object = None) -> None:
        """Wake every session now and then (anti-entropy, a safety net)."""
        for d in self.devices.values():
            self.wake(d.id, d.relay)
        for relay in self.relays.values():
            self.wake(relay.id, HUB)
            self.wake(relay.id, FORWARDER)
            self.wake(HUB, relay.id)
        self._after_s(self.config.sweep_s, self._sweep)

    # -- faults ------------------------------------------------------------------------

    def _fault(self, a: Action) -> None:
        self.counters[f"fault_{a.kind}"] += 1
        region = a.region
        match a.kind:
            case "partition":
                assert region is not None
                self.partitioned[region] = True
            case "heal":
                assert region is not None
                self.partitioned[region] = False
                self._reconnect_relay_hub(relay_id(region))
            case "link_down":
                assert a.device is not None
                self._set_dev_up(a.device, up=False)
            case "link_up":
                assert a.device is not None
                self._set_dev_up(a.device, up=True)
                self._connect(a.device)
            case "kill_relay":
                assert region is not None
                self.relay_up[region] = False
            case "start_relay":
                assert region is not None
                self._restart_relay(region)
            case "kill_hub":
                self.hub_up = False
            case "start_hub":
                self._restart_hub()
            case "kill_broker":
                if region is None:
                    self.hub_broker_up = False
                else:
                    self.region_broker_up[region] = False
            case "start_broker":
                self._restart_broker(region)
            case "skew_clock" | "unskew_clock":
                assert a.device is not None
                self.devices[a.device].clock.offset_ms = a.value if a.kind == "skew_clock" else 0
            case "fill_disk" | "free_disk":
                assert a.device is not None
                self.devices[a.device].disk_full = a.kind == "fill_disk"
            case "garbage":
                assert a.device is not None
                d = self.devices[a.device]
                if self.link_ok(d.id, d.relay):
                    d.garbage(self.net_rng)

    def _reconnect_relay_hub(self, relay: str) -> None:
        if self.link_ok(relay, HUB):
            self.relays[relay].reconnect_hub()
            self.wake(HUB, relay)
            self.wake(relay, FORWARDER)

    def _restart_relay(self, region: str) -> None:
        if self.relay_up[region]:
            return
        self.relay_up[region] = True
        rid = relay_id(region)
        self.relays[rid].restart(start=True)
        self.wake(HUB, rid)
        for d in self.devices.values():
            if d.region == region:
                self._connect(d.id)

    def _restart_hub(self) -> None:
        if self.hub_up:
            return
        self.hub_up = True
        self.hub.restart(start=True)
        for relay in self.relays:
            self._reconnect_relay_hub(relay)

    def _restart_broker(self, region: str | None) -> None:
        if region is None:
            if self.hub_broker_up:
                return
            self.hub_broker_up = True
            for relay in self.relays:
                self._reconnect_relay_hub(relay)
            return
        if self.region_broker_up[region]:
            return
        self.region_broker_up[region] = True
        for d in self.devices.values():
            if d.region == region:
                self._connect(d.id)

    def _heal_all(self) -> bool:
        """End every disruption (the end of the run); return whether any was on."""
        was = (
            not all(self.dev_up.values())
            or not all(self.region_broker_up.values())
            or not all(self.relay_up.values())
            or any(self.partitioned.values())
            or not self.hub_up
            or not self.hub_broker_up
        )
        for r in self.fleet.regions:
            if self.partitioned[r]:
                self.partitioned[r] = False
                self._reconnect_relay_hub(relay_id(r))
            self._restart_relay(r)
            self._restart_broker(r)
        self._restart_broker(None)
        self._restart_hub()
        for d in self.devices.values():
            d.clock.offset_ms = 0
            d.disk_full = False
            if not self.dev_up[d.id]:
                self._set_dev_up(d.id, up=True)
                self._connect(d.id)
        return was

    # -- sampling ------------------------------------------------------------------------

    def _replica_map(self, replica: str, scope: str) -> Any:
        if replica == HUB:
            return self.hub.replica.scope(scope)
        if replica in self.relays:
            return self.relays[replica].replica.scope(scope)
        return self.devices[replica].replica.scope(scope)

    def _update_digests(self) -> set[str]:
        touched: set[str] = set()
        # Any order: each digest depends only on its own replica's scope.
        for replica, scope in self._dirty:
            if scope not in self._digests:
                continue
            self._digests[scope][replica] = scope_digest(self._replica_map(replica, scope))
            touched.add(scope)
        self._dirty.clear()
        for scope in touched:
            per = self._digests[scope]
            split = len(per) < len(self._replicas[scope]) or len(set(per.values())) > 1
            if split:
                self._split.add(scope)
            else:
                self._split.discard(scope)
        return touched

    def _take_sample(self) -> None:
        before = set(self._split)
        self._update_digests()
        t = (self.now - _START_MS) / 1000
        shown = sorted(before | self._split)
        digests = tuple(
            ReplicaDigest(replica, scope, self._digests[scope].get(replica, "-"))
            for scope in shown
            for replica in self._replicas[scope]
        )
        self.samples.append(StateSample(t, digests))
        last_ms, last_delivered, last_lost = self._last_sample
        dt = max((self.now - last_ms) / 1000, 1e-9)
        delivered = self.counters["delivered"]
        lost = (
            self.counters["lost_down"]
            + self.counters["lost_random"]
            + self.counters["lost_in_flight"]
        )
        split_devices = {s.split("/", 1)[1] for s in self._split}
        online = self._online()
        outbox = sum(len(r.outbox) for r in self.relays.values())
        self.builder.record(
            t,
            devices_online=online,
            converged_devices=len(self.devices) - len(split_devices),
            split_scopes=len(self._split),
            msgs_per_s=(delivered - last_delivered) / dt,
            lost_per_s=(lost - last_lost) / dt,
            outbox_items=outbox,
            device_events_pending=self._pending_events(),
        )
        self._last_sample = (self.now, delivered, lost)
        if self._progress is not None:
            self._progress(
                Progress(
                    t,
                    self.config.duration_s,
                    len(self.devices),
                    online,
                    len(self.devices) - len(split_devices),
                    (delivered - last_delivered) / dt,
                    "msg",
                    f"outbox {outbox}  events stored {len(self.hub.stored):,}",
                )
            )

    def _sample(self, _: object = None) -> None:
        self._take_sample()
        self._after_s(self.config.sample_s, self._sample)
        # What survived until now (replicas, stored events, samples) is kept for
        # the run: move it out of the cyclic collector's sight. Its full passes
        # otherwise walk millions of such objects again and again as they
        # accumulate over a long run. The run makes no reference cycles
        # (a collection after it finds none), so nothing is kept that would
        # have been freed; young objects are still collected as usual.
        gc.freeze()

    def _quiet(self) -> bool:
        if self._split or any(r.outbox for r in self.relays.values()):
            return False
        if any(d.busy() for d in self.devices.values()):
            return False
        return all(s.unacked == 0 for r in self.relays.values() for s in r.device_sessions.values())

    # -- the run --------------------------------------------------------------------------

    def _run_until(self, end_ms: int, stop: Callable[[], bool] | None = None) -> None:
        heap = self._heap
        pop = heapq.heappop
        check_every = round(self.config.sample_s * 1000)
        next_check = self.now + check_every
        n = 0  # events run, added to the counter once (nothing reads it meanwhile)
        try:
            while heap and heap[0][0] <= end_ms:
                t, _, fn, arg = pop(heap)
                self.now = t
                fn(arg)
                n += 1
                if stop is not None and t >= next_check:
                    next_check = t + check_every
                    if stop():
                        return
        finally:
            if n:
                self.counters["events"] += n
        self.now = max(self.now, end_ms) if stop is None else self.now

    def run(self) -> SimResult:
        """Run the schedule, settle, check the invariants, build the report."""
        try:
            return self._run()
        finally:
            gc.unfreeze()  # see _sample

    def _run(self) -> SimResult:
        wall0 = time.perf_counter()
        self._start()
        end = _START_MS + round(self.config.duration_s * 1000)
        self._run_until(end)
        self.now = max(self.now, end)
        self.active = False
        heals = [
            HealMark(fault, t, self.schedule.faults[fault].kind)
            for fault, t in sorted(self.timeline.heal_times().items())
        ]
        if self._heal_all():
            heals.append(HealMark(-1, self.config.duration_s, "end"))
        settle_end = self.now + round(self.config.settle_max_s * 1000)

        def quiet() -> bool:
            self._update_digests()
            return self._quiet()

        self._run_until(settle_end, quiet)
        self._take_sample()
        observations = self._observations(heals)
        invariants = check_invariants(observations)
        final = self._final(invariants)
        report = self.builder.build(lags=invariants.lags, final=final, invariants=invariants)
        wall = time.perf_counter() - wall0
        return SimResult(report, invariants, wall, dict(self.counters))

    def _observations(self, heals: list[HealMark]) -> Observations:
        obs = Observations(
            samples=self.samples,
            heals=heals,
            hub_events=self.hub.stored,
            replicas={"web": self.config.web_replicas} if self.config.web_replicas else {},
            hub_keys=self.hub_keys,
            converge_deadline_s=self.config.converge_deadline_s,
        )
        for d in self.devices.values():
            obs.acked_events += [EventKey(d.id, "events", s) for s in range(1, d.events.first_seq)]
            for dot in d.acked_dots():
                obs.acked_dots.append(DotKey(d.scope, dot.origin, dot.counter))
            obs.hub_vectors[d.scope] = self.hub.replica.scope(d.scope).context
            for name, spec in sorted(d.running.items()):
                if spec.get("deployment") == "web":
                    obs.running.append(RunningCopy("web", int(spec["slot"]), d.id))
                del name
            obs.applied_desired += [
                AppliedEntry(d.id, d.desired, tuple(e))
                for e in d.replica.scope(d.desired).entries_wire()
            ]
        return obs

    def _final(self, invariants: InvariantReport) -> dict[str, Any]:
        dropped = sum(d.events.dropped for d in self.devices.values())
        device_stats: Counter[str] = Counter()
        for d in self.devices.values():
            device_stats.update(d.stats)
        relay_stats: Counter[str] = Counter()
        for r in self.relays.values():
            relay_stats.update(r.stats)
        lags = [x.lag_s for x in invariants.lags if x.lag_s is not None]
        return {
            "sim_seconds": round((self.now - _START_MS) / 1000, 3),
            "devices": len(self.devices),
            "regions": len(self.relays),
            "messages": {
                k: v for k, v in sorted(self.counters.items()) if not k.startswith("fault_")
            },
            "faults_applied": {
                k[6:]: v for k, v in sorted(self.counters.items()) if k.startswith("fault_")
            },
            "events_stored": len(self.hub.stored),
            "events_dropped_by_quota": dropped,
            "device": dict(sorted(device_stats.items())),
            "relay": dict(sorted(relay_stats.items())),
            "hub": dict(sorted(self.hub.stats.items())),
            "ingest": {
                "batches": self.hub.ingestor.stats.batches,
                "duplicates": self.hub.ingestor.stats.duplicates,
                "held": self.hub.ingestor.stats.held,
                "dots": self.hub.ingestor.stats.dots,
                "events": self.hub.ingestor.stats.events,
            },
            "signatures": self.keys.stats(),
            "max_convergence_lag_s": max(lags, default=0.0),
            "invariants_ok": invariants.ok,
        }


def run_deterministic(
    config: SimConfig,
    schedule: FaultSchedule | None = None,
    fleet_spec: FleetSpec | None = None,
    *,
    schedule_source: str = "",
    progress: Callable[[Progress], None] | None = None,
) -> SimResult:
    """Build and run one deterministic simulation (``progress``: see :class:`DeterministicSim`)."""
    return DeterministicSim(
        config, schedule, fleet_spec, schedule_source=schedule_source, progress=progress
    ).run()


# Scope helpers re-exported for tests and the CLI.
SCOPES = (device_scope, desired_scope)
