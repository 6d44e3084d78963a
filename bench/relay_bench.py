"""Regional-relay benchmark: device deltas per second through the relay to the hub.

Usage::

    python bench/relay_bench.py --json            # full run (1,000 devices, 500,000 deltas)
    python bench/relay_bench.py --json --quick    # short run (200 devices, 20,000 deltas)
    python bench/relay_bench.py --profile relay.prof   # the relay under cProfile

Figures (one function each; both need ``mosquitto`` and report ``*_skipped``
without it):

* ``forwarded_deltas_per_s`` — ``--devices`` simulated device streams (no
  agents: one real :class:`~sync.protocol.SyncSession` and key per device, which
  first completes a HELLO with the relay) publish ``--envelopes-per-device``
  signed ``DELTAS`` envelopes of ``--deltas-per-envelope`` deltas each, QoS 1,
  to a private region Mosquitto. A real relay (``python -m novacron relay run``,
  a separate process: "one core"; its defaults for batching, in-flight window
  and outbox, ``synchronous=FULL``) verifies, stores and acknowledges them and
  forwards signed batches to a private hub Mosquitto, where a hub-side sink in
  this process verifies the relay's signature on every batch and each device's
  signature on every envelope inside, counts distinct dots and answers
  ``BATCH_ACK``. The rate is distinct dots over the time from the first publish
  to the last dot counted at the hub. The same process answers the relay's
  downlinks for every device session (ACKs, and whatever else the relay sends:
  ``down_*`` counters).
* ``baseline_passthrough_msgs_per_s`` — the same envelope bytes, published the
  same way to the same region broker, republished to the hub broker by a bare
  aiomqtt loop (subscribe, ``await publish`` QoS 1; its own process) and counted
  by a subscriber here; ``baseline_passthrough_deltas_per_s`` is that times
  ``deltas_per_envelope``.
* ``ratio`` — ``forwarded_deltas_per_s`` over ``baseline_passthrough_deltas_per_s``.

``relay_cpu_s`` / ``relay_cpu_util`` tell how much of one core the relay used
during the window (1.0 = a full core: CPU-bound).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _relay_support as rs  # bench/_relay_support.py, next to this script
import _support
import aiomqtt

from sync.keys import Signer

Figures = dict[str, float | int | str]


@dataclass
class BenchConfig:
    """Parameters shared by every figure, and what one figure hands the next.

    Attributes:
        workdir: scratch directory (brokers, the relay's data dir).
        devices: simulated device streams.
        envelopes_per_device: DELTAS envelopes each device publishes.
        deltas_per_envelope: deltas per envelope.
        timeout_s: longest wait for the hub to count every dot.
        profile: write the relay's cProfile stats here.
        envelopes: the measured envelopes (topic, bytes), filled by the relay
            figure so the baseline forwards the very same bytes.
    """

    workdir: Path
    devices: int
    envelopes_per_device: int
    deltas_per_envelope: int
    timeout_s: float
    profile: Path | None = None
    envelopes: list[tuple[str, bytes]] = field(default_factory=list)


def forwarded_deltas_per_s(cfg: BenchConfig) -> Figures:
    """Deltas per second, end to end through a relay process (see the module doc)."""
    if not _support.mosquitto_available():
        return {"forwarded_skipped": "mosquitto is not installed"}
    workdir = cfg.workdir / "relay"
    with rs.broker(workdir / "region-broker") as region, rs.broker(workdir / "hub-broker") as hub:
        return asyncio.run(_relay_run(cfg, workdir, region, hub))


async def _relay_run(cfg: BenchConfig, workdir: Path, region_port: int, hub_port: int) -> Figures:
    setup = rs.prepare_region(workdir, region_port, hub_port)
    devices = rs.make_fleet(cfg.devices, setup.relay_public_key, cfg.deltas_per_envelope)
    rs.write_device_registry(setup, devices)
    total = cfg.devices * cfg.envelopes_per_device * cfg.deltas_per_envelope
    sink = rs.HubSink(
        setup.hub,
        setup.relay_public_key,
        {d.id: d.signer.public_key_bytes for d in devices},
        expected=total,
    )
    fleet = rs.Fleet(devices)
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(sink.run(hub_port), name="bench-hub-sink"),
            tg.create_task(fleet.run(region_port), name="bench-fleet"),
        ]
        try:
            with rs.RelayProcess(setup.config_path, workdir / "relay.log", cfg.profile) as relay:
                out = await _relay_window(cfg, relay, fleet, sink, devices)
        finally:
            for task in tasks:
                task.cancel()
    out["relay_mode"] = "subprocess" + ("+cProfile" if cfg.profile else "")
    return out


async def _relay_window(
    cfg: BenchConfig,
    relay: rs.RelayProcess,
    fleet: rs.Fleet,
    sink: rs.HubSink,
    devices: list[rs.SimDevice],
) -> Figures:
    try:
        async with asyncio.timeout(60):
            await fleet.connected.wait()
            await sink.relay_online.wait()
    except TimeoutError as exc:
        relay.check_alive()
        raise rs.BenchError("the relay did not come online within 60 s") from exc
    await fleet.handshake(timeout_s=60)
    envelopes = rs.make_envelopes(devices, cfg.envelopes_per_device, cfg.deltas_per_envelope)
    cfg.envelopes = envelopes
    down_before = fleet.down_types.copy()
    relay_cpu0, own_cpu0 = rs.cpu_seconds(relay.pid), time.process_time()
    start = time.perf_counter()
    await fleet.publish(envelopes)
    published = time.perf_counter() - start
    try:
        async with asyncio.timeout(cfg.timeout_s):
            await sink.done.wait()
    except TimeoutError as exc:
        relay.check_alive()
        tail = relay.log_path.read_text(errors="replace")[-3000:]
        raise rs.BenchError(
            f"the hub counted {len(sink.dots)} of {sink.expected} dots in {cfg.timeout_s} s; "
            f"relay counters {sink.relay_counters}; relay log tail:\n{tail}"
        ) from exc
    elapsed = sink.done_at - start
    relay_cpu = rs.cpu_seconds(relay.pid) - relay_cpu0
    own_cpu = time.process_time() - own_cpu0
    down = fleet.down_types - down_before
    return {
        "forwarded_deltas_per_s": round(len(sink.dots) / elapsed),
        "forwarded_envelopes_per_s": round(len(envelopes) / elapsed),
        "forwarded_elapsed_s": round(elapsed, 3),
        "forwarded_publish_s": round(published, 3),
        "relay_cpu_s": round(relay_cpu, 2),
        "relay_cpu_util": round(relay_cpu / elapsed, 2),
        "bench_process_cpu_s": round(own_cpu, 2),
        "hub_batches": sink.batches,
        "hub_items": sink.items,
        "hub_items_per_batch": round(sink.items / max(sink.batches, 1), 1),
        "hub_other_messages": sink.other_messages,
        "down_acks": down["ACK"],
        "down_deltas": down["DELTAS"],
        "down_hellos": down["HELLO"],
        "down_rejected": fleet.rejected,
        "envelope_bytes_mean": round(statistics.fmean(len(d) for _, d in envelopes)),
    }


def baseline_passthrough_msgs_per_s(cfg: BenchConfig) -> Figures:
    """Baseline: a bare aiomqtt republisher of the same envelope bytes."""
    if not _support.mosquitto_available():
        return {"baseline_skipped": "mosquitto is not installed"}
    if not cfg.envelopes:  # run alone: same shape, fresh sessions, no relay
        devices = rs.make_fleet(cfg.devices, Signer.generate().public_key_bytes, 1)
        cfg.envelopes = rs.make_envelopes(
            devices, cfg.envelopes_per_device, cfg.deltas_per_envelope
        )
    workdir = cfg.workdir / "baseline"
    with rs.broker(workdir / "region-broker") as region, rs.broker(workdir / "hub-broker") as hub:
        return asyncio.run(_baseline_run(cfg, region, hub))


async def _baseline_run(cfg: BenchConfig, region_port: int, hub_port: int) -> Figures:
    envelopes = cfg.envelopes
    counted = 0
    done = asyncio.Event()
    done_at = 0.0
    ready = asyncio.Event()

    async def count() -> None:
        nonlocal counted, done_at
        async with aiomqtt.Client(
            "127.0.0.1", hub_port, identifier="bench-count", logger=rs.MQTT_LOG
        ) as client:
            await client.subscribe(rs.PASSTHROUGH_TOPIC, qos=1)
            ready.set()
            async for _ in client.messages:
                counted += 1
                if counted == len(envelopes):
                    done_at = time.perf_counter()
                    done.set()

    fleet = rs.Fleet([])
    with rs.Passthrough(region_port, hub_port) as forwarder:
        await asyncio.to_thread(forwarder.wait_ready)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(count(), name="bench-count"),
                tg.create_task(fleet.run(region_port), name="bench-fleet"),
            ]
            try:
                async with asyncio.timeout(30):
                    await ready.wait()
                    await fleet.connected.wait()
                cpu0 = rs.cpu_seconds(forwarder.pid)
                start = time.perf_counter()
                await fleet.publish(envelopes)
                async with asyncio.timeout(cfg.timeout_s):
                    await done.wait()
                cpu = rs.cpu_seconds(forwarder.pid) - cpu0
            except TimeoutError as exc:
                raise rs.BenchError(
                    f"the baseline counted {counted} of {len(envelopes)} messages"
                ) from exc
            finally:
                for task in tasks:
                    task.cancel()
    elapsed = done_at - start
    msgs = len(envelopes) / elapsed
    return {
        "baseline_passthrough_msgs_per_s": round(msgs),
        "baseline_passthrough_deltas_per_s": round(msgs * cfg.deltas_per_envelope),
        "baseline_elapsed_s": round(elapsed, 3),
        "baseline_cpu_s": round(cpu, 2),
        "baseline_cpu_util": round(cpu / elapsed, 2),
    }


FIGURES: list[Callable[[BenchConfig], Figures]] = [
    forwarded_deltas_per_s,
    baseline_passthrough_msgs_per_s,
]


def run_all(cfg: BenchConfig) -> Figures:
    """Run every figure, then add the ratio and the context."""
    out: Figures = {}
    for figure in FIGURES:
        out.update(figure(cfg))
    forwarded = out.get("forwarded_deltas_per_s")
    baseline = out.get("baseline_passthrough_deltas_per_s")
    if isinstance(forwarded, int) and isinstance(baseline, int) and baseline:
        out["ratio"] = round(forwarded / baseline, 3)
    envelopes = cfg.devices * cfg.envelopes_per_device
    out.update(
        {
            "devices": cfg.devices,
            "deltas_per_envelope": cfg.deltas_per_envelope,
            "envelopes_per_device": cfg.envelopes_per_device,
            "envelopes": envelopes,
            "deltas": envelopes * cfg.deltas_per_envelope,
            "batches": out.get("hub_batches", 0),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count() or 1,
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="short run (200 devices)")
    parser.add_argument("--devices", type=int, help="simulated devices (1,000; 200 quick)")
    parser.add_argument(
        "--envelopes-per-device", type=int, help="DELTAS envelopes per device (5; 2 quick)"
    )
    parser.add_argument(
        "--deltas-per-envelope", type=int, help="deltas per envelope (100; 50 quick)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for the hub")
    parser.add_argument("--profile", type=Path, help="run the relay under cProfile, stats here")
    parser.add_argument("--dir", type=Path, help="scratch directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relay-bench-", dir=args.dir) as tmp:
        cfg = BenchConfig(
            workdir=Path(tmp),
            devices=args.devices or (200 if args.quick else 1_000),
            envelopes_per_device=args.envelopes_per_device or (2 if args.quick else 5),
            deltas_per_envelope=args.deltas_per_envelope or (50 if args.quick else 100),
            timeout_s=args.timeout,
            profile=args.profile.resolve() if args.profile else None,
        )
        out = run_all(cfg)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for key, value in sorted(out.items()):
            print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
