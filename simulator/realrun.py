"""``novacron sim run`` (real-process mode): the real stack at scale, under faults.

The main process runs the MQTT broker (embedded amqtt unless ``--broker``), the
hub and one relay per region (:class:`~simulator.composition.FleetStack`, each
relay's hub link through a TCP proxy), the fault injector, the sampler and the
invariant checker. ``W`` worker processes (:mod:`simulator._worker`) each
enroll and run their share of the ``N`` devices: real agents with the ``sim``
runtime, in one event loop per worker.

Faults (:mod:`simulator.faults`) and how they are applied here:

=================  ====================================================================
partition_region   the region relay's upstream proxy is cut, then healed
kill_relay         the relay stops (outbox on disk) and starts again
kill_hub           the hub stops (store on disk) and starts again on the same port
kill_broker        the embedded broker stops and starts again (forgetting everything);
                   not possible with ``--broker`` (recorded as a failed action)
flap_devices       the device's agent stops (as on a power or link loss: connection
                   gone, journal kept) and starts again from its journal. A proxy per
                   device would cost a port each and cap the fleet near 28,000 devices
                   per host; stopping the agent exercises the same reconnect and
                   resync path, plus the journal's restart
clock_skew         the device's agent reads a wall clock whose offset the worker sets
                   (:class:`~simulator.composition.SkewedClock`), then sets back
garbage            the device's broker account publishes random bytes on its upstream
                   topic from a second connection (the agent's own goes on)
fill_disk          the agent's journal file may not grow (``Journal.freeze_size``):
                   writes needing space fail as on a full disk, the agent carries on
=================  ====================================================================

Invariants (:mod:`simulator.invariants`), fed from what the run saw:
``convergence`` from digests of every replica of every ``desired/<id>`` and
``device/<id>`` scope (hub store, relay, agent) sampled every few seconds;
``events`` from the sequence numbers each agent's relay acknowledged against
the hub store's ingest cursors; ``single_copy`` from what the runtimes run
against the hub's placement of a ``replicas`` deployment; ``signed_desired``
from the desired entries the agents hold, checked with the hub's key.
``deltas`` is not fed here (the deterministic mode checks it).

After ``--duration`` every fault still open is healed and the run waits (up to
``settle_s``) for the fleet to converge and stay converged for three samples in
a row, so the last fault's convergence lag is measured too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

from simulator.broker import EmbeddedBroker
from simulator.composition import FleetStack, Tuning, create_tokens
from simulator.faults import Action, DeviceRef, FaultSchedule, FaultTimeline
from simulator.fleet import FleetSpec, assign_fleet, default_fleet_spec, outage_means
from simulator.injector import FaultInjector
from simulator.invariants import (
    AppliedEntry,
    EventKey,
    InvariantReport,
    Observations,
    ReplicaDigest,
    RunningCopy,
    StateSample,
    check_invariants,
    scope_digest,
)
from simulator.progress import Progress, ProgressDisplay, final_table
from simulator.report import ReportBuilder, RunReport
from sync.crdt import LwwMap
from sync.keys import KeyRing
from sync.signed import unwrap

__all__ = ["RealResult", "RealRunConfig", "run_real"]

log = logging.getLogger(__name__)

EACH = "telemetry"
REPLICAS = "aggregator"
WORKER_EXIT_S = 30.0
"""How long a worker may take to stop its agents before it is killed."""
FINAL_WAIT_S = 600.0
"""How long a worker may take to report its agents' final state."""
SHUTDOWN_TIMEOUT_S = 90.0
"""How long stopping the workers, relays, hub and broker may take."""
SERIES = {
    "devices_online": ("devices online (hub view)", "devices"),
    "devices_converged": ("devices converged", "devices"),
    "agents_running": ("agents running", "devices"),
    "split_scopes": ("scopes whose replicas differ", "convergence"),
    "outbox_depth": ("relay outbox depth (items)", "relays"),
    "events_ingested_per_s": ("hub events ingested per second", "rates"),
}


