"""Deterministic mode: virtual time, a simulated network, the real sync logic.

One thread per worker, no I/O and no wall clock: a priority queue of timed
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

**Regions run apart, on every core.** Nothing a region's devices, relay and
hub sessions do reaches another region: every scope is one device's, the hub
ingests and dedupes per device, and desired state goes down through the
device's own relay. So the hub is simulated as one shard per region (its
sessions, store and ingest for that region), each region draws its own random
numbers (network and workloads), and what does cross regions is a function of
the seed alone: the fault timeline and the link state it drives, rollout
versions, and the placement of ``web`` replicas (decided from that link state
with a generator of its own, identically in every worker). A worker process
runs a contiguous group of regions; the workers' outcomes are merged in region
order. Events that act on every region (faults, samples, sweeps, rollouts,
placement, settle checks) run before any region's event of the same
millisecond, so a region's run is the same whatever group it is in, and the
report is the same byte for byte for any number of workers (tested).

At ``duration_s`` new activity stops, every fault is healed, and the run goes
on (up to ``settle_max_s``) until every region is quiet; then the invariants
are checked over what was observed (:mod:`simulator.invariants`): per region
for events, deltas and signatures, over the merged samples and workloads for
convergence and single copies.
"""

from __future__ import annotations

import gc
import heapq
import logging
import multiprocessing
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection, wait
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
    FLEET_INVARIANTS,
    LOCAL_INVARIANTS,
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
    merge_reports,
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
    """With Ed25519, compute each verification once per worker (exact; see ``VerifyCache``)."""


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


@dataclass(frozen=True, slots=True)
class _Point:
    """A worker's part of one sample, in integers (summed exactly across workers)."""

    t: float
    online: int
    converged: int
    split: int
    delivered: int
    lost: int
    outbox: int
    pending: int
    stored: int


@dataclass
class ShardOutcome:
    """What one worker's group of regions observed (merged by :func:`_assemble`)."""

    regions: tuple[str, ...]
    end_ms: int
    points: list[_Point]
    samples: list[StateSample]
    heals: list[HealMark]
    running: list[RunningCopy]
    reports: list[InvariantReport]
    """Per region, in region order: the events, deltas and signature checks."""
    messages: Counter[str]
    faults: Counter[str]
    global_events: int
    device_stats: Counter[str]
    relay_stats: Counter[str]
    hub_stats: Counter[str]
    ingest: Counter[str]
    events_stored: int
    events_dropped: int
    signatures: dict[str, Any]


