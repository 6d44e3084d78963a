"""``novacron relay``: run a regional relay.

Imported by the CLI dispatcher on every run, so nothing heavy is imported at
module level; each handler imports what it needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``relay`` command group to the ``novacron`` parser."""
    parser = subparsers.add_parser(
        "relay",
        help="run a regional relay (store-and-forward between agents and the hub)",
        description="A regional relay serves one region: it verifies its agents' "
        "uplinks, keeps them in a durable outbox, forwards them to the hub in signed "
        "batches, fans desired state out to the agents and reports their presence.",
    )
    sub = parser.add_subparsers(dest="relay_command", metavar="RELAY_COMMAND", required=True)

    p = sub.add_parser(
        "run",
        help="run the relay in the foreground",
        description="Run the regional relay until interrupted. Exit status 2 if the "
        "config is invalid (the message names the file and the field).",
    )
    p.add_argument("--config", type=Path, required=True, help="relay YAML config file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from regional_relay.config import load_relay_config  # noqa: PLC0415

    config = load_relay_config(args.config)
    # Imported only here: the relay daemon is the heaviest part of the package.
    from regional_relay.relay import run_relay  # noqa: PLC0415

    result: int = asyncio.run(run_relay(config))
    return result
