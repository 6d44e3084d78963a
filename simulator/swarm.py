"""Swarm testing: many short deterministic runs, each with faults drawn from its seed.

As in FoundationDB's and TigerBeetle's simulators (VOPR), every seed picks its
own fault mix and rates (how many faults, which kinds, when, how long, how
lossy the links are), so a swarm explores combinations no hand-written
schedule would. A failing seed is printed and replays exactly::

    novacron sim swarm --seeds 200
    novacron sim run --deterministic --swarm-seed 1234 --report out/

Every fault kind is drawn at its full range, device clocks jumping days ahead
of the HLC's ``max_skew`` (5 min) included.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from simulator.deterministic import SimConfig, run_deterministic
from simulator.faults import FaultSchedule

__all__ = ["SwarmOutcome", "run_swarm", "swarm_case"]

log = logging.getLogger(__name__)

_KINDS = (
    "partition_region",
    "flap_devices",
    "kill_relay",
    "kill_hub",
    "kill_broker",
    "clock_skew",
    "fill_disk",
    "garbage",
)


def _fault(
    rng: random.Random, kind: str, regions: Sequence[str], duration: float
) -> dict[str, Any]:
    at = round(rng.uniform(0, duration * 0.7), 1)
    length = round(rng.uniform(2, max(3.0, duration * 0.35)), 1)
    f: dict[str, Any] = {"kind": kind, "at": at, "duration": length}
    devices = (
        {"fraction": round(rng.uniform(0.02, 0.5), 2)}
        if rng.random() < 0.5
        else {"count": rng.randint(1, 5)}
    )
    match kind:
        case "partition_region":
            f["region"] = rng.choice(regions)
            f["mode"] = rng.choice(("cut", "blackhole"))
        case "kill_relay":
            f["region"] = rng.choice(regions)
        case "kill_broker":
            if rng.random() < 0.5:
                f["region"] = rng.choice(regions)
        case "flap_devices":
            f["devices"] = devices
            f["down_s"] = round(rng.uniform(1, 30), 1)
            f["up_s"] = round(rng.uniform(5, 60), 1)
        case "clock_skew" | "fill_disk":
            f["devices"] = devices
        case "garbage":
            f["devices"] = devices
            f["rate_per_s"] = round(rng.uniform(0.1, 5), 2)
    return f


def swarm_case(
    seed: int,
    *,
    devices: int = 20,
    regions: int = 2,
    duration_s: float = 240.0,
) -> tuple[SimConfig, FaultSchedule]:
    """The configuration and fault schedule of swarm seed ``seed``."""
    rng = random.Random(f"swarm/{seed}")
    region_names = [f"region-{i:02d}" for i in range(regions)]
    faults = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(_KINDS)
        f = _fault(rng, kind, region_names, duration_s)
        if kind == "clock_skew":
            f["hours"] = round(rng.uniform(-48, 48), 3) or -1.0
        faults.append(f)
    config = SimConfig(
        devices=devices,
        regions=regions,
        duration_s=duration_s,
        seed=seed,
        extra_loss=rng.choice((0.0, 0.0, 0.01, 0.05, 0.2)),
        status_interval_s=rng.choice((30.0, 60.0, 300.0)),
        event_interval_s=rng.choice((20.0, 60.0, 300.0)),
        crash_mean_s=rng.choice((300.0, 3600.0, 43_200.0)),
        rollout_every_s=rng.choice((60.0, 120.0, None)),
        web_replicas=rng.randint(0, 3),
        move_after_s=rng.choice((30.0, 120.0)),
        sample_s=2.0,
        settle_max_s=1_800.0,
    )
    return config, FaultSchedule.model_validate({"name": f"swarm-{seed}", "faults": faults})


@dataclass(frozen=True)
class SwarmOutcome:
    """One seed's result."""

    seed: int
    ok: bool
    failed: tuple[str, ...]
    violations: tuple[str, ...]
    wall_s: float


def _run_one(args: tuple[int, int, int, float]) -> SwarmOutcome:
    seed, devices, regions, duration = args
    t0 = time.perf_counter()
    config, schedule = swarm_case(seed, devices=devices, regions=regions, duration_s=duration)
    result = run_deterministic(config, schedule)
    inv = result.invariants
    return SwarmOutcome(
        seed,
        inv.ok,
        tuple(inv.failed()),
        tuple(str(v) for v in inv.violations[:5]),
        time.perf_counter() - t0,
    )


def run_swarm(
    seeds: Iterable[int],
    *,
    devices: int = 20,
    regions: int = 2,
    duration_s: float = 240.0,
    workers: int = 1,
) -> list[SwarmOutcome]:
    """Run every seed; ``workers`` > 1 spreads them over processes (same results)."""
    jobs = [(s, devices, regions, duration_s) for s in seeds]
    if workers <= 1:
        return [_run_one(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run_one, jobs, chunksize=4))
