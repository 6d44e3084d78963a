"""``novacron agent``: run, control, enroll and install the edge agent.

Imported by the CLI dispatcher on every run, so nothing heavy is imported at
module level; each handler imports what it needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``agent`` command group to the ``novacron`` parser."""
    parser = subparsers.add_parser(
        "agent",
        help="run, control, enroll and install the edge agent",
        description="The edge agent supervises a gateway's workloads, keeps a local "
        "journal, and syncs with its region's relay when the network allows.",
    )
    sub = parser.add_subparsers(dest="agent_command", metavar="AGENT_COMMAND", required=True)

    p = sub.add_parser(
        "install",
        help="write a systemd unit, a starting config and the data directory",
        description="Install the agent as a systemd service. Writes "
        "PREFIX/etc/systemd/system/novacron-agent.service, PREFIX/etc/novacron/agent.yaml "
        "(kept if it exists) and PREFIX/var/lib/novacron. Does not start the service.",
    )
    p.add_argument(
        "--prefix", type=Path, default=Path("/"), help="root to install under (default: /)"
    )
    p.add_argument("--device-id", default="gw-0001", help="device id for a new config")
    p.add_argument("--region", default="default", help="region for a new config")
    p.add_argument("--profile", default="generic-x86_64", help="firmware profile for a new config")
    p.add_argument(
        "--relay", default="mqtt://localhost:1883", help="relay broker URL for a new config"
    )
    p.set_defaults(func=_install)

    p = sub.add_parser(
        "uninstall",
        help="remove the systemd unit (and with --purge the config and data)",
        description="Remove the agent's systemd unit. Stop the service first.",
    )
    p.add_argument(
        "--prefix", type=Path, default=Path("/"), help="root it was installed under (default: /)"
    )
    p.add_argument(
        "--purge", action="store_true", help="also delete the config and the data directory"
    )
    p.set_defaults(func=_uninstall)


def _install(args: argparse.Namespace) -> int:
    from edge_agent.config import example_agent_config  # noqa: PLC0415
    from edge_agent.install import InstallLayout, install, verify_unit  # noqa: PLC0415

    runtime_data = InstallLayout(Path("/")).data_dir
    layout = InstallLayout(args.prefix)
    text = example_agent_config(
        device_id=args.device_id,
        region=args.region,
        data_dir=runtime_data if args.prefix == Path("/") else layout.data_dir,
        profile=args.profile,
        relay=args.relay,
    )
    layout = install(args.prefix, config_text=text)
    ok, output = verify_unit(layout.unit_path)
    print(f"unit:   {layout.unit_path}")
    print(f"config: {layout.config_path}")
    print(f"data:   {layout.data_dir}")
    if not ok:
        print(f"systemd-analyze verify reported problems:\n{output}")
        return 1
    print("next: edit the config, then `systemctl daemon-reload && systemctl enable --now "
          "novacron-agent`")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from edge_agent.install import uninstall  # noqa: PLC0415

    for path in uninstall(args.prefix, purge=args.purge):
        print(f"removed {path}")
    return 0
