"""``novacron demo``: the whole product on one machine, in one command.

What it runs (all on loopback, in one process, with nothing but the package
installed):

* an embedded MQTT broker (amqtt, anonymous: demo only; production brokers
  are Mosquitto with the per-device accounts the hub provisions);
* the hub on ``127.0.0.1:8090`` (``--listen``), data in a temporary directory
  (``--data-dir`` to keep it);
* two regions, ``eu-west`` and ``us-east``, one relay each, the relay's link to
  the hub through a TCP proxy the demo can cut;
* ``--devices`` (24) simulated devices: real agents with a ``sim`` runtime,
  device classes from the firmware profiles, each enrolled through the hub's
  enrollment API with a token;
* a deployment (``examples/demo/deployment.yaml``, ``mode: each``) applied
  through the API and rolled out in waves; then, at about t=20 s, ``us-east``
  loses the hub; at t=25 s version 2 is applied (the rollout waits for the
  cut region); at t=40 s the link heals and the region catches up. With
  ``--duration`` the times scale to it (a third, a third and a twelfth, two
  thirds).

It prints where to look (API, token, metrics, event stream), a progress line
every few seconds and a final table, and exits 0 when every device converged
on the hub's desired state with no duplicate workload (1 otherwise). Ctrl-C
(SIGINT) or SIGTERM stops it cleanly at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import yaml

from simulator.broker import EmbeddedBroker
from simulator.composition import FleetStack, SimDevice, create_tokens, enroll_devices
from simulator.fleet import FleetSpec, assign_fleet
from simulator.invariants import (
    AppliedEntry,
    HealMark,
    Observations,
    ReplicaDigest,
    StateSample,
    check_invariants,
    scope_digest,
)
from sync._exceptions import ConfigError
from sync.crdt import LwwMap
from sync.keys import KeyRing
from sync.signed import unwrap

__all__ = [
    "DEMO_DEPLOYMENT",
    "DEMO_FLEET",
    "DemoOptions",
    "DemoSchedule",
    "demo_schedule",
    "run_demo",
]

log = logging.getLogger(__name__)

REGIONS: Final = ("eu-west", "us-east")
CUT_REGION: Final = "us-east"
PROGRESS_EVERY_S: Final = 3.0
SAMPLE_EVERY_S: Final = 1.0
SETTLE_S: Final = 15.0
"""After ``--duration``: how long to wait at most for the last reports to land."""

DEMO_FLEET: Final = FleetSpec.model_validate(
    {
        "name": "demo",
        "regions": [
            {
                "name": "eu-west",
                "profiles": {
                    "raspberry-pi-4": 4,
                    "raspberry-pi-5": 2,
                    "openwrt-router": 2,
                    "jetson-orin-nano": 1,
                    "generic-x86_64": 1,
                },
            },
            {
                "name": "us-east",
                "profiles": {
                    "x86-industrial-gateway": 4,
                    "simatic-iot2050": 3,
                    "x86-vsat-gateway": 1,
                    "generic-x86_64": 2,
                },
            },
        ],
    }
)
"""Two regions: retail sites on small ARM boards, plants on industrial gateways."""

DEMO_DEPLOYMENT: Final = """\
# The demo's sample deployment (novacron demo applies it through the API).
# Every device labelled app=demo runs one copy (mode: each), rolled out in
# three waves: a quarter of the devices, then half, then all.
kind: Deployment
apiVersion: novacron.io/v1
metadata:
  name: sensor-gateway
  labels: {team: demo}
spec:
  workload:
    name: sensor-gateway
    driver: process
    command: [/usr/local/bin/sensor-gateway, --listen, "0.0.0.0:8080"]
    env: {RELEASE: "1"}
    resources: {cpu_millis: 100, memory_mb: 32}
  selector:
    labels: {app: demo}
  mode: each
  rollout:
    waves: [{percent: 25}, {percent: 50}, {percent: 100}]
    success_threshold: 0.9
    wave_timeout_s: 300
    offline_deadline_s: 600
    failure_budget: 0.1
    on_failure: pause
