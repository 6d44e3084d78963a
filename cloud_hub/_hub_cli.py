"""``novacron hub``: run the cloud hub and manage its API tokens on the hub host.

Imported by the CLI dispatcher on every run, so nothing heavy is imported at
module level; each handler imports what it needs.

``hub token`` works on the token database directly (no running hub needed): it
is how the first admin token is made. Everything else an operator does goes
through the API (``novacron apply``, ``get``, ``rollout``, ``enroll-token``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync._exceptions import ConfigError

if TYPE_CHECKING:
    from cloud_hub.auth import SQLiteTokenStore
    from cloud_hub.config import HubConfig

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``hub`` command group to the ``novacron`` parser."""
    parser = subparsers.add_parser(
        "hub",
        help="run the cloud hub (fleet API, reconciler, rollouts) and manage its tokens",
        description="The cloud hub serves the fleet API, ingests what the regions' relays "
        "forward, places deployments and drives their rollouts.",
    )
    sub = parser.add_subparsers(dest="hub_command", metavar="HUB_COMMAND", required=True)

    p = sub.add_parser(
        "serve",
        help="run the hub in the foreground",
        description="Run the hub until interrupted (SIGINT/SIGTERM stop it gracefully). "
        "Flags override the config file; without a file the hub listens on "
        "127.0.0.1:8090 with SQLite in the data directory and no MQTT broker. Exit "
        "status 2 if the config is invalid (the message names the file and the field).",
    )
    _add_config(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="address to serve the API on")
    p.set_defaults(func=_serve)

    tokens = sub.add_parser(
        "token",
        help="create, list or revoke API tokens (on the hub host, offline)",
        description="Manage API tokens directly in the hub's token database "
        "(<data-dir>/tokens.db). Tokens are stored hashed: a new token is printed once.",
    )
    tsub = tokens.add_subparsers(dest="token_command", metavar="TOKEN_COMMAND", required=True)
    p = tsub.add_parser(
        "create",
        help="make a token and print it once",
        description="Make an API token. Roles: admin (everything, tokens and audit), "
        "operator (fleet changes), viewer (read only), device (its own device only).",
    )
    _add_config(p)
    p.add_argument("--name", required=True, help="what the token is for (shown in listings)")
    p.add_argument(
        "--role", required=True, choices=("admin", "operator", "viewer", "device"), help="its role"
    )
    p.add_argument("--device", help="the device a device token belongs to")
    p.add_argument("--ttl", type=_ttl, help="lifetime, e.g. 30d, 12h, 3600s (default: none)")
    p.add_argument("--json", action="store_true", help="print the token and its record as JSON")
    p.set_defaults(func=_token_create)

    p = tsub.add_parser("list", help="list tokens (never their secrets)")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_token_list)

    p = tsub.add_parser("revoke", help="revoke a token by id")
    _add_config(p)
    p.add_argument("token_id", metavar="ID", help="the token id (the part after 'nct_')")
    p.set_defaults(func=_token_revoke)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="hub YAML config file")
    p.add_argument("--data-dir", type=Path, help="the hub's data directory (overrides the file)")


def _ttl(text: str) -> dt.timedelta:
    unit = text[-1:].lower()
    number = text[:-1] if unit in _TTL_UNITS else text
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30d, 12h or 3600s, got {text!r}"
        )
    return dt.timedelta(seconds=int(number) * _TTL_UNITS.get(unit, 1))


def _config(args: argparse.Namespace) -> HubConfig:
    from cloud_hub.config import load_hub_config  # noqa: PLC0415

    return load_hub_config(
        args.config, listen=getattr(args, "listen", None), data_dir=args.data_dir
    )


def _serve(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    config = _config(args)
    from cloud_hub.server import run_hub  # noqa: PLC0415 - the heavy part

    result: int = asyncio.run(run_hub(config))
    return result


def _tokens(config: HubConfig) -> SQLiteTokenStore:
    from cloud_hub.auth import SQLiteTokenStore  # noqa: PLC0415

    config.data_dir.mkdir(parents=True, exist_ok=True)
    return SQLiteTokenStore.open(config.data_dir / "tokens.db")


def _audit(config: HubConfig, action: str, target: str, detail: dict[str, Any]) -> None:
    """Token changes made on the hub host are audited like API calls."""
    import getpass  # noqa: PLC0415

    from cloud_hub.audit import AuditLog  # noqa: PLC0415

    log = AuditLog.open(config.data_dir / "audit.db")
    try:
        log.append(
            actor=f"local:{getpass.getuser()}",
            role="host",
            action=f"cli {action}",
            target=target,
            outcome=0,
            detail=detail,
        )
    finally:
        log.close()


def _token_create(args: argparse.Namespace) -> int:
    if args.role == "device" and not args.device:
        raise ConfigError("a device token needs --device ID", source="<argv>", field="--device")
    if args.role != "device" and args.device:
        raise ConfigError("--device is only for --role device", source="<argv>", field="--device")
    config = _config(args)
    store = _tokens(config)
    try:
        raw, info = store.create(args.name, args.role, device_id=args.device, ttl=args.ttl)
    finally:
        store.close()
    _audit(config, "token create", info.id, {"name": info.name, "role": info.role})
    if args.json:
        print(json.dumps({"token": raw, **info.to_dict()}, indent=2, default=str))
    else:
        print(raw)
        print(f"# token {info.id} ({info.role}); shown once, keep it safe", file=sys.stderr)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    store = _tokens(_config(args))
    try:
        infos = store.list()
    finally:
        store.close()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2, default=str))
        return 0
    print(f"{'ID':<14}{'ROLE':<10}{'STATE':<9}NAME")
    for info in infos:
        state = "revoked" if info.revoked else "active"
        print(f"{info.id:<14}{info.role:<10}{state:<9}{info.name}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    config = _config(args)
    store = _tokens(config)
    try:
        info = store.revoke(args.token_id)
    finally:
        store.close()
    _audit(config, "token revoke", info.id, {"name": info.name})
    print(f"revoked {info.id} ({info.name})")
    return 0