@dataclass(frozen=True)
class RealRunConfig:
    """Parameters of one real-process run."""

    devices: int = 100
    regions: int | None = None
    duration_s: float = 300.0
    seed: int = 0
    broker_url: str | None = None
    workers: int = 2
    fleet: FleetSpec | None = None
    schedule: FaultSchedule | None = None
    schedule_source: str = ""
    converge_deadline_s: float | None = None
    sample_s: float | None = None
    settle_s: float = 90.0
    progress_s: float = 5.0
    tuning: Tuning = field(default_factory=Tuning)


@dataclass(frozen=True)
class RealResult:
    """What a run gives back: the invariant outcome and the report."""

    invariants: InvariantReport
    report: RunReport
    wall_s: float


def _manifest(name: str, *, mode: str, release: int, replicas: int = 1) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "workload": {
            "name": name,
            "driver": "process",
            "command": [f"/usr/local/bin/{name}"],
            "env": {"RELEASE": str(release)},
            "resources": {"cpu_millis": 50, "memory_mb": 16},
        },
        "selector": {"labels": {"app": "sim"}},
        "mode": mode,
        "rollout": {
            "waves": [{"percent": 10}, {"percent": 50}, {"percent": 100}],
            "success_threshold": 0.9,
            "wave_timeout_s": 120,
            "offline_deadline_s": 120,
            "failure_budget": 0.2,
            "on_failure": "pause",
        },
    }
    if mode == "replicas":
        spec["replicas"] = replicas
    return {
        "kind": "Deployment",
        "apiVersion": "novacron.io/v1",
        "metadata": {"name": name},
        "spec": spec,
    }


def _decode(blob: bytes | None) -> LwwMap:
    from sync._msgpack_strict import unpackb_strict  # noqa: PLC0415

    return LwwMap() if blob is None else LwwMap.from_wire(unpackb_strict(blob))


# -- workers -------------------------------------------------------------------------


class _Workers:
    """The worker processes and their pipes (one request at a time per worker)."""

    def __init__(self) -> None:
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.locks: list[asyncio.Lock] = []
        self.owner: dict[str, int] = {}

    def spawn(self, inits: Sequence[Any]) -> None:
        from simulator._worker import worker_main  # noqa: PLC0415

        ctx = multiprocessing.get_context("spawn")
        for init in inits:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(child, init), name=f"sim-worker-{init.index}"
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
            self.locks.append(asyncio.Lock())

    async def _recv(self, i: int, wait_s: float) -> Any:
        conn = self.conns[i]

        def wait() -> Any:
            if not conn.poll(wait_s):
                raise TimeoutError(f"worker {i} gave no answer within {wait_s:g} s")
            return conn.recv()

        kind, payload = await asyncio.to_thread(wait)
        if kind == "error":
            raise RuntimeError(f"worker {i} failed:\n{payload}")
        return payload

    async def ready(self, wait_s: float) -> list[tuple[int, str, str, str]]:
        answers = await asyncio.gather(*(self._recv(i, wait_s) for i in range(len(self.conns))))
        out: list[tuple[int, str, str, str]] = []
        for i, devices in enumerate(answers):
            for index, did, region, profile in devices:
                self.owner[did] = i
                out.append((index, did, region, profile))
        return sorted(out)

    async def request(self, i: int, *request: Any, wait_s: float = 120.0) -> Any:
        async with self.locks[i]:
            self.conns[i].send(request)
            return await self._recv(i, wait_s)

    async def each(self, *request: Any, wait_s: float = 120.0) -> list[Any]:
        return list(
            await asyncio.gather(
                *(self.request(i, *request, wait_s=wait_s) for i in range(len(self.conns)))
            )
        )

    async def to_devices(self, kind: str, devices: Sequence[str], *args: Any) -> None:
        per: dict[int, list[str]] = {}
        for did in devices:
            per.setdefault(self.owner[did], []).append(did)
        await asyncio.gather(*(self.request(i, kind, ids, *args) for i, ids in per.items()))

    async def close(self) -> None:
        """Ask every worker to stop its agents; past a bound, end the process."""

        async def one(i: int) -> None:
            with contextlib.suppress(Exception):
                await self.request(i, "exit", wait_s=WORKER_EXIT_S)

        await asyncio.gather(*(one(i) for i in range(len(self.conns))))
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():
                log.warning("worker %s did not exit in time: killed", proc.name)
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        for conn in self.conns:
            conn.close()