"""
"""The text of ``examples/demo/deployment.yaml`` (a test keeps the two equal)."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``novacron demo`` was asked for."""

    duration_s: float | None = None
    devices: int = 24
    listen: str = "127.0.0.1:8090"
    data_dir: Path | None = None
    deployment: Path | None = None
    seed: int = 0


@dataclass(frozen=True, slots=True)
class DemoSchedule:
    """When the outage starts, when v2 is applied, when the outage heals (s)."""

    cut_at: float
    change_at: float
    heal_at: float


def demo_schedule(duration_s: float | None) -> DemoSchedule:
    """20/25/40 s without a duration; scaled to a third, +1/12, two thirds with one."""
    if duration_s is None:
        return DemoSchedule(20.0, 25.0, 40.0)
    return DemoSchedule(duration_s / 3, duration_s / 3 + duration_s / 12, duration_s * 2 / 3)


# -- observing the fleet ------------------------------------------------------------


@dataclass
class DeviceRow:
    """One device at one moment."""

    device_id: str
    region: str
    online: bool
    converged: bool
    running: dict[str, str]
    wanted: dict[str, str]


@dataclass
class FleetView:
    """The fleet at one moment, as the demo reports it."""

    t: float
    rows: list[DeviceRow]
    rollout: str
    digests: tuple[ReplicaDigest, ...]
    unreachable: Mapping[str, str] = field(default_factory=dict)
    """Regions the hub sees as unreachable -> why."""

    def per_region(self) -> dict[str, tuple[int, int, int]]:
        """region -> (devices, online, converged)."""
        out: dict[str, tuple[int, int, int]] = {}
        for r in self.rows:
            n, on, conv = out.get(r.region, (0, 0, 0))
            out[r.region] = (n + 1, on + int(r.online), conv + int(r.converged))
        return dict(sorted(out.items()))

    @property
    def converged(self) -> int:
        """Devices converged."""
        return sum(r.converged for r in self.rows)


def _decode(blob: bytes | None) -> LwwMap:
    from sync._msgpack_strict import unpackb_strict  # noqa: PLC0415

    return LwwMap() if blob is None else LwwMap.from_wire(unpackb_strict(blob))


class Observer:
    """Reads the hub, relays and agents in place (everything is in this process)."""

    def __init__(self, stack: FleetStack, devices: Sequence[SimDevice], deployment: str) -> None:
        self.stack = stack
        self.devices = list(devices)
        self.deployment = deployment
        self.t0 = time.monotonic()

    def now(self) -> float:
        """Seconds since the demo's t=0."""
        return time.monotonic() - self.t0

    async def rollout_line(self) -> str:
        """``sensor-gateway v2 progressing, wave 2/3`` (or what the store holds)."""
        hub = self.stack.hub
        assert hub is not None and hub.store is not None
        from cloud_hub.store import NotFoundError  # noqa: PLC0415

        try:
            record = await hub.store.get_rollout(self.deployment)
        except NotFoundError:
            return f"{self.deployment}: not applied yet"
        state = record.state
        waves = len(state.get("waves", ()))
        current = state.get("current")
        wave = "" if current is None else f", wave {min(int(current) + 1, waves)}/{waves}"
        return f"{self.deployment} v{record.version} {record.phase}{wave}"

    async def view(self) -> FleetView:
        """Every device's state now, and the digests of every replica of its scopes."""
        hub = self.stack.hub
        assert hub is not None and hub.store is not None
        t = self.now()
        health = {h.device: h for h in hub.health.devices(hub.clock())}
        blobs = await hub.store.load_scopes()
        rows: list[DeviceRow] = []
        digests: list[ReplicaDigest] = []
        for dev in self.devices:
            did = dev.device_id
            desired_name, device_name = f"desired/{did}", f"device/{did}"
            hub_desired = _decode(blobs.get(desired_name))
            hub_device = _decode(blobs.get(device_name))
            want = {
                k: str(spec.get("version", "1"))
                for k, v in hub_desired.to_dict().items()
                if isinstance(spec := unwrap(v), Mapping)
            }
            replicas: list[tuple[str, str, LwwMap | None]] = [
                ("hub", desired_name, hub_desired),
                ("hub", device_name, hub_device),
                (did, desired_name, dev.scope(desired_name)),
                (did, device_name, dev.scope(device_name)),
            ]
            relay = self.stack.relays.get(dev.setup.region)
            if relay is not None:
                replicas.append(
                    (f"relay:{dev.setup.region}", desired_name, relay.replica.scope(desired_name))
                )
            same = True
            per_scope: dict[str, str] = {}
            for replica, scope, state in replicas:
                if state is None:
                    same = False
                    continue
                digest = scope_digest(state)
                digests.append(ReplicaDigest(replica, scope, digest))
                if per_scope.setdefault(scope, digest) != digest:
                    same = False
            running = await dev.running_workloads()
            h = health.get(did)
            rows.append(
                DeviceRow(
                    did,
                    dev.setup.region,
                    online=bool(h and h.online),
                    converged=same and dev.running and running == want,
                    running=running,
                    wanted=want,
                )
            )
        unreachable = {
            r.region: r.reason or "unreachable"
            for r in hub.health.regions(hub.clock())
            if r.state != "reachable"
        }
        return FleetView(t, rows, await self.rollout_line(), tuple(digests), unreachable)

    def applied_desired(self) -> list[AppliedEntry]:
        """Every desired entry the agents hold (each must carry the hub's signature)."""
        out: list[AppliedEntry] = []
        for dev in self.devices:
            scope = f"desired/{dev.device_id}"
            state = dev.scope(scope)
            if state is not None:
                out += [AppliedEntry(dev.device_id, scope, tuple(e)) for e in state.entries_wire()]
        return out


