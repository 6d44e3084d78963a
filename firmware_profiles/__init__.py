"""Firmware profiles: YAML descriptions of gateway device classes.

Each profile names a class of hardware (a Raspberry Pi 4, a SIMATIC IOT2050, an
OpenWrt router ...) with its CPU, memory, storage, GPU, the workload drivers it
supports, the agent's quotas on it, and a model of its uplink for the simulator.

The public names are imported lazily so that ``novacron --help``, which imports
:mod:`firmware_profiles._cli`, does not pay for pydantic and PyYAML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from novacron._lazy import lazy_exports

if TYPE_CHECKING:
    from firmware_profiles._loader import (
        UnknownProfileError,
        builtin_profile_dir,
        list_profiles,
        load_profile,
        load_profile_file,
        profile_names,
    )
    from firmware_profiles._schema import (
        PROFILE_NAME_PATTERN,
        Arch,
        DriverName,
        FirmwareProfile,
        LinkKind,
        LinkModel,
        OutagePattern,
        OutageWindow,
    )

__all__ = [
    "Arch",
    "DriverName",
    "FirmwareProfile",
    "LinkKind",
    "LinkModel",
    "OutagePattern",
    "OutageWindow",
    "PROFILE_NAME_PATTERN",
    "UnknownProfileError",
    "builtin_profile_dir",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "profile_names",
]

_HOMES = {
    "PROFILE_NAME_PATTERN": "firmware_profiles._schema",
    "Arch": "firmware_profiles._schema",
    "DriverName": "firmware_profiles._schema",
    "FirmwareProfile": "firmware_profiles._schema",
    "LinkKind": "firmware_profiles._schema",
    "LinkModel": "firmware_profiles._schema",
    "OutagePattern": "firmware_profiles._schema",
    "OutageWindow": "firmware_profiles._schema",
    "UnknownProfileError": "firmware_profiles._loader",
    "builtin_profile_dir": "firmware_profiles._loader",
    "list_profiles": "firmware_profiles._loader",
    "load_profile": "firmware_profiles._loader",
    "load_profile_file": "firmware_profiles._loader",
    "profile_names": "firmware_profiles._loader",
}

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
