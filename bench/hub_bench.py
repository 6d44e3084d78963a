"""Cloud hub benchmarks: one function per figure, one JSON object out.

Usage::

    python bench/hub_bench.py --json            # full run
    python bench/hub_bench.py --json --quick    # short run (smoke test, CI)

Figures (add new ones to :data:`FIGURES`; each takes a :class:`BenchConfig` and
returns a dict merged into the output object):

* ``placement_10k_ms`` — :func:`cloud_hub.placement.place` of one deployment over
  ``--devices`` (10,000) synthetic devices spread over ``--regions`` (10) regions
  and every built-in firmware profile, with labels, partial allocations, varied
  reliability and 2 % of the devices offline. Two deployments are timed: a
  ``replicas: --replicas`` (1,000) one (``placement_10k_replicas_ms``) and an
  ``each`` one (``placement_10k_each_ms``); each figure is the median of
  ``--repeats`` runs (``time.perf_counter``, garbage collector paused while
  timing), and ``placement_10k_ms`` is the slower of the two medians, the figure
  the README target (<= 200 ms) applies to.

* ``ingest_deltas_per_s`` — the reconciler's ingest of relay batches into the
  SQLite store, minus MQTT (:mod:`bench._hub_ingest`): every relay and device
  signature verified, deltas merged, one store transaction per group of
  batches, acks built; against raw ``sqlite3`` ``executemany`` of one row per
  delta in the same run (``ingest_ratio_vs_raw``). Devices send 50 deltas per
  signed envelope, the smallest ``sync_batch_size`` of the built-in profiles
  (what an agent sends when it catches up after a partition, the moment ingest
  speed matters). ``ingest_deltas_per_s_10_per_envelope`` repeats it with 10:
  the hub verifies one Ed25519 signature per envelope, so small envelopes cost
  more per delta.
* ``api_p99_ms`` — p99 latency of device list and device detail calls with
  ``--devices`` devices stored, at ``--rate`` (200) requests/s from this process
  against ``novacron hub serve`` in its own process; baseline a bare aiohttp
  server answering the same bytes under the same load (:mod:`bench._hub_api`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud_hub.manifests import Deployment, parse_manifest
from cloud_hub.placement import DeviceView, Placement, place
from firmware_profiles import list_profiles
from sync.models import Resources

Figures = dict[str, float | int | str]

_SEED = 20_240_601


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Parameters shared by every figure.

    Attributes:
        devices: devices in the synthetic fleet.
        regions: regions the fleet is spread over.
        replicas: replica count of the ``replicas`` deployment.
        repeats: timed runs per figure; the median counts.
    """

    devices: int
    regions: int
    replicas: int
    repeats: int
    rate: float = 200.0
    quick: bool = False


def synthetic_fleet(n: int, regions: int, *, seed: int = _SEED) -> list[DeviceView]:
    """``n`` devices over ``regions`` regions and every built-in profile, reproducibly.

    Args:
        n: number of devices.
        regions: number of regions.
        seed: seed of the generator (the same seed gives the same fleet).
    """
    rng = random.Random(seed)
    profiles = list_profiles()
    fleet: list[DeviceView] = []
    for i in range(n):
        profile = profiles[i % len(profiles)]
        cpu_cap, mem_cap = profile.cpu_cores * 1000, profile.memory_mb
        allocated = Resources(
            cpu_millis=max(1, int(cpu_cap * rng.uniform(0.0, 0.7))),
            memory_mb=max(1, int(mem_cap * rng.uniform(0.0, 0.7))),
        )
        fleet.append(
            DeviceView.from_profile(
                f"gw-{i:06d}",
                f"region-{rng.randrange(regions):02d}",
                profile,
                labels={
                    "site": f"site-{rng.randrange(50):02d}",
                    "tier": "prod" if rng.random() < 0.8 else "staging",
                },
                allocated=allocated,
                online=rng.random() >= 0.02,
                reliability=round(rng.uniform(0.8, 1.0), 3),
            )
        )
    return fleet


