"""Entry point of the ``novacron`` console script.

Each component contributes its subcommands through a ``register(subparsers)``
function in a small ``_cli`` module; heavy imports happen inside the command
handlers so that ``novacron --help`` and the agent stay light.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from sync._exceptions import ConfigError, NovaCronError

# Modules exposing ``register(subparsers: argparse._SubParsersAction) -> None``.
# A subcommand is listed only once its capability exists.
_COMMAND_MODULES: tuple[str, ...] = (
    "cloud_hub._cli",
    "cloud_hub._client_cli",
    "cloud_hub._hub_cli",
    "edge_agent._cli",
    "firmware_profiles._cli",
    "regional_relay._cli",
    "simulator._cli",
)

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="novacron",
        description="NovaCron Edge: an edge-first orchestrator for fleets of IoT gateways.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
    )
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object per line (for production)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _configure_logging(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        from novacron._logjson import JsonFormatter  # noqa: PLC0415 - only when asked

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (0 ok, 1 failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level, args.log_json)
    handler: Handler = args.func
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"novacron: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NovaCronError as exc:
        print(f"novacron: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console-script wrapper around :func:`main`."""
    sys.exit(main())