# -- faults --------------------------------------------------------------------------


class _Target:
    """Applies fault actions to the stack, the broker and the workers."""

    def __init__(self, stack: FleetStack, broker: EmbeddedBroker | None, workers: _Workers) -> None:
        self.stack = stack
        self.broker = broker
        self.workers = workers
        self.down_devices: set[str] = set()
        self.skewed_devices: set[str] = set()
        self.full_disks: set[str] = set()

    async def apply(self, action: Action) -> None:
        match action.kind:
            case "partition":
                self.stack.partition(action.region or "")
            case "heal":
                self.stack.heal(action.region or "")
            case "kill_relay":
                await self.stack.stop_relay(action.region or "")
            case "start_relay":
                await self.stack.start_relay(action.region or "")
            case "kill_hub":
                await self.stack.stop_hub()
            case "start_hub":
                await self.stack.start_hub()
            case "kill_broker" | "start_broker":
                if self.broker is None:
                    raise NotImplementedError("kill_broker needs the embedded broker (no --broker)")
                if action.kind == "kill_broker":
                    await self.broker.stop()
                else:
                    await self.broker.start()
            case "link_down":
                self.down_devices.add(action.device or "")
                await self.workers.to_devices("stop", [action.device or ""])
            case "link_up":
                self.down_devices.discard(action.device or "")
                await self.workers.to_devices("start", [action.device or ""])
            case "skew_clock" | "unskew_clock":
                device = action.device or ""
                offset = action.value if action.kind == "skew_clock" else 0
                await self.workers.to_devices("skew", [device], offset)
                (self.skewed_devices.add if offset else self.skewed_devices.discard)(device)
            case "garbage":
                await self.workers.to_devices("garbage", [action.device or ""])
            case "fill_disk" | "free_disk":
                device = action.device or ""
                full = action.kind == "fill_disk"
                await self.workers.to_devices("disk", [device], full)
                (self.full_disks.add if full else self.full_disks.discard)(device)
            case _:
                # Every kind FaultTimeline makes is handled above.
                raise NotImplementedError(f"unknown fault action {action.kind!r}")

    async def heal_everything(self) -> None:
        """End every disruption still in force (the run is over)."""
        for region in self.stack.regions:
            self.stack.heal(region)
        if self.broker is not None:
            await self.broker.start()
        await self.stack.start_hub()
        for region in self.stack.regions:
            await self.stack.start_relay(region)
        if self.down_devices:
            await self.workers.to_devices("start", sorted(self.down_devices))
            self.down_devices.clear()
        if self.skewed_devices:
            await self.workers.to_devices("skew", sorted(self.skewed_devices), 0)
            self.skewed_devices.clear()
        if self.full_disks:
            await self.workers.to_devices("disk", sorted(self.full_disks), False)
            self.full_disks.clear()


# -- sampling ------------------------------------------------------------------------


@dataclass
class _Sample:
    t: float
    digests: list[ReplicaDigest]
    online: int
    converged: int
    running_agents: int
    split: int
    outbox: int
    running: dict[str, dict[str, str]]
    wanted: dict[str, dict[str, str]]
    relays_up: int = 0
    hub_queue: int = 0


_STABLE_SAMPLES = 3
"""Settling ends after this many samples in a row with the whole fleet converged."""


