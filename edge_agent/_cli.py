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
        "run",
        help="run the agent in the foreground (what the systemd unit starts)",
        description="Run the edge agent: reconcile workloads from the local journal at "
        "once, with or without network, and sync with the relay when it is reachable.",
    )
    p.add_argument("--config", type=Path, required=True, help="agent YAML config file")
    p.add_argument(
        "--profile-dir",
        type=Path,
        action="append",
        default=[],
        help="extra firmware profile directory (repeatable)",
    )
    p.set_defaults(func=_run)

    control_help = {
        "status": "show the agent's status (device, link, journal, counters)",
        "workloads": "list workloads and their phases",
        "logs": "print the last lines of a workload's log",
        "stop": "stop a workload locally (an override that wins until cleared)",
        "start": "start a workload locally (an override; also retries a failed one)",
        "clear": "clear a local stop/start override",
    }
    for cmd, text in control_help.items():
        p = sub.add_parser(cmd, help=text, description=text + ". Works offline.")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", type=Path, help="agent config (to find the socket)")
        where.add_argument("--socket", type=Path, help="agent control socket path")
        if cmd in ("logs", "stop", "start", "clear"):
            p.add_argument("name", help="workload name")
        if cmd == "logs":
            p.add_argument("--tail", type=int, default=100, help="how many lines (default: 100)")
        if cmd in ("status", "workloads"):
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=_control, control_command=cmd)

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

    p = sub.add_parser(
        "enroll",
        help="register this device with the hub and store its identity",
        description="Make or load the device key, send it with the device's facts and "
        "firmware profile to the hub, and store the answer (device id, region, relays, "
        "broker account, hub key) in the data directory. With --config, also write or "
        "update the agent config. Exit status 2 if the hub refuses (spent or expired "
        "token, key already enrolled), 1 if it cannot be reached or fails.",
    )
    p.add_argument("--hub", required=True, help="hub base URL, e.g. https://hub.example.net")
    p.add_argument("--token", required=True, help="one-time enrollment token from the hub")
    p.add_argument("--config", type=Path, default=None, help="agent config file to write or update")
    p.add_argument(
        "--profile", default=None, help="firmware profile name (default: the config's profile)"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default: the config's data_dir, else /var/lib/novacron)",
    )
    p.add_argument("--force", action="store_true", help="enroll again even if already enrolled")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the hub (default: 30)"
    )
    p.set_defaults(func=_enroll)


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
    print(
        "next: edit the config, then `systemctl daemon-reload && systemctl enable --now "
        "novacron-agent`"
    )
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from edge_agent.install import uninstall  # noqa: PLC0415

    for path in uninstall(args.prefix, purge=args.purge):
        print(f"removed {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from edge_agent._runtime import defer_unused_imports, limit_malloc_arenas  # noqa: PLC0415

    limit_malloc_arenas()  # before any thread: a no-op under the unit's MALLOC_ARENA_MAX
    defer_unused_imports()  # before the agent's modules import paho-mqtt and build models

    from edge_agent.agent import run_agent  # noqa: PLC0415
    from edge_agent.config import load_agent_config  # noqa: PLC0415

    config = load_agent_config(args.config, profile_dirs=tuple(args.profile_dir))
    return asyncio.run(run_agent(config, profile_dirs=tuple(args.profile_dir)))


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    from edge_agent.config import DEFAULT_CONFIG_PATH, load_agent_config  # noqa: PLC0415

    config = load_agent_config(args.config or DEFAULT_CONFIG_PATH)
    return config.control_socket


def _control(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from edge_agent.control import request  # noqa: PLC0415

    cmd: str = args.control_command
    payload: dict[str, Any] = {"cmd": cmd}
    if hasattr(args, "name"):
        payload["name"] = args.name
    if cmd == "logs":
        payload["tail"] = args.tail
    result = request(_socket_path(args), payload)
    if cmd == "logs":
        print(result, end="" if str(result).endswith("\n") else "\n")
    elif cmd == "workloads" and not args.json:
        print(f"{'NAME':<24} {'PHASE':<10} {'VERSION':<10} {'RESTARTS':>8}  REASON")
        for w in result:
            print(
                f"{w['name']:<24} {w['phase']:<10} {w['version']:<10} {w['restarts']:>8}  "
                f"{w.get('override') or ''} {w['reason']}".rstrip()
            )
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _enroll(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from edge_agent.enroll import (  # noqa: PLC0415
        AlreadyEnrolledError,
        EnrollOptions,
        HubRejectedError,
        enroll,
    )

    options = EnrollOptions(
        hub_url=args.hub,
        token=args.token,
        config_path=args.config,
        profile=args.profile,
        data_dir=args.data_dir,
        force=args.force,
        timeout_s=args.timeout,
    )
    try:
        result = asyncio.run(enroll(options))
    except (AlreadyEnrolledError, HubRejectedError) as exc:
        # Bad input (a spent token, a second enrollment), not a failure: exit 2.
        print(f"novacron: error: {exc}", file=sys.stderr)
        return 2
    print(f"device: {result.device_id}")
    print(f"region: {result.region}")
    print(f"relays: {', '.join(result.relays)}")
    print(f"key:    {result.device_key_id}")
    if args.config is not None:
        print(f"config: {args.config}")
    return 0