# -- printing -----------------------------------------------------------------------


@dataclass
class Printer:
    """Progress lines and the final table on one stream."""

    out: TextIO

    def line(self, text: str = "") -> None:
        """Print one line at once."""
        print(text, file=self.out, flush=True)

    def progress(self, view: FleetView) -> None:
        """``t=  21s  eu-west 12/12 online  us-east 0/12 online (cut) | ... | converged 12/24``."""
        parts = []
        for region, (n, online, _) in view.per_region().items():
            why = view.unreachable.get(region)
            mark = f" (hub: {why})" if why else ""
            parts.append(f"{region} {online}/{n} online{mark}")
        total = len(view.rows)
        done = "CONVERGED" if view.converged == total else f"converged {view.converged}/{total}"
        self.line(f"t={view.t:5.0f}s  {'  '.join(parts)}  | {view.rollout} | {done}")

    def table(self, view: FleetView, deployment: str) -> None:
        """The final table, one row per region."""
        self.line()
        self.line(f"{'region':<10} {'devices':>7} {'online':>7} {'converged':>9}  {deployment}")
        for region, (n, online, conv) in view.per_region().items():
            versions: dict[str, int] = {}
            for r in view.rows:
                if r.region == region:
                    v = r.running.get(deployment)
                    key = "not running" if v is None else f"v{v}"
                    versions[key] = versions.get(key, 0) + 1
            shown = ", ".join(f"{k} x{c}" for k, c in sorted(versions.items()))
            self.line(f"{region:<10} {n:>7} {online:>7} {conv:>9}  {shown}")
        self.line(f"rollout: {view.rollout}")


# -- the story ----------------------------------------------------------------------