class _Sampler:
    def __init__(
        self, stack: FleetStack, workers: _Workers, devices: Sequence[tuple[int, str, str, str]]
    ) -> None:
        self.stack = stack
        self.workers = workers
        self.devices = devices
        self.t0 = time.monotonic()
        self.known = {did for _, did, _, _ in devices}
        self.samples: list[StateSample] = []
        self.last: _Sample | None = None
        self._ingested: tuple[float, int] | None = None
        self._desired_cache: dict[str, tuple[bytes | None, str, dict[str, str]]] = {}
        self._device_cache: dict[str, tuple[bytes | None, str]] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    # A sample reads every scope the hub stored; most are the same bytes as at
    # the sample before, so their decoded digest (and wanted versions) are kept
    # by scope and reused while the stored bytes stay equal. The sampler runs on
    # the hub's event loop: at 2,000 devices decoding all 4,000 scopes each time
    # took about a tenth of that process right after a heal.

    def _hub_desired(self, scope: str, blob: bytes | None) -> tuple[str, dict[str, str]]:
        hit = self._desired_cache.get(scope)
        if hit is not None and hit[0] == blob:
            return hit[1], hit[2]
        state = _decode(blob)
        want = {
            k: str(spec.get("version", "1"))
            for k, v in state.to_dict().items()
            if isinstance(spec := unwrap(v), Mapping)
        }
        digest = scope_digest(state)
        self._desired_cache[scope] = (blob, digest, want)
        return digest, want

    def _hub_device(self, scope: str, blobs: Mapping[str, bytes]) -> str:
        blob = blobs.get(scope)
        hit = self._device_cache.get(scope)
        if hit is not None and hit[0] == blob:
            return hit[1]
        digest = scope_digest(_decode(blob))
        self._device_cache[scope] = (blob, digest)
        return digest

    async def sample(self) -> _Sample:
        t = self.now()
        parts = await self.workers.each("sample")
        agents: dict[str, tuple[str | None, str | None, dict[str, str]]] = {}
        for part in parts:
            agents.update(part)
        hub = self.stack.hub
        blobs: dict[str, bytes] = {}
        online_ids: set[str] = set()
        if hub is not None and hub.store is not None:
            blobs = await hub.store.load_scopes()
            known = self.known
            online_ids = {
                h.device for h in hub.health.devices(hub.clock()) if h.online and h.device in known
            }
        digests: list[ReplicaDigest] = []
        converged = split = running_agents = outbox = 0
        running: dict[str, dict[str, str]] = {}
        wanted: dict[str, dict[str, str]] = {}
        for _, did, region, _profile in self.devices:
            dname, sname = f"desired/{did}", f"device/{did}"
            a_desired, a_device, run = agents.get(did, (None, None, {}))
            running[did] = run
            relay = self.stack.relays.get(region)
            per: list[tuple[str, str, str | None]] = [
                (did, dname, a_desired),
                (did, sname, a_device),
            ]
            if hub is not None:
                d_digest, want = self._hub_desired(dname, blobs.get(dname))
                wanted[did] = want
                per += [("hub", dname, d_digest), ("hub", sname, self._hub_device(sname, blobs))]
            if relay is not None:
                per.append((f"relay:{region}", dname, scope_digest(relay.replica.scope(dname))))
            seen: dict[str, set[str]] = {}
            running_agents += a_desired is not None
            for replica, scope, digest in per:
                if digest is None:
                    continue
                digests.append(ReplicaDigest(replica, scope, digest))
                seen.setdefault(scope, set()).add(digest)
            differing = sum(1 for d in seen.values() if len(d) > 1)
            split += differing
            ok = a_desired is not None and hub is not None and not differing
            if ok and run == wanted.get(did):
                converged += 1
        relays_up = 0
        for relay in self.stack.relays.values():
            stats = relay.stats()
            outbox += int(stats["outbox_depth"])
            relays_up += bool(stats["hub_connected"])
        hub_queue = 0
        if hub is not None and hub.reconciler is not None:
            hub_queue = int(hub.reconciler.stats().get("queue_depth", 0))
        sample = _Sample(
            t,
            digests,
            len(online_ids),
            converged,
            running_agents,
            split,
            outbox,
            running,
            wanted,
            relays_up,
            hub_queue,
        )
        self.samples.append(StateSample(t, tuple(digests)))
        self.last = sample
        return sample

    def ingest_rate(self) -> float:
        hub = self.stack.hub
        if hub is None or hub.reconciler is None:
            return 0.0
        stats = hub.reconciler.stats()
        total = int(stats.get("events", 0) or 0)  # restarts reset it: clamped below
        now = time.monotonic()
        rate = 0.0
        if self._ingested is not None and now > self._ingested[0]:
            rate = (total - self._ingested[1]) / (now - self._ingested[0])
        self._ingested = (now, total)
        return max(rate, 0.0)


# -- the run -------------------------------------------------------------------------


