"""Device metrics read from ``/proc`` and ``/sys``: cheap, dependency-free.

The agent samples these every firmware-profile telemetry interval. Every
reader tolerates a missing file (containers, non-Linux test hosts) by leaving
the figure out rather than failing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_THERMAL_ROOT = Path("/sys/class/thermal")


@dataclass(slots=True)
class CpuSampler:
    """Computes CPU utilisation between two reads of ``/proc/stat``."""

    stat_path: Path = Path("/proc/stat")
    _last: tuple[int, int] | None = field(default=None, init=False)

    def sample(self) -> float | None:
        """Return busy percent since the previous call (``None`` on the first)."""
        try:
            line = self.stat_path.read_text(encoding="ascii").split("\n", 1)[0]
        except OSError:
            return None
        parts = line.split()
        if not parts or parts[0] != "cpu":
            return None
        values = [int(v) for v in parts[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total = sum(values)
        last, self._last = self._last, (idle, total)
        if last is None or total <= last[1]:
            return None
        busy = (total - last[1]) - (idle - last[0])
        return round(100.0 * busy / (total - last[1]), 2)


def memory_used_mb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """Memory in use (total minus available) in MiB, or ``None`` if unknown."""
    try:
        fields = {
            k: int(v.split()[0])
            for k, v in (
                line.split(":", 1) for line in meminfo.read_text(encoding="ascii").splitlines()
            )
        }
    except (OSError, ValueError):
        return None
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return round((fields["MemTotal"] - fields["MemAvailable"]) / 1024.0, 1)


def disk_used_pct(path: str | os.PathLike[str]) -> float | None:
    """Percent of the filesystem holding ``path`` that is in use."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_blocks == 0:
        return None
    return round(100.0 * (st.f_blocks - st.f_bavail) / st.f_blocks, 2)


def temperature_c(root: Path = _THERMAL_ROOT) -> float | None:
    """Highest thermal-zone temperature in degrees Celsius, where a zone exists."""
    best: float | None = None
    try:
        zones = list(root.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for zone in zones:
        try:
            value = int(zone.read_text(encoding="ascii").strip()) / 1000.0
        except (OSError, ValueError):
            continue
        best = value if best is None else max(best, value)
    return best


def sample_device_metrics(cpu: CpuSampler, data_dir: str | os.PathLike[str]) -> dict[str, float]:
    """One metrics sample; figures the host does not expose are left out."""
    figures: dict[str, float | None] = {
        "cpu_pct": cpu.sample(),
        "mem_used_mb": memory_used_mb(),
        "disk_used_pct": disk_used_pct(data_dir),
        "temp_c": temperature_c(),
    }
    return {k: v for k, v in figures.items() if v is not None}
