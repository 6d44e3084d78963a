"""``novacron profiles``: list and show firmware profiles.

Imported by the CLI dispatcher on every run, so it imports nothing heavy at module
level; the handlers import the loader when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from firmware_profiles._schema import FirmwareProfile


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``profiles`` command group to the ``novacron`` parser.

    Args:
        subparsers: the top-level subparsers action of ``novacron``.
    """
    dirs = argparse.ArgumentParser(add_help=False)
    dirs.add_argument(
        "--dir",
        dest="profile_dirs",
        metavar="DIR",
        type=Path,
        action="append",
        default=[],
        help="extra directory of <name>.yaml profiles, searched before the built-in "
        "ones (repeatable; the last one given wins)",
    )
    parser = subparsers.add_parser(
        "profiles",
        help="list and show firmware profiles (device classes)",
        description="Firmware profiles describe classes of gateway hardware: CPU, memory, "
        "storage, workload drivers, agent quotas and the uplink model.",
    )
    sub = parser.add_subparsers(dest="profiles_command", metavar="PROFILES_COMMAND", required=True)

    list_parser = sub.add_parser(
        "list",
        parents=[dirs],
        help="list the available profiles as a table",
        description="List every available firmware profile, built-in and from --dir.",
    )
    list_parser.add_argument(
        "--json", action="store_true", help="print a JSON array of full profiles instead"
    )
    list_parser.set_defaults(func=_cmd_list)

    show_parser = sub.add_parser(
        "show",
        parents=[dirs],
        help="show one profile in full",
        description="Show one firmware profile in full, as YAML (default) or JSON.",
    )
    show_parser.add_argument(
        "name", metavar="NAME", help="profile name (e.g. raspberry-pi-4) or path to a .yaml file"
    )
    show_parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show_parser.set_defaults(func=_cmd_show)


def _format_table(profiles: list[FirmwareProfile]) -> str:
    header = ("NAME", "ARCH", "CORES", "MEMORY", "DRIVERS", "LINK")
    rows = [header] + [
        (
            p.name,
            p.arch,
            str(p.cpu_cores),
            f"{p.memory_mb} MB",
            ",".join(p.drivers),
            p.link.summary(),
        )
        for p in profiles
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _cmd_list(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415 - keep `novacron --help` light

    from firmware_profiles._loader import list_profiles  # noqa: PLC0415

    profiles = list_profiles(args.profile_dirs)
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in profiles], indent=2))
    else:
        print(_format_table(profiles))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from firmware_profiles._loader import load_profile  # noqa: PLC0415

    profile = load_profile(args.name, args.profile_dirs)
    data = profile.model_dump(mode="json")
    if args.json:
        import json  # noqa: PLC0415

        print(json.dumps(data, indent=2))
    else:
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return 0