class DeterministicSim:
    """One seeded run of a group of regions. Build it, then :meth:`run` it once.

    Args:
        config: run parameters.
        schedule: faults (``None``: none).
        fleet_spec: the fleet file (default: every built-in profile).
        schedule_source: the schedule's file name, for errors.
        progress: called with a :class:`~simulator.progress.Progress` at every
            sample (to show it; it must not change anything).
        regions: the regions this worker simulates (default: all of them).
    """

    def __init__(
        self,
        config: SimConfig,
        schedule: FaultSchedule | None = None,
        fleet_spec: FleetSpec | None = None,
        *,
        schedule_source: str = "",
        progress: Callable[[Progress], None] | None = None,
        regions: Collection[str] | None = None,
    ) -> None:
        self.config = config
        self._progress = progress
        self._point_sink: Callable[[_Point], None] | None = None
        spec = fleet_spec or default_fleet_spec()
        self.fleet: Fleet = assign_fleet(
            spec, config.devices, regions=config.regions, seed=config.seed
        )
        unknown = set(regions or ()) - set(self.fleet.regions)
        if unknown:
            raise ValueError(f"regions not in the fleet: {', '.join(sorted(unknown))}")
        self.local: tuple[str, ...] = tuple(
            r for r in self.fleet.regions if regions is None or r in regions
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
        self._gseq = 0
        self._ticks: set[tuple[str, str]] = set()
        seed = config.seed
        # Each region draws its own numbers; placement has a generator of its
        # own that every worker advances identically (string seeds hash with
        # SHA-512, the same in every process).
        self._net_rng = {r: random.Random(f"{seed}/net/{r}") for r in self.fleet.regions}
        self._work_rng = {r: random.Random(f"{seed}/work/{r}") for r in self.fleet.regions}
        self.place_rng = random.Random(f"{seed}/placement")
        self.counters: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self._global_events = 0
        self._build()

    # -- construction --------------------------------------------------------------

    def _build(self) -> None:
        keys = self.keys = Signatures(
            self.config.seed, self.config.signatures, cache=self.config.verify_cache
        )
        hub_signer = keys.signer(HUB)
        hub_keys = keys.ring(hub_signer)
        local = set(self.local)
        # Every device's region (link state and placement span the fleet).
        self.region_of: dict[str, str] = {d.device_id: d.region for d in self.fleet.devices}
        self.region_of.update({relay_id(r): r for r in self.fleet.regions})
        self.all_devices: list[str] = sorted(d.device_id for d in self.fleet.devices)
        relay_signers = {r: keys.signer(relay_id(r)) for r in self.local}
        self.devices: dict[str, SimDevice] = {}
        for ref in self.fleet.devices:  # fleet order, as the regions' random draws go
            if ref.region in local:
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
        self.hubs: dict[str, SimHub] = {}
        # This worker's devices by region, in fleet order.
        self.members: dict[str, list[SimDevice]] = {r: [] for r in self.local}
        for d in self.devices.values():
            self.members[d.region].append(d)
        for region in self.local:
            members = self.members[region]
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
            # The hub's shard for the region: its relay session, store and ingest.
            self.hubs[region] = SimHub(
                [relay],
                members,
                signer=hub_signer,
                wire=self,
                keys=keys,
                dedupe=self.config.dedupe,
            )
        self.hub_keys = hub_keys
        self._owns_global = self.fleet.regions[0] in local
        # Link and process state: of the whole fleet (placement reads it).
        self.dev_up = dict.fromkeys((d.device_id for d in self.fleet.devices), True)
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
        self.points: list[_Point] = []
        # Workloads.
        self.web: dict[int, str] = {}
        self._web_gen = 0
        self._offline_since: dict[str, int] = {}
        self._version = 1

    # -- the Wire protocol for nodes, and the event queue ---------------------------

    def now_ms(self) -> int:
        """Virtual time in ms."""
        return self.now

    def _at(self, t_ms: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Schedule a region's event (after the global events of the same millisecond)."""
        self._seq += 1
        heapq.heappush(self._heap, (t_ms, self._seq, fn, arg))

    def _after_s(self, seconds: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._at(self.now + max(1, round(seconds * 1000)), fn, arg)

    def _at_global(self, t_ms: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Schedule an event that acts on every region (every worker runs it alike).

        Negative sequence numbers put it before any region's event of the same
        millisecond, in the order every worker schedules them.
        """
        self._gseq -= 1
        heapq.heappush(self._heap, (t_ms, self._gseq, fn, arg))

    def _global_after_s(self, seconds: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._at_global(self.now + max(1, round(seconds * 1000)), fn, arg)

    # -- the network -----------------------------------------------------------------

    def _hub_link_ok(self, region: str) -> bool:
        return (
            self.hub_up
            and self.hub_broker_up
            and self.relay_up[region]
            and not self.partitioned[region]
        )

    def link_ok(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` can talk now (any node of the fleet)."""
        if b == FORWARDER:
            b = HUB
        if HUB in (a, b):
            return self._hub_link_ok(self.region_of[b if a == HUB else a])
        device = a if a in self.dev_up else b
        region = self.region_of[device]
        return self.dev_up[device] and self.region_broker_up[region] and self.relay_up[region]

    def send(self, src: str, dst: str, data: bytes) -> None:
        """Put a message on the virtual network (lost if the link is down or by chance)."""
        counters = self.counters
        counters["sent"] += 1
        # link_ok and the link, inlined: this runs for every message.
        device = self.devices.get(src) or self.devices.get(dst)
        if device is None:
            region = self.region_of[dst if src == HUB else src]
            ok = self._hub_link_ok(region)
            link = self._hub_link
        else:
            region = device.region
            ok = self.dev_up[device.id] and self.region_broker_up[region] and self.relay_up[region]
            link = self._links[device.profile]
        if not ok:
            counters["lost_down"] += 1
            return
        rng = self._net_rng[region]
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
            self.hubs[self.region_of[src]].receive(src, data)
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
            busy = self.hubs[self.region_of[peer]].tick(peer)
        elif node in self.relays:
            busy = self.relays[node].tick(peer)
        else:
            busy = self.devices[node].tick()
        if busy:
            self.wake(node, peer)

    def _set_dev_up(self, device: str, *, up: bool) -> None:
        if self.dev_up[device] != up:
            self.dev_up[device] = up
            self._down[self.region_of[device]] += -1 if up else 1

    def _online(self) -> int:
        """This worker's devices whose link to their relay is up (as :meth:`link_ok`)."""
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
        for hub in self.hubs.values():
            hub.start()
        for d in self.devices.values():
            rng = self._work_rng[d.region]
            self._after_s(rng.random() * self.config.connect_spread_s, self._connect, d.id)
            if self.config.event_interval_s > 0:
                phase = rng.random() * self.config.event_interval_s
                self._after_s(phase, self._telemetry, (d.id, 0))
            if self.config.status_interval_s > 0:
                phase = rng.random() * self.config.status_interval_s
                self._after_s(phase, self._status, (d.id, 0))
            if self.config.crash_mean_s > 0:
                gap = rng.expovariate(1 / self.config.crash_mean_s)
                self._after_s(gap, self._crash, d.id)
        self._global_after_s(1.0, self._initial_desired)
        if self.config.rollout_every_s:
            self._global_after_s(self.config.rollout_every_s, self._rollout)
        for action in self.timeline:
            self._at_global(_START_MS + round(action.t * 1000), self._fault, action)
        self._global_after_s(self.config.sample_s, self._sample)
        self._global_after_s(self.config.sweep_s, self._sweep)
        if self.config.web_replicas:
            self._global_after_s(self.config.move_check_s, self._check_moves)

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
        d = self.devices[device]
        rng = self._work_rng[d.region]
        d.crash(rng)
        self._after_s(rng.expovariate(1 / self.config.crash_mean_s), self._crash, device)

    def _set_desired(self, device: str, key: str, value: Any) -> None:
        """The hub's write of ``device``'s desired state, where this worker runs it."""
        if device in self.devices:
            self.hubs[self.devices[device].region].set_desired(device, key, value)

    def _initial_desired(self, _: object = None) -> None:
        for d in sorted(self.devices):
            self._set_desired(d, "telemetry", {"deployment": "telemetry", "version": "1"})
        hosts = self.place_rng.sample(
            self.all_devices, min(self.config.web_replicas, len(self.all_devices))
        )
        for slot, device in enumerate(hosts):
            self._place_web(slot, device)

    def _place_web(self, slot: int, device: str) -> None:
        self._web_gen += 1
        self.web[slot] = device
        spec = {"deployment": "web", "slot": slot, "version": "1", "gen": self._web_gen}
        self._set_desired(device, "web", spec)

    def _rollout(self, _: object = None) -> None:
        if not self.active:
            return
        self._version += 1
        spec = {"deployment": "telemetry", "version": str(self._version)}
        for d in sorted(self.devices):
            rng = self._work_rng[self.region_of[d]]
            self._after_s(rng.random() * self.config.rollout_spread_s, self._roll_one, (d, spec))
        self._global_after_s(self.config.rollout_every_s or 0, self._rollout)

    def _roll_one(self, arg: tuple[str, dict[str, Any]]) -> None:
        if self.hub_up:
            self._set_desired(arg[0], "telemetry", arg[1])

    def _hub_sees(self, device: str) -> bool:
        region = self.region_of[device]
        return self.link_ok(device, relay_id(region)) and self._hub_link_ok(region)

    def _check_moves(self, _: object = None) -> None:
        """The controller's lost-device rebalance, for the ``web`` replicas.

        It reads only link state, which faults alone drive, so every worker
        decides the same moves; each writes the desired state of its own devices.
        """
        if self.active and self.hub_up:
            for slot, device in sorted(self.web.items()):
                if self._hub_sees(device):
                    self._offline_since.pop(device, None)
                    continue
                since = self._offline_since.setdefault(device, self.now)
                if self.now - since < self.config.move_after_s * 1000:
                    continue
                hosting = set(self.web.values())
                candidates = [d for d in self.all_devices if d not in hosting and self._hub_sees(d)]
                if not candidates:
                    continue
                target = self.place_rng.choice(candidates)
                self._set_desired(device, "web", None)
                self._offline_since.pop(device, None)
                if device in self.devices:
                    self.counters["web_moves"] += 1
                self._place_web(slot, target)
        if self.active:
            self._global_after_s(self.config.move_check_s, self._check_moves)

    def _sweep(self, _: object = None) -> None:
        """Wake every session now and then (anti-entropy, a safety net)."""
        for d in self.devices.values():
            self.wake(d.id, d.relay)
        for relay in self.relays.values():
            self.wake(relay.id, HUB)
            self.wake(relay.id, FORWARDER)
            self.wake(HUB, relay.id)
        self._global_after_s(self.config.sweep_s, self._sweep)

    # -- faults ------------------------------------------------------------------------

    def _owns(self, a: Action) -> bool:
        """Whether this worker counts ``a`` (each action is counted by one worker)."""
        if a.device is not None:
            return a.device in self.devices
        if a.region is not None:
            return relay_id(a.region) in self.relays
        return self._owns_global

    def _fault(self, a: Action) -> None:
        # Link and process flags change in every worker (placement reads them
        # fleet-wide); nodes are acted on where they run.
        if self._owns(a):
            self.faults[a.kind] += 1
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
                if a.device in self.devices:
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
                if a.device in self.devices:
                    offset = a.value if a.kind == "skew_clock" else 0
                    self.devices[a.device].clock.offset_ms = offset
            case "fill_disk" | "free_disk":
                assert a.device is not None
                if a.device in self.devices:
                    self.devices[a.device].disk_full = a.kind == "fill_disk"
            case "garbage":
                assert a.device is not None
                d = self.devices.get(a.device)
                if d is not None and self.link_ok(d.id, d.relay):
                    d.garbage(self._net_rng[d.region])

    def _reconnect_relay_hub(self, relay: str) -> None:
        if relay in self.relays and self.link_ok(relay, HUB):
            self.relays[relay].reconnect_hub()
            self.wake(HUB, relay)
            self.wake(relay, FORWARDER)

    def _restart_relay(self, region: str) -> None:
        if self.relay_up[region]:
            return
        self.relay_up[region] = True
        rid = relay_id(region)
        if rid not in self.relays:
            return
        self.relays[rid].restart(start=True)
        self.wake(HUB, rid)
        for d in self.members.get(region, ()):
            self._connect(d.id)

    def _restart_hub(self) -> None:
        if self.hub_up:
            return
        self.hub_up = True
        for hub in self.hubs.values():
            hub.restart(start=True)
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
        for d in self.members.get(region, ()):
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
        for device in [d for d, up in self.dev_up.items() if not up]:
            self._set_dev_up(device, up=True)
            if device in self.devices:
                self._connect(device)
        return was

    # -- sampling ------------------------------------------------------------------------

    def _scope_region(self, scope: str) -> str:
        return self.region_of[scope.split("/", 1)[1]]

    def _replica_map(self, replica: str, scope: str) -> Any:
        if replica == HUB:
            return self.hubs[self._scope_region(scope)].replica.scope(scope)
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
        lost = (
            self.counters["lost_down"]
            + self.counters["lost_random"]
            + self.counters["lost_in_flight"]
        )
        split_devices = {s.split("/", 1)[1] for s in self._split}
        point = _Point(
            t,
            online=self._online(),
            converged=len(self.devices) - len(split_devices),
            split=len(self._split),
            delivered=self.counters["delivered"],
            lost=lost,
            outbox=sum(len(r.outbox) for r in self.relays.values()),
            pending=self._pending_events(),
            stored=sum(len(h.stored) for h in self.hubs.values()),
        )
        self.points.append(point)
        if self._point_sink is not None:
            self._point_sink(point)
        elif self._progress is not None:
            self._progress(
                _progress(
                    point,
                    self._last_point,
                    self.config.duration_s,
                    len(self.fleet.devices),
                )
            )
        self._last_point = point

    _last_point: _Point | None = None

    def _quiet_since(self, floor: int) -> bool:
        return self._quiet_sample is not None and self._quiet_sample >= floor

    _settling = False
    _quiet_sample: int | None = None
    """Settling: the last sample at which every region of this worker was quiet."""

    def _sample(self, _: object = None) -> None:
        self._take_sample()
        if self._settling and all(self._quiet(r) for r in self.local):
            self._quiet_sample = self.now
        self._global_after_s(self.config.sample_s, self._sample)
        # What survived until now (replicas, stored events, samples) is kept for
        # the run: move it out of the cyclic collector's sight. Its full passes
        # otherwise walk millions of such objects again and again as they
        # accumulate over a long run. The run makes no reference cycles
        # (a collection after it finds none), so nothing is kept that would
        # have been freed; young objects are still collected as usual.
        gc.freeze()

    def _quiet(self, region: str) -> bool:
        """Whether ``region`` has nothing left to converge, forward or acknowledge."""
        rid = relay_id(region)
        if any(self._scope_region(s) == region for s in self._split):
            return False
        relay = self.relays[rid]
        if relay.outbox:
            return False
        if any(d.busy() for d in self.members[region]):
            return False
        return all(s.unacked == 0 for s in relay.device_sessions.values())

    # -- the run --------------------------------------------------------------------------

    def _run_until(self, end_ms: int, stop: Callable[[], bool] | None = None) -> None:
        """Run every event up to ``end_ms`` (or until ``stop``, asked at each global event)."""
        heap = self._heap
        pop = heapq.heappop
        n = g = 0  # events run, added to the counters once (nothing reads them meanwhile)
        try:
            while heap and heap[0][0] <= end_ms:
                t, seq, fn, arg = pop(heap)
                self.now = t
                fn(arg)
                n += 1
                if seq < 0:
                    g += 1
                    if stop is not None and stop():
                        return
        finally:
            self.counters["events"] += n - g
            self._global_events += g
        self.now = max(self.now, end_ms)

    def run(self) -> SimResult:
        """Run the schedule, settle, check the invariants, build the report."""
        wall0 = time.perf_counter()
        outcome = self.run_shard(lambda quiet_ms: (True, quiet_ms))
        result = _assemble(self.config, self.fleet, self.schedule, [outcome])
        result.wall_s = time.perf_counter() - wall0
        return result

    def run_shard(self, agree: Callable[[int], tuple[bool, int]]) -> ShardOutcome:
        """Run this worker's regions to the end and return what they observed.

        Settling, ``agree`` is given the first sample time at which every region
        here is quiet (or the settle deadline) and returns whether the run ends
        there and when: ``(True, t)`` ends it at ``t`` (the time all workers
        agree on); ``(False, t)`` asks for the first such time at or after ``t``.
        """
        try:
            return self._run_shard(agree)
        finally:
            gc.unfreeze()  # see _sample

    def _run_shard(self, agree: Callable[[int], tuple[bool, int]]) -> ShardOutcome:
        self._start()
        end = _START_MS + round(self.config.duration_s * 1000)
        self._run_until(end)
        self.active = False
        heals = [
            HealMark(fault, t, self.schedule.faults[fault].kind)
            for fault, t in sorted(self.timeline.heal_times().items())
        ]
        if self._heal_all():
            heals.append(HealMark(-1, self.config.duration_s, "end"))
        # Settle: each sample (a global event: the same virtual times in every
        # worker) notes whether all of this worker's regions are quiet. The run
        # ends at the first sample where every region of every worker is: each
        # worker offers its next quiet sample, and they agree on the latest
        # until all offer the same one (or the deadline passes).
        settle_end = self.now + round(self.config.settle_max_s * 1000)
        self._settling = True
        floor = self.now
        while True:
            if self._quiet_sample is None or self._quiet_sample < floor:
                self._run_until(settle_end, partial(self._quiet_since, floor))
            offer = self._quiet_sample
            if offer is None or offer < floor:
                offer = settle_end
            done, floor = agree(offer)
            if done:
                break
        self._run_until(floor)
        self.now = floor
        self._take_sample()
        return self._outcome(heals)

    def _region_report(self, region: str) -> InvariantReport:
        hub = self.hubs[region]
        obs = Observations(hub_events=hub.stored, hub_keys=self.hub_keys)
        for d in self.members[region]:
            obs.acked_events += [EventKey(d.id, "events", s) for s in range(1, d.events.first_seq)]
            for dot in d.acked_dots():
                obs.acked_dots.append(DotKey(d.scope, dot.origin, dot.counter))
            obs.hub_vectors[d.scope] = hub.replica.scope(d.scope).context
            obs.applied_desired += [
                AppliedEntry(d.id, d.desired, tuple(e))
                for e in d.replica.scope(d.desired).entries_wire()
            ]
        return check_invariants(obs, only=LOCAL_INVARIANTS)

    def _outcome(self, heals: list[HealMark]) -> ShardOutcome:
        running = [
            RunningCopy("web", int(spec["slot"]), d.id)
            for d in self.devices.values()
            for _, spec in sorted(d.running.items())
            if spec.get("deployment") == "web"
        ]
        device_stats: Counter[str] = Counter()
        for d in self.devices.values():
            device_stats.update(d.stats)
        relay_stats: Counter[str] = Counter()
        for r in self.relays.values():
            relay_stats.update(r.stats)
        hub_stats: Counter[str] = Counter()
        ingest: Counter[str] = Counter()
        for h in self.hubs.values():
            hub_stats.update(h.stats)
            s = h.ingestor.stats
            ingest.update(
                batches=s.batches,
                duplicates=s.duplicates,
                held=s.held,
                dots=s.dots,
                events=s.events,
            )
        return ShardOutcome(
            regions=self.local,
            end_ms=self.now,
            points=self.points,
            samples=self.samples,
            heals=heals,
            running=running,
            reports=[self._region_report(r) for r in self.local],
            messages=self.counters,
            faults=self.faults,
            global_events=self._global_events,
            device_stats=device_stats,
            relay_stats=relay_stats,
            hub_stats=hub_stats,
            ingest=ingest,
            events_stored=sum(len(h.stored) for h in self.hubs.values()),
            events_dropped=sum(d.events.dropped for d in self.devices.values()),
            signatures=self.keys.stats(),
        )


# -- merging workers' outcomes ---------------------------------------------------------


def _rates(point: _Point, last: _Point | None) -> tuple[float, float]:
    """Messages delivered and lost per second since the sample before (or the start)."""
    t0, delivered0, lost0 = (0.0, 0, 0) if last is None else (last.t, last.delivered, last.lost)
    dt = max(point.t - t0, 1e-9)
    return (point.delivered - delivered0) / dt, (point.lost - lost0) / dt


def _progress(point: _Point, last: _Point | None, duration_s: float, devices: int) -> Progress:
    return Progress(
        point.t,
        duration_s,
        devices,
        point.online,
        point.converged,
        _rates(point, last)[0],
        "msg",
        f"outbox {point.outbox}  events stored {point.stored:,}",
    )


def _sum_points(points: Sequence[_Point]) -> _Point:
    return _Point(
        points[0].t,
        online=sum(p.online for p in points),
        converged=sum(p.converged for p in points),
        split=sum(p.split for p in points),
        delivered=sum(p.delivered for p in points),
        lost=sum(p.lost for p in points),
        outbox=sum(p.outbox for p in points),
        pending=sum(p.pending for p in points),
        stored=sum(p.stored for p in points),
    )


def _merge_samples(outcomes: Sequence[ShardOutcome]) -> list[StateSample]:
    """One sample per time, its digests in scope order (each scope is one worker's)."""
    merged: list[StateSample] = []
    for parts in zip(*(o.samples for o in outcomes), strict=True):
        digests = sorted((d for part in parts for d in part.digests), key=lambda d: d.scope)
        merged.append(StateSample(parts[0].t, tuple(digests)))
    return merged


def _assemble(
    config: SimConfig,
    fleet: Fleet,
    schedule: FaultSchedule,
    outcomes: Sequence[ShardOutcome],
) -> SimResult:
    """Merge the workers' outcomes (in region order) into the run's result."""
    outcomes = sorted(outcomes, key=lambda o: fleet.regions.index(o.regions[0]))
    ends = {o.end_ms for o in outcomes}
    if len(ends) != 1 or len({len(o.points) for o in outcomes}) != 1:
        raise RuntimeError(f"workers ended apart: {sorted(ends)}")
    builder = ReportBuilder(
        "NovaCron deterministic simulation",
        {
            "mode": "deterministic",
            "seed": config.seed,
            "devices": config.devices,
            "regions": len(fleet.regions),
            "duration_s": config.duration_s,
            "faults": len(schedule.faults),
            "dedupe": config.dedupe,
            "signatures": config.signatures,
        },
        _SERIES,
    )
    last: _Point | None = None
    devices = len(fleet.devices)
    for parts in zip(*(o.points for o in outcomes), strict=True):
        point = _sum_points(parts)
        msgs_per_s, lost_per_s = _rates(point, last)
        builder.record(
            point.t,
            devices_online=point.online,
            converged_devices=point.converged,
            split_scopes=point.split,
            msgs_per_s=msgs_per_s,
            lost_per_s=lost_per_s,
            outbox_items=point.outbox,
            device_events_pending=point.pending,
        )
        last = point
    observations = Observations(
        samples=_merge_samples(outcomes),
        heals=outcomes[0].heals,
        running=[c for o in outcomes for c in o.running],
        replicas={"web": config.web_replicas} if config.web_replicas else {},
        converge_deadline_s=config.converge_deadline_s,
    )
    fleet_wide = check_invariants(observations, only=FLEET_INVARIANTS)
    invariants = merge_reports([fleet_wide, *(r for o in outcomes for r in o.reports)])
    messages: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    final_counters: dict[str, Counter[str]] = {
        k: Counter() for k in ("device", "relay", "hub", "ingest")
    }
    for o in outcomes:
        messages.update(o.messages)
        faults.update(o.faults)
        final_counters["device"].update(o.device_stats)
        final_counters["relay"].update(o.relay_stats)
        final_counters["hub"].update(o.hub_stats)
        final_counters["ingest"].update(o.ingest)
    messages["events"] += outcomes[0].global_events  # run by every worker, counted once
    lags = [x.lag_s for x in invariants.lags if x.lag_s is not None]
    signatures = dict(outcomes[0].signatures)
    final = {
        "sim_seconds": round((outcomes[0].end_ms - _START_MS) / 1000, 3),
        "devices": devices,
        "regions": len(fleet.regions),
        "messages": dict(sorted((+messages).items())),
        "faults_applied": dict(sorted(faults.items())),
        "events_stored": sum(o.events_stored for o in outcomes),
        "events_dropped_by_quota": sum(o.events_dropped for o in outcomes),
        **{k: dict(sorted((+c).items())) for k, c in final_counters.items()},
        "signatures": {"mode": signatures["mode"]},
        "max_convergence_lag_s": max(lags, default=0.0),
        "invariants_ok": invariants.ok,
    }
    report = builder.build(lags=invariants.lags, final=final, invariants=invariants)
    stats = {
        "workers": len(outcomes),
        "signatures": [o.signatures for o in outcomes],
        **messages,
    }
    return SimResult(report, invariants, 0.0, stats)


# -- workers ---------------------------------------------------------------------------


def _groups(fleet: Fleet, workers: int) -> list[tuple[str, ...]]:
    """Contiguous groups of regions with about equal device counts."""
    sizes = Counter(d.region for d in fleet.devices)
    regions = list(fleet.regions)
    workers = max(1, min(workers, len(regions)))
    total = sum(sizes.values())
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    done = 0
    for i, region in enumerate(regions):
        current.append(region)
        done += sizes[region]
        left_groups = workers - len(groups) - 1
        left_regions = len(regions) - i - 1
        if left_groups and (
            done >= total * (len(groups) + 1) / workers or left_regions == left_groups
        ):
            groups.append(tuple(current))
            current = []
    groups.append(tuple(current))
    return [g for g in groups if g]


@dataclass(frozen=True)
class _Job:
    """What a worker process is given (inherited through fork)."""

    config: SimConfig
    schedule: FaultSchedule | None
    fleet_spec: FleetSpec | None
    schedule_source: str
    regions: tuple[str, ...]


def _worker(conn: Connection, job: _Job) -> None:
    try:
        sim = DeterministicSim(
            job.config,
            job.schedule,
            job.fleet_spec,
            schedule_source=job.schedule_source,
            regions=job.regions,
        )
        sim._point_sink = lambda point: conn.send(("point", point))

        def agree(quiet_ms: int) -> tuple[bool, int]:
            conn.send(("quiet", quiet_ms))
            kind, when = conn.recv()
            return kind == "end", int(when)

        conn.send(("done", sim.run_shard(agree)))
    except BaseException:  # reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run_workers(
    jobs: list[_Job], progress: Callable[[Progress], None] | None, devices: int
) -> list[ShardOutcome]:
    config = jobs[0].config
    duration_s = config.duration_s
    settle_end = _START_MS + round(config.duration_s * 1000) + round(config.settle_max_s * 1000)
    ctx = multiprocessing.get_context("fork")
    conns: list[Connection] = []
    procs = []
    ok = False
    try:
        for job in jobs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(child, job),
                name=f"sim-{job.regions[0]}",
                daemon=True,
            )
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        index = {id(c): i for i, c in enumerate(conns)}
        pending: dict[int, list[_Point]] = {}
        sent = [0] * len(conns)
        last: _Point | None = None
        quiet: dict[int, int] = {}
        outcomes: dict[int, ShardOutcome] = {}
        while len(outcomes) < len(conns):
            for conn in wait([c for i, c in enumerate(conns) if i not in outcomes]):
                assert isinstance(conn, Connection)
                i = index[id(conn)]
                try:
                    kind, value = conn.recv()
                except EOFError:
                    raise RuntimeError(f"simulation worker {i} died") from None
                if kind == "point":
                    # Every worker samples at the same times: the n-th points go together.
                    sent[i] += 1
                    parts = pending.setdefault(sent[i], [])
                    parts.append(value)
                    if len(parts) == len(conns):
                        point = _sum_points(pending.pop(sent[i]))
                        if progress is not None:
                            progress(_progress(point, last, duration_s, devices))
                        last = point
                elif kind == "quiet":
                    quiet[i] = value
                    if len(quiet) == len(conns):
                        # Done when all offer the same sample, or the deadline.
                        when = max(quiet.values())
                        done = len(set(quiet.values())) == 1 or when >= settle_end
                        for c in conns:
                            c.send(("end" if done else "again", when))
                        quiet.clear()
                elif kind == "done":
                    outcomes[i] = value
                else:
                    raise RuntimeError(f"simulation worker {i} failed:\n{value}")
        ok = True
        return [outcomes[i] for i in range(len(conns))]
    finally:
        for proc in procs:
            if not ok:  # a worker failed (or we were interrupted): stop the others now
                proc.kill()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        for c in conns:
            c.close()


def run_deterministic(
    config: SimConfig,
    schedule: FaultSchedule | None = None,
    fleet_spec: FleetSpec | None = None,
    *,
    schedule_source: str = "",
    progress: Callable[[Progress], None] | None = None,
    workers: int = 1,
) -> SimResult:
    """Build and run one deterministic simulation over ``workers`` processes.

    The result is the same for any ``workers`` (see the module docstring);
    ``progress``: see :class:`DeterministicSim`.
    """
    wall0 = time.perf_counter()
    if workers <= 1:
        result = DeterministicSim(
            config, schedule, fleet_spec, schedule_source=schedule_source, progress=progress
        ).run()
        result.wall_s = time.perf_counter() - wall0
        return result
    spec = fleet_spec or default_fleet_spec()
    fleet = assign_fleet(spec, config.devices, regions=config.regions, seed=config.seed)
    jobs = [
        _Job(config, schedule, fleet_spec, schedule_source, group)
        for group in _groups(fleet, workers)
    ]
    # Checked here, before any worker starts: a bad schedule is the caller's error.
    FaultTimeline(
        schedule or FaultSchedule(),
        fleet.devices,
        config.seed,
        outage_means=outage_means(sorted({d.profile for d in fleet.devices})),
        horizon_s=config.duration_s,
        source=schedule_source,
    )
    outcomes = _run_workers(jobs, progress, len(fleet.devices))
    result = _assemble(config, fleet, schedule or FaultSchedule(), outcomes)
    result.wall_s = time.perf_counter() - wall0
    return result


# Scope helpers re-exported for tests and the CLI.
SCOPES = (device_scope, desired_scope)