def _deployment_document(path: Path | None) -> dict[str, Any]:
    text = DEMO_DEPLOYMENT if path is None else path.read_text(encoding="utf-8")
    source = "<built-in>" if path is None else str(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not YAML: {exc}", source=source) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        raise ConfigError("must be one Deployment manifest (a YAML mapping)", source=source)
    return doc


def _version_2(doc: Mapping[str, Any]) -> dict[str, Any]:
    new = yaml.safe_load(yaml.safe_dump(dict(doc)))
    workload = new["spec"]["workload"]
    workload["env"] = {**workload.get("env", {}), "RELEASE": "2"}
    return dict(new)


async def _sleep_until(obs: Observer, t: float, stop: asyncio.Event) -> bool:
    """Sleep until t (demo time); False when stopped first."""
    delay = t - obs.now()
    if delay <= 0:
        return not stop.is_set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return not stop.is_set()


@dataclass
class _Run:
    obs: Observer
    printer: Printer
    samples: list[StateSample] = field(default_factory=list)
    heal_t: float | None = None
    cut_t: float | None = None


async def _story(
    run: _Run, stack: FleetStack, doc: dict[str, Any], plan: DemoSchedule, stop: asyncio.Event
) -> None:
    p = run.printer
    async with stack.client() as api:
        if not await _sleep_until(run.obs, plan.cut_at, stop):
            return
        stack.partition(CUT_REGION)
        run.cut_t = run.obs.now()
        p.line(
            f"t={run.cut_t:5.0f}s  OUTAGE: region {CUT_REGION} cut from the hub "
            f"(its relay's link goes through a TCP proxy; devices keep running)"
        )
        if not await _sleep_until(run.obs, plan.change_at, stop):
            return
        result = await api.apply(_version_2(doc))
        p.line(
            f"t={run.obs.now():5.0f}s  applied {result.name} v{result.version} (RELEASE=2) "
            f"during the outage: {CUT_REGION} gets it after the heal"
        )
        if not await _sleep_until(run.obs, plan.heal_at, stop):
            return
        stack.heal(CUT_REGION)
        run.heal_t = run.obs.now()
        p.line(f"t={run.heal_t:5.0f}s  HEAL: region {CUT_REGION} reconnected to the hub")


async def _watch(run: _Run, stop: asyncio.Event) -> None:
    next_print = 0.0
    while not stop.is_set():
        view = await run.obs.view()
        run.samples.append(StateSample(view.t, view.digests))
        if view.t >= next_print:
            run.printer.progress(view)
            next_print = view.t + PROGRESS_EVERY_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


def _banner(p: Printer, stack: FleetStack, broker: EmbeddedBroker, root: Path, n: int) -> None:
    url = stack.hub_url
    token = stack.admin_token
    p.line("NovaCron Edge demo")
    p.line(f"  hub API      {url}/api/v1/devices")
    p.line(f"  admin token  {token}")
    p.line(f"  try          curl -H 'Authorization: Bearer {token}' {url}/api/v1/devices")
    p.line(f"  metrics      {url}/metrics")
    p.line(f"  live events  curl -N -H 'Authorization: Bearer {token}' {url}/api/v1/events/stream")
    p.line(f"  CLI          export NOVACRON_HUB={url} NOVACRON_TOKEN={token}")
    p.line("               novacron get devices; novacron rollout status sensor-gateway")
    p.line(f"  MQTT broker  {broker.url} (embedded amqtt, anonymous access: demo only)")
    p.line(f"  data         {root}")
    p.line(
        f"  fleet        {n} simulated devices in {', '.join(REGIONS)} (real agents, sim runtime)"
    )
    p.line("Ctrl-C stops the demo.")


async def run_demo(
    options: DemoOptions, *, stop: asyncio.Event | None = None, out: TextIO | None = None
) -> int:
    """Run the demo until ``stop`` is set, SIGINT/SIGTERM or ``options.duration_s``.

    Returns:
        0 when every device converged on the hub's desired state and no
        workload runs twice, 1 otherwise.
    """
    import sys  # noqa: PLC0415

    stop = stop or asyncio.Event()
    printer = Printer(out or sys.stdout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    made_root = options.data_dir is None
    root = Path(tempfile.mkdtemp(prefix="novacron-demo-")) if made_root else options.data_dir
    assert root is not None
    try:
        return await _run(options, root, stop, printer)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if made_root:
            await asyncio.to_thread(shutil.rmtree, root, True)


async def _run(options: DemoOptions, root: Path, stop: asyncio.Event, p: Printer) -> int:
    doc = await asyncio.to_thread(_deployment_document, options.deployment)
    name = str(doc["metadata"]["name"])
    fleet = assign_fleet(DEMO_FLEET, options.devices, seed=options.seed)
    plan = [(d.region, d.profile) for d in fleet.devices]
    devices: list[SimDevice] = []
    async with (
        EmbeddedBroker() as broker,
        FleetStack(
            root, broker.url, REGIONS, listen=options.listen, hub_data_dir=root / "hub"
        ) as stack,
    ):
        _banner(p, stack, broker, root, options.devices)
        try:
            async with stack.client() as api:
                tokens = await create_tokens(api, plan, labels={"app": "demo"})
            numbered = [(i, region, profile) for i, (region, profile) in enumerate(plan)]
            setups = await enroll_devices(stack.hub_url, root, numbered, tokens)
            devices = [await SimDevice.load(s) for s in setups]
            await asyncio.gather(*(d.start() for d in devices))
            p.line(f"enrolled {len(devices)} devices with enrollment tokens; agents running")
            return await _live(options, stack, devices, doc, name, stop, p)
        finally:
            await asyncio.gather(*(d.stop() for d in devices), return_exceptions=True)


async def _live(  # noqa: PLR0917 - private, called once
    options: DemoOptions,
    stack: FleetStack,
    devices: list[SimDevice],
    doc: dict[str, Any],
    name: str,
    stop: asyncio.Event,
    p: Printer,
) -> int:
    plan = demo_schedule(options.duration_s)
    run = _Run(Observer(stack, devices, name), p)
    async with stack.client() as api:
        result = await api.apply(doc)
    p.line(
        f"t={run.obs.now():5.0f}s  applied deployment {result.name} v{result.version} through "
        f"the API (mode each, rolled out in waves); outage of {CUT_REGION} planned "
        f"t={plan.cut_at:.0f}s..{plan.heal_at:.0f}s"
    )
    watch_stop = asyncio.Event()
    ended_by = "Ctrl-C"
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_story(run, stack, doc, plan, stop), name="demo-story")
        watcher = tg.create_task(_watch(run, watch_stop), name="demo-watch")
        if options.duration_s is None:
            await stop.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), options.duration_s)
            if not stop.is_set():
                ended_by = f"--duration {options.duration_s:g}"
        stop.set()
        if ended_by != "Ctrl-C":
            await _settle(run)
        watch_stop.set()
        await watcher
    return await _finish(run, stack, name, ended_by)


