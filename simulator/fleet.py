"""Fleet files: which regions a simulated fleet has and which device classes in each.

A fleet file names regions and, per region, the share of each firmware profile
(``firmware_profiles/``)::

    name: default
    regions:
      - name: region-00
        weight: 2                        # twice the devices of a weight-1 region
        profiles: {raspberry-pi-4: 3, openwrt-router: 1}
      - name: region-01
        profiles: {x86-vsat-gateway: 1}

Shares and weights are relative (they need not sum to 1). :func:`assign_fleet`
spreads ``N`` devices over the regions and profiles with exact counts (largest
remainder) and a seeded shuffle, so the same file, ``N``, ``R`` and seed always
give the same fleet. ``R`` may differ from the file: extra regions repeat the
file's profile mixes in order and are named ``region-NN``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from firmware_profiles._loader import load_profile, profile_names
from firmware_profiles._schema import FirmwareProfile
from firmware_profiles._yamlio import load_yaml_model
from simulator.faults import DeviceRef
from sync._exceptions import ConfigError

__all__ = [
    "Fleet",
    "FleetSpec",
    "RegionSpec",
    "assign_fleet",
    "default_fleet_spec",
    "load_fleet_spec",
    "outage_means",
    "region_counts",
    "split_counts",
]

MAX_DEVICES = 1_000_000
MAX_REGIONS = 1_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Share = Annotated[float, Field(gt=0, le=1_000_000)]


class RegionSpec(_Frozen):
    """One region of the fleet file."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    weight: Share = 1.0
    profiles: dict[str, Share] = Field(min_length=1)


class FleetSpec(_Frozen):
    """A fleet file."""

    name: str = Field(default="", max_length=200)
    regions: tuple[RegionSpec, ...] = Field(min_length=1, max_length=MAX_REGIONS)

    @model_validator(mode="after")
    def _unique(self) -> FleetSpec:
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise ValueError("region names must be unique")
        return self

    def profile_set(self) -> set[str]:
        """Every profile name the file uses."""
        return {p for r in self.regions for p in r.profiles}


def load_fleet_spec(
    path: str | Path, *, profile_dirs: Iterable[str | PathLike[str]] = ()
) -> FleetSpec:
    """Load a fleet file and check that every profile it names exists.

    Raises:
        ConfigError: missing file, bad YAML, an invalid field, or an unknown
            profile (naming ``regions[i].profiles.<name>``).
    """
    file = Path(path)
    spec = load_yaml_model(file, FleetSpec)
    known = set(profile_names(profile_dirs))
    for i, region in enumerate(spec.regions):
        for name in region.profiles:
            if name not in known:
                raise ConfigError(
                    f"unknown firmware profile {name!r} (known: {', '.join(sorted(known))})",
                    source=str(file),
                    field=f"regions[{i}].profiles.{name}",
                )
    return spec


def default_fleet_spec() -> FleetSpec:
    """The fleet of ``examples/fleets/default.yaml`` when no file is given: every
    built-in profile, equal shares, in one region template."""
    return FleetSpec(
        name="builtin",
        regions=(RegionSpec(name="region-00", profiles=dict.fromkeys(profile_names(), 1.0)),),
    )


def split_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder).

    Ties in the remainders go to the earlier weight, so the result is fixed.
    """
    if total < 0 or not weights or any(w <= 0 for w in weights):
        raise ValueError("total must be >= 0 and weights positive")
    s = math.fsum(weights)
    exact = [total * w / s for w in weights]
    counts = [math.floor(x) for x in exact]
    rest = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


@dataclass(frozen=True, slots=True)
class Fleet:
    """An assigned fleet: region names and devices, sorted by device id."""

    regions: tuple[str, ...]
    devices: tuple[DeviceRef, ...]
    seed: int

    def in_region(self, region: str) -> list[DeviceRef]:
        """The devices of ``region``."""
        return [d for d in self.devices if d.region == region]

    def profile_counts(self) -> dict[str, dict[str, int]]:
        """Per region, devices per profile (sorted keys)."""
        out: dict[str, dict[str, int]] = {r: {} for r in self.regions}
        for d in self.devices:
            per = out[d.region]
            per[d.profile] = per.get(d.profile, 0) + 1
        return {r: dict(sorted(p.items())) for r, p in out.items()}


def assign_fleet(
    spec: FleetSpec, devices: int, *, regions: int | None = None, seed: int = 0
) -> Fleet:
    """Spread ``devices`` devices over regions and profiles, fixed by ``seed``.

    Args:
        spec: the fleet file.
        devices: how many devices (``N``).
        regions: how many regions (``R``; default: the file's).
        seed: the run's seed.

    Raises:
        ConfigError: ``N`` or ``R`` out of range (field ``--devices``/``--regions``).
    """
    if not 1 <= devices <= MAX_DEVICES:
        raise ConfigError(f"must be 1..{MAX_DEVICES}", source="<argv>", field="--devices")
    n_regions = len(spec.regions) if regions is None else regions
    if not 1 <= n_regions <= MAX_REGIONS:
        raise ConfigError(f"must be 1..{MAX_REGIONS}", source="<argv>", field="--regions")
    templates = [spec.regions[i % len(spec.regions)] for i in range(n_regions)]
    names = [
        spec.regions[i].name if i < len(spec.regions) else f"region-{i:02d}"
        for i in range(n_regions)
    ]
    if len(set(names)) != len(names):
        raise ConfigError(
            "generated region names collide with the file's; rename the file's regions",
            source="<argv>",
            field="--regions",
        )
    rng = random.Random(seed)
    width = max(5, len(str(devices - 1)))
    ids = [f"dev-{i:0{width}d}" for i in range(devices)]
    rng.shuffle(ids)
    per_region = split_counts(devices, [t.weight for t in templates])
    out: list[DeviceRef] = []
    pos = 0
    for name, template, count in zip(names, templates, per_region, strict=True):
        profiles = sorted(template.profiles)
        per_profile = split_counts(count, [template.profiles[p] for p in profiles])
        labels = [p for p, k in zip(profiles, per_profile, strict=True) for _ in range(k)]
        rng.shuffle(labels)
        for device_id, profile in zip(ids[pos : pos + count], labels, strict=True):
            out.append(DeviceRef(device_id, name, profile))
        pos += count
    out.sort(key=lambda d: d.device_id)
    return Fleet(tuple(names), tuple(out), seed)


def outage_means(
    names: Iterable[str], *, profile_dirs: Iterable[str | PathLike[str]] = ()
) -> dict[str, tuple[float, float]]:
    """Per profile with random outages, ``(mean_up_s, mean_down_s)`` for the timeline."""
    out: dict[str, tuple[float, float]] = {}
    dirs = list(profile_dirs)
    for name in sorted(set(names)):
        profile: FirmwareProfile = load_profile(name, dirs)
        o = profile.link.outages
        if o.mean_up_s is not None and o.mean_down_s is not None:
            out[name] = (o.mean_up_s, o.mean_down_s)
    return out


def region_counts(fleet: Fleet) -> Mapping[str, int]:
    """Devices per region."""
    return {r: len(fleet.in_region(r)) for r in fleet.regions}