def _deployment(name: str, placement: str) -> Deployment:
    return parse_manifest(
        f"""
kind: Deployment
apiVersion: novacron.io/v1
metadata: {{name: {name}}}
spec:
  workload:
    name: {name}
    driver: podman
    image: registry.local/{name}:1
    resources: {{cpu_millis: 250, memory_mb: 128}}
  selector:
    labels: {{tier: prod}}
    drivers: [podman]
{placement}
""",
        source="<bench>",
    )


def _median_ms(cfg: BenchConfig, run: Callable[[], Placement]) -> tuple[float, Placement]:
    """Median wall time of ``run`` over ``cfg.repeats`` runs, in ms, and its result."""
    times: list[float] = []
    result: Placement | None = None
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(cfg.repeats):
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            result = run()
            times.append((time.perf_counter() - start) * 1000)
            gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    assert result is not None
    return statistics.median(times), result


def placement_10k_ms(cfg: BenchConfig) -> Figures:
    """Median time to place a ``replicas`` and an ``each`` deployment over the fleet."""
    fleet = synthetic_fleet(cfg.devices, cfg.regions)
    replicas = _deployment("bench-replicas", f"  replicas: {cfg.replicas}")
    each = _deployment("bench-each", "  mode: each")
    replicas_ms, placed_r = _median_ms(cfg, lambda: place(replicas, fleet))
    each_ms, placed_e = _median_ms(cfg, lambda: place(each, fleet))
    regions_used = len({d.region for d in fleet if d.id in set(placed_r.devices)})
    return {
        "placement_10k_ms": round(max(replicas_ms, each_ms), 2),
        "placement_10k_replicas_ms": round(replicas_ms, 2),
        "placement_10k_each_ms": round(each_ms, 2),
        "placement_devices": cfg.devices,
        "placement_regions": cfg.regions,
        "placement_replicas_placed": len(placed_r.devices),
        "placement_replicas_regions_used": regions_used,
        "placement_each_placed": len(placed_e.devices),
        "placement_each_rejected": sum(placed_e.rejections.values()),
    }


def ingest_deltas_per_s(cfg: BenchConfig) -> Figures:
    """Hub ingest of relay batches (see the module docstring)."""
    from _hub_ingest import measure_ingest

    devices, per_device = (200, 50) if cfg.quick else (1_000, 100)
    main = measure_ingest(devices, per_device, entries_per_envelope=50)
    small = measure_ingest(devices, per_device, entries_per_envelope=10)
    out: Figures = {k: v for k, v in main.items() if isinstance(v, int | float | str)}
    out["ingest_deltas_per_s_10_per_envelope"] = small["ingest_deltas_per_s"]
    out["ingest_ratio_vs_raw_10_per_envelope"] = small["ingest_ratio_vs_raw"]
    return out


def api_p99_ms(cfg: BenchConfig) -> Figures:
    """Hub API latency under load (see the module docstring)."""
    from _hub_api import measure_api

    devices = min(cfg.devices, 1_000) if cfg.quick else cfg.devices
    out = measure_api(
        devices=devices, regions=cfg.regions, rate=cfg.rate, duration_s=3.0 if cfg.quick else 15.0
    )
    return {k: v for k, v in out.items() if isinstance(v, int | float | str)}


FIGURES: list[Callable[[BenchConfig], Figures]] = [
    placement_10k_ms,
    ingest_deltas_per_s,
    api_p99_ms,
]


def run_all(cfg: BenchConfig) -> Figures:
    """Run every figure, then add the machine metadata."""
    out: Figures = {}
    for figure in FIGURES:
        out.update(figure(cfg))
    out.update(
        {
            "repeats": cfg.repeats,
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "cpu_count": os.cpu_count() or 0,
            "machine": platform.machine(),
            "platform": platform.platform(terse=True),
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the fleet")
    parser.add_argument("--regions", type=int, default=10, help="regions of the fleet")
    parser.add_argument("--replicas", type=int, default=1_000, help="replicas to place")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (median counts)")
    parser.add_argument("--rate", type=float, default=200.0, help="API requests per second")
    args = parser.parse_args(argv)
    cfg = BenchConfig(
        devices=args.devices,
        regions=args.regions,
        replicas=args.replicas,
        repeats=args.repeats or (3 if args.quick else 11),
        rate=args.rate,
        quick=args.quick,
    )
    out = run_all(cfg)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for key, value in sorted(out.items()):
            print(f"{key:36} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