async def _settle(run: _Run) -> None:
    """Give the last reports a few seconds to land (the fleet is live)."""
    deadline = run.obs.now() + SETTLE_S
    while run.obs.now() < deadline:
        view = await run.obs.view()
        if view.converged == len(view.rows):
            return
        await asyncio.sleep(0.5)


async def _finish(run: _Run, stack: FleetStack, name: str, ended_by: str) -> int:
    p = run.printer
    view = await run.obs.view()
    run.samples.append(StateSample(view.t, view.digests))
    p.line(f"t={view.t:5.0f}s  stopping ({ended_by})")
    p.progress(view)
    p.table(view, name)
    assert stack.hub is not None and stack.hub.signer is not None
    keys = KeyRing()
    keys.add(stack.hub.signer.public_key_bytes)
    heals = [] if run.heal_t is None else [HealMark(0, run.heal_t, "partition_region")]
    report = check_invariants(
        Observations(
            samples=run.samples,
            heals=heals,
            applied_desired=run.obs.applied_desired(),
            hub_keys=keys,
        )
    )
    if run.cut_t is not None:
        healed = "not healed" if run.heal_t is None else f"healed at {run.heal_t:.0f} s"
        lag = report.lags[0].lag_s if report.lags else None
        after = "" if lag is None else f", every replica converged {lag:.1f} s after the heal"
        p.line(f"outage of {CUT_REGION}: cut at {run.cut_t:.0f} s, {healed}{after}")
    duplicates = _strays(view)
    for line in report.summary().splitlines():
        p.line(f"  invariant {line}")
    shown = "ok" if not duplicates else f"FAILED ({duplicates})"
    p.line(f"  invariant no_duplicate_workloads: {shown}")
    ok = report.ok and view.converged == len(view.rows) and not duplicates
    if ok:
        p.line(
            "RESULT: OK - every device converged on the hub's desired state, no duplicate workloads"
        )
        return 0
    p.line(f"RESULT: NOT CONVERGED - {view.converged}/{len(view.rows)} devices converged")
    for v in report.violations[:10]:
        p.line(f"  {v}")
    return 1


def _strays(view: FleetView) -> int:
    """Workload copies running where the hub does not want them (a stale placement
    left running would be a duplicate; a runtime holds one copy per name)."""
    return sum(len(set(r.running) - set(r.wanted)) for r in view.rows)
