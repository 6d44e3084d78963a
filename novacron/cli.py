"""Entry point of the ``novacron`` console script.

Each component contributes its subcommands through a ``register(subparsers)``
function in a small ``_cli`` module; heavy imports happen inside the command
handlers so that ``novacron --help`` and the agent stay light. A run of one
command imports only its component's ``_cli`` module (see :data:`_COMMANDS`):
the agent, a daemon on a small gateway, keeps no parser of the hub, relay or
simulator commands in memory.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

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

# Top-level command -> the module of _COMMAND_MODULES that registers it (a test
# checks that the two agree).
_COMMANDS: dict[str, str] = {
    "agent": "edge_agent._cli",
    "apply": "cloud_hub._client_cli",
    "audit": "cloud_hub._cli",
    "demo": "simulator._cli",
    "describe": "cloud_hub._client_cli",
    "enroll-token": "cloud_hub._client_cli",
    "get": "cloud_hub._client_cli",
    "hub": "cloud_hub._hub_cli",
    "profiles": "firmware_profiles._cli",
    "relay": "regional_relay._cli",
    "rollout": "cloud_hub._client_cli",
    "sim": "simulator._cli",
}

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: ``COLUMNS``, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, sized to the terminal without importing ``shutil``.

    argparse makes a formatter at every ``add_argument`` (to check the metavar)
    and sizes it with ``shutil.get_terminal_size``; building a parser thus
    imported ``shutil`` with ``bz2`` and ``lzma``, 0.45 MB that a running agent
    kept. Same width: the terminal's columns less 2, as argparse computes it.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`_HelpFormatter` unless told otherwise.

    Subcommand parsers are made of their parent's class, so they get it too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
    )
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object per line (for production)"
    )


def build_parser(modules: Sequence[str] = _COMMAND_MODULES) -> argparse.ArgumentParser:
    """Build the argument parser with the subcommands of ``modules`` (default: all)."""
    parser = _Parser(
        prog="novacron",
        description="NovaCron Edge: an edge-first orchestrator for fleets of IoT gateways.",
    )
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def _command_modules(argv: Sequence[str] | None) -> Sequence[str]:
    """The ``_cli`` modules a parse of ``argv`` needs: the command's own, if known.

    A parser with only that command's subtree parses a valid command line exactly
    as the full one does (same usage, same errors below it); help, errors in the
    global options and unknown commands get every command.
    """
    pre = _Parser(prog="novacron", add_help=False, exit_on_error=False)
    _add_global_options(pre)
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("command", nargs="?")
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:
        return _COMMAND_MODULES
    module = _COMMANDS.get(known.command) if isinstance(known.command, str) else None
    return _COMMAND_MODULES if module is None or known.help else (module,)


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
    parser = build_parser(_command_modules(argv))
    args = parser.parse_args(argv)
    # The handler may run for the life of a daemon (``agent run``): do not keep
    # the parser tree alive in this frame meanwhile.
    del parser
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