async def run_real(config: RealRunConfig, *, out: TextIO | None = None) -> RealResult:
    """Run one real-process simulation (see the module docstring).

    Returns:
        The invariant report and the run report.
    """
    started = time.monotonic()
    stream = out or sys.stdout
    root = Path(tempfile.mkdtemp(prefix="novacron-sim-"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            result = await _run(config, root, stream, started, stack)
            # Graceful shutdown, bounded: a hub still ingesting a backlog must not
            # keep the verdict from the caller.
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    await stack.aclose()
            except TimeoutError:
                log.warning("shutdown took over %s s; leaving the rest", SHUTDOWN_TIMEOUT_S)
            return result
    finally:
        await asyncio.to_thread(shutil.rmtree, root, True)


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


async def _run(
    config: RealRunConfig,
    root: Path,
    out: TextIO,
    started: float,
    stack_: contextlib.AsyncExitStack,
) -> RealResult:
    spec = config.fleet or default_fleet_spec()
    fleet = assign_fleet(spec, config.devices, regions=config.regions, seed=config.seed)
    plan = [(d.region, d.profile) for d in fleet.devices]
    broker: EmbeddedBroker | None = None
    if config.broker_url is None:
        broker = await stack_.enter_async_context(EmbeddedBroker())
        broker_url = broker.url
    else:
        broker_url = config.broker_url
    stack = await stack_.enter_async_context(
        FleetStack(root, broker_url, fleet.regions, tuning=config.tuning)
    )
    async with stack.client() as api:
        tokens = await create_tokens(api, plan, labels={"app": "sim"})
    workers = _Workers()
    stack_.push_async_callback(workers.close)
    from simulator._worker import WorkerInit  # noqa: PLC0415

    n_workers = max(1, min(config.workers, config.devices))
    numbered = [(i, r, p) for i, (r, p) in enumerate(plan)]
    inits = [
        WorkerInit(
            w,
            str(root),
            stack.hub_url,
            tuple(numbered[w::n_workers]),
            tokens,
            config.tuning,
            logging.getLogger().getEffectiveLevel(),
        )
        for w in range(n_workers)
    ]
    _say(
        out,
        f"sim run: {config.devices} devices, {len(fleet.regions)} regions, "
        f"{n_workers} workers, broker {broker_url}; enrolling ...",
    )
    workers.spawn(inits)
    devices = await workers.ready(wait_s=max(120.0, config.devices * 0.5))
    enroll_s = time.monotonic() - started
    _say(out, f"enrolled and started {len(devices)} agents in {enroll_s:.1f} s")
    return await _live(
        config, stack, broker, workers, devices, fleet.regions, out, enroll_s, broker_url
    )


async def _live(  # noqa: PLR0917 - private, called once
    config: RealRunConfig,
    stack: FleetStack,
    broker: EmbeddedBroker | None,
    workers: _Workers,
    devices: list[tuple[int, str, str, str]],
    regions: Sequence[str],
    out: TextIO,
    enroll_s: float,
    broker_url: str,
) -> RealResult:
    refs = [DeviceRef(did, region, profile) for _, did, region, profile in devices]
    schedule = config.schedule or FaultSchedule.model_validate({"name": "none", "faults": []})
    timeline = FaultTimeline(
        schedule,
        refs,
        config.seed,
        outage_means=outage_means({r.profile for r in refs}),
        horizon_s=config.duration_s,
        source=config.schedule_source,
    )
    target = _Target(stack, broker, workers)
    sampler = _Sampler(stack, workers, devices)
    injector = FaultInjector(timeline, target)
    replicas = min(3, len(devices))
    builder = ReportBuilder(
        "NovaCron Edge simulation (real processes)",
        {
            "mode": "real",
            "devices": len(devices),
            "regions": len(regions),
            "workers": len(workers.conns),
            "broker": "embedded" if broker is not None else "external",
            "seed": config.seed,
            "duration_s": config.duration_s,
            "faults": config.schedule_source,
        },
        SERIES,
    )
    sample_s = config.sample_s or max(1.0, min(10.0, len(devices) / 400))
    display = ProgressDisplay(out, every_s=config.progress_s)
    async with stack.client() as api:
        await api.apply(_manifest(EACH, mode="each", release=1))
        await api.apply(_manifest(REPLICAS, mode="replicas", release=1, replicas=replicas))
    display.say(
        f"t=    0s  applied {EACH} (mode each) and {REPLICAS} (mode replicas, {replicas}); "
        f"{len(timeline)} fault actions scheduled",
    )
    sampler.t0 = time.monotonic()

    async def changes() -> None:
        from cloud_hub.client import HubClientError  # noqa: PLC0415

        for k, frac in enumerate((0.25, 0.6), start=2):
            await asyncio.sleep(max(0.0, config.duration_s * frac - sampler.now()))
            for _ in range(60):  # the hub may be down (kill_hub): an operator retries
                try:
                    async with stack.client() as api:
                        await api.apply(_manifest(EACH, mode="each", release=k))
                    break
                except HubClientError as exc:
                    log.info("apply of release %s failed (%s); retrying", k, exc)
                    await asyncio.sleep(1.0)
            display.say(f"t={sampler.now():5.0f}s  applied {EACH} release {k}")

    async def sampling(until: float | None, stop_when_converged: bool) -> None:
        streak = 0  # samples in a row with every device converged
        while True:
            s = await sampler.sample()
            rate = sampler.ingest_rate()  # once: a second call measures ~0 s
            builder.record(
                s.t,
                devices_online=s.online,
                devices_converged=s.converged,
                agents_running=s.running_agents,
                split_scopes=s.split,
                outbox_depth=s.outbox,
                events_ingested_per_s=rate,
            )
            display.update(
                Progress(
                    s.t,
                    config.duration_s,
                    len(devices),
                    s.online,
                    s.converged,
                    rate,
                    "event",
                    f"agents {s.running_agents}  relays up {s.relays_up}/{len(regions)}  "
                    f"outbox {s.outbox}  hub queue {s.hub_queue}  "
                    f"faults {len(injector.applied)}/{len(timeline)}",
                )
            )
            streak = streak + 1 if s.converged == len(devices) else 0
            # Three in a row, so the checker sees it hold: a late reconnect
            # (a relay's hub link timing out after a broker restart) can split
            # a scope again for a sample or two before it converges for good.
            if stop_when_converged and streak >= _STABLE_SAMPLES:
                return
            if until is not None and sampler.now() >= until:
                return
            await asyncio.sleep(sample_s)

    async with asyncio.TaskGroup() as tg:
        inj = tg.create_task(injector.run(start=sampler.t0), name="injector")
        chg = tg.create_task(changes(), name="changes")
        await sampling(config.duration_s, stop_when_converged=False)
        inj.cancel()
        chg.cancel()
    await target.heal_everything()
    heal_all_t = sampler.now()
    display.say(
        f"t={heal_all_t:5.0f}s  run over: every fault healed; "
        f"settling (up to {config.settle_s:g} s)",
    )
    await sampling(heal_all_t + config.settle_s, stop_when_converged=True)
    display.close()
    return await _finish(
        config, stack, workers, sampler, injector, builder, replicas, enroll_s, heal_all_t, out
    )


async def _hub_cursors(stack: FleetStack) -> dict[tuple[str, str], int]:
    hub = stack.hub
    assert hub is not None and hub.store is not None
    return await hub.store.load_cursors()


async def _finish(  # noqa: PLR0917 - private, called once
    config: RealRunConfig,
    stack: FleetStack,
    workers: _Workers,
    sampler: _Sampler,
    injector: FaultInjector,
    builder: ReportBuilder,
    replicas: int,
    enroll_s: float,
    heal_all_t: float,
    out: TextIO,
) -> RealResult:
    finals: dict[str, dict[str, Any]] = {}
    # Generous: losing the answer loses the whole run.
    for part in await workers.each("final", wait_s=FINAL_WAIT_S):
        finals.update(part)
    acked = [
        EventKey(did, stream, seq)
        for did, f in finals.items()
        for stream, upto in f["acked"].items()
        for seq in range(1, int(upto) + 1)
    ]
    # What the relays acknowledged may still be on its way to the hub: wait for it.
    deadline = time.monotonic() + 30.0
    while True:
        cursors = await _hub_cursors(stack)
        missing = sum(
            1
            for did, f in finals.items()
            for stream, upto in f["acked"].items()
            if cursors.get((did, stream), 1) <= int(upto)
        )
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    hub_events = [
        EventKey(did, stream, seq)
        for (did, stream), nxt in cursors.items()
        if did in finals
        for seq in range(1, nxt)
    ]
    hub = stack.hub
    assert hub is not None and hub.signer is not None and hub.store is not None
    keys = KeyRing()
    keys.add(hub.signer.public_key_bytes)
    applied = [
        AppliedEntry(did, f"desired/{did}", tuple(e))
        for did, f in finals.items()
        for e in f["desired"]
    ]
    assigned = sorted(a.device_id for a in await hub.store.list_assignments(deployment=REPLICAS))
    last = sampler.last
    running_on = sorted(
        did for did, run in (last.running if last else {}).items() if REPLICAS in run
    )
    slots = {did: i for i, did in enumerate(assigned)}
    extra = iter(range(replicas, replicas + len(running_on)))
    running = [
        RunningCopy(REPLICAS, slots[did] if did in slots else next(extra), did)
        for did in running_on
    ]
    obs = Observations(
        samples=sampler.samples,
        heals=injector.heal_marks(),
        acked_events=acked,
        hub_events=hub_events,
        running=running,
        replicas={REPLICAS: replicas},
        applied_desired=applied,
        hub_keys=keys,
        converge_deadline_s=config.converge_deadline_s,
    )
    report = await asyncio.to_thread(check_invariants, obs)
    final: dict[str, Any] = {
        "devices": len(sampler.devices),
        "regions": len(stack.regions),
        "wall_seconds": round(sampler.now(), 1),
        "enroll_and_start_s": round(enroll_s, 1),
        "converged_at_end": last.converged if last else 0,
        "settle_s": round(sampler.now() - heal_all_t, 1),
        "events_acked": len(acked),
        "events_stored": len(hub_events),
        "fault_actions": len(injector.applied),
        "fault_actions_failed": injector.failed,
        "invariants_ok": report.ok,
    }
    final["diagnostics"] = _diagnostics(stack)
    # Messages the relays refused from devices, by reason, over every relay
    # (``garbage``: not an envelope; ``incoming_queue_full``: overload).
    rejected: Counter[str] = Counter()
    for r in final["diagnostics"]["relays"].values():
        rejected.update(r["rejected"] or {})
    final["relay_rejected"] = dict(sorted(rejected.items()))
    _say(out, report.summary())
    if report.lags:
        shown = "; ".join(
            f"#{x.fault} {x.kind}: {'never' if x.lag_s is None else f'{x.lag_s:.1f} s'}"
            for x in report.lags
        )
        _say(out, f"convergence after heal: {shown}")
    for v in report.violations[:20]:
        _say(out, f"  {v}")
    for a in injector.applied:
        if a.error:
            _say(out, f"  fault action {a.action.kind} at {a.at_s:.1f} s not applied: {a.error}")
    _say(out, final_table(final.items()))
    if final["relay_rejected"]:
        shown = " ".join(f"{k}={v:,}" for k, v in final["relay_rejected"].items())
        _say(out, f"relays refused from devices: {shown}")
    if not report.ok:
        _say(out, f"diagnostics: {final['diagnostics']}")
    run_report = builder.build(lags=report.lags, final=final, invariants=report)
    return RealResult(report, run_report, sampler.now())


def _diagnostics(stack: FleetStack) -> dict[str, Any]:
    """Hub and relay counters that explain a failed run (rejections, drops)."""
    out: dict[str, Any] = {}
    hub = stack.hub
    if hub is not None and hub.reconciler is not None:
        s = hub.reconciler.stats()
        keys = (
            "batches",
            "events",
            "duplicates",
            "held",
            "rejected",
            "refused",
            "uplink_rejected",
            "queue_overflow",
            "ingest_errors",
            "commit_failures",
        )
        out["hub"] = {k: s.get(k) for k in keys}
    relays: dict[str, Any] = {}
    for region, relay in sorted(stack.relays.items()):
        s = relay.stats()
        relays[region] = {
            k: s.get(k)
            for k in (
                "received",
                "rejected",
                "batches_sent",
                "batches_resent",
                "batches_acked",
                "hub_rejected",
                "downlink_failed",
                "outbox_depth",
            )
        }
    out["relays"] = relays
    return out
