"""Operator commands that talk to a running hub over its API.

``novacron apply``, ``get``, ``describe``, ``rollout`` and ``enroll-token``.

Imported by the CLI dispatcher on every run, so nothing heavy is imported at
module level; each handler imports what it needs.

The hub and the token come from ``--hub`` / ``--token``, else from the
environment variables ``NOVACRON_HUB`` / ``NOVACRON_TOKEN`` (read once, in
:func:`_connection`), else the hub defaults to ``http://127.0.0.1:8090`` and no
token is sent. Exit status: 0 done, 1 the hub refused or failed (its problem
detail is printed) or cannot be reached, 2 bad arguments or an invalid manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sync._exceptions import ConfigError

if TYPE_CHECKING:
    from cloud_hub.client import HubClient, Page

DEFAULT_HUB: Final = "http://127.0.0.1:8090"
ENV_HUB: Final = "NOVACRON_HUB"
ENV_TOKEN: Final = "NOVACRON_TOKEN"
_MAX_LIMIT: Final = 1000
_DEVICE_STATUSES: Final = ("online", "offline", "unreachable", "unknown")
_ROLLOUT_PHASES: Final = ("pending", "progressing", "paused", "succeeded", "failed", "rolled_back")
_DURATION_PART: Final = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_CONNECTION_HELP: Final = (
    "The hub and the API token come from --hub and --token, else from the environment "
    f"variables {ENV_HUB} and {ENV_TOKEN}; the hub defaults to {DEFAULT_HUB}. Exit status "
    "0 when done, 1 when the hub refuses or fails the request (its problem detail is "
    "printed) or cannot be reached, 2 for bad arguments."
)

T = TypeVar("T")


# -- argument types ------------------------------------------------------------------------


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``1w``, ``1h30m`` -> seconds (> 0)."""
    raw = text.strip().lower()
    if raw.isdigit():
        seconds = int(raw)
    else:
        pos, seconds = 0, 0
        for match in _DURATION_PART.finditer(raw):
            if match.start() != pos:
                break
            seconds += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(raw) or not raw:
            raise argparse.ArgumentTypeError(
                f"expected a duration like 3600, 90s, 15m, 24h, 7d or 1h30m, got {text!r}"
            )
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return seconds


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _page_size(text: str) -> int:
    value = _positive(text)
    if value > _MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_LIMIT}, got {value}")
    return value


# -- the parser ------------------------------------------------------------------------------


def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("hub connection")
    group.add_argument(
        "--hub",
        metavar="URL",
        default=None,
        help=f"hub base URL (default: ${ENV_HUB}, else {DEFAULT_HUB})",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        default=None,
        help=f"API token (default: ${ENV_TOKEN}); prefer the variable, argv is visible to others",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each request (default: 30)",
    )
    return parent


def _output_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "yaml"],
        default="table",
        help="output format: table (for people; the default), or the hub's answer as json or yaml",
    )


def _paging_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        type=_page_size,
        default=None,
        metavar="N",
        help=f"page size, 1..{_MAX_LIMIT} (default: the hub's, 100)",
    )
    p.add_argument(
        "--all", action="store_true", help="fetch every page (follow next_cursor to the end)"
    )
    p.add_argument("--cursor", default=None, help="start at this next_cursor of an earlier page")


def _hub_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    conn: argparse.ArgumentParser,
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A command that talks to the hub: the connection flags, and where they come from."""
    return subparsers.add_parser(
        name, parents=[conn], help=help, description=f"{description} {_CONNECTION_HELP}"
    )


def _label_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "-l",
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=text,
    )


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``apply``, ``get``, ``describe``, ``rollout`` and ``enroll-token``."""
    conn = _connection_parent()

    p = _hub_command(
        subparsers,
        "apply",
        conn,
        help="create or update a deployment from a manifest file",
        description="Validate a Deployment manifest (YAML or JSON) locally, then send it to "
        "the hub. A changed manifest becomes a new version and starts a rollout; an "
        "identical one is reported unchanged. An invalid manifest exits 2 naming the file "
        "and the field, without contacting the hub.",
    )
    p.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="manifest file ('-' for stdin)"
    )
    _output_arg(p)
    p.set_defaults(func=_apply)

    p = _hub_command(
        subparsers,
        "get",
        conn,
        help="list devices, deployments, rollouts or enrollment tokens",
        description="List resources, one page (--limit) or all of them (--all). Filters: "
        "--label/--region/--profile/--status for devices, --status (the phase) for "
        "rollouts.",
    )
    p.add_argument(
        "resource",
        choices=["devices", "deployments", "rollouts"],
        help="what to list",
    )
    _label_arg(p, "devices with this label (repeatable; all must match)")
    p.add_argument("--region", default=None, help="devices in this region")
    p.add_argument("--profile", default=None, help="devices with this firmware profile")
    p.add_argument(
        "--status",
        default=None,
        help="devices in this health state (online, offline, unreachable, unknown), "
        "or rollouts in this phase",
    )
    _output_arg(p)
    _paging_args(p)
    p.set_defaults(func=_get)

    p = _hub_command(
        subparsers,
        "describe",
        conn,
        help="show one device or deployment in detail",
        description="Show a device (record, health, desired and reported state, "
        "assignments) or a deployment (latest version, rollout, assignments).",
    )
    p.add_argument("resource", choices=["device", "deployment"], help="what to show")
    p.add_argument("name", help="the device id or the deployment name")
    _output_arg(p)
    p.set_defaults(func=_describe)

    rollout = subparsers.add_parser(
        "rollout",
        help="show, pause, resume or undo a deployment's rollout",
        description="Control the rollout of a deployment's current version. " + _CONNECTION_HELP,
    )
    rsub = rollout.add_subparsers(dest="rollout_command", metavar="ROLLOUT_COMMAND", required=True)
    texts = {
        "status": "show the rollout's phase, wave and device outcomes",
        "pause": "stop starting new waves (devices already updated stay updated)",
        "resume": "continue a paused rollout",
        "undo": "roll back to the previous version",
    }
    for cmd, text in texts.items():
        p = _hub_command(
            rsub,
            cmd,
            conn,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. A command the rollout's phase does "
            "not allow exits 1 with the hub's reason.",
        )
        p.add_argument("name", help="the deployment name")
        _output_arg(p)
        p.set_defaults(func=_rollout, command=cmd)

    tokens = subparsers.add_parser(
        "enroll-token",
        help="create, list or revoke device enrollment tokens",
        description="Enrollment tokens let gateways join a region with `novacron agent "
        "enroll --token`. " + _CONNECTION_HELP,
    )
    tsub = tokens.add_subparsers(dest="token_command", metavar="TOKEN_COMMAND", required=True)
    p = _hub_command(
        tsub,
        "create",
        conn,
        help="make a token and print its secret once",
        description="Make an enrollment token for a region. The secret is printed once; "
        "the hub keeps only its hash.",
    )
    p.add_argument("--region", required=True, help="the region enrolled devices join")
    p.add_argument("--name", default=None, help="a name for the token (default: enroll-REGION)")
    _label_arg(p, "a label enrolled devices get (repeatable)")
    p.add_argument(
        "--uses", type=_positive, default=1, metavar="N", help="how many devices (default: 1)"
    )
    p.add_argument(
        "--ttl",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="expire after this long: 3600, 90s, 15m, 24h, 7d (default: the hub's)",
    )
    _output_arg(p)
    p.set_defaults(func=_token_create)

    p = _hub_command(
        tsub,
        "list",
        conn,
        help="list enrollment tokens (never their secrets)",
        description="List enrollment tokens.",
    )
    _output_arg(p)
    _paging_args(p)
    p.set_defaults(func=_token_list)

    p = _hub_command(
        tsub,
        "revoke",
        conn,
        help="revoke an enrollment token by id",
        description="Revoke an enrollment token: devices can no longer enroll with it.",
    )
    p.add_argument("id", help="the token id (from `enroll-token list`)")
    p.set_defaults(func=_token_revoke)


# -- plumbing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Connection:
    hub: str
    token: str | None
    timeout_s: float


def _connection(args: argparse.Namespace) -> _Connection:
    """The hub and token from the flags, else the environment (read here only)."""
    hub = args.hub or os.environ.get(ENV_HUB) or DEFAULT_HUB
    token = args.token or os.environ.get(ENV_TOKEN) or None
    if not args.timeout > 0:
        raise ConfigError("must be positive", source="<argv>", field="--timeout")
    return _Connection(hub, token, args.timeout)


def _run(args: argparse.Namespace, work: Callable[[HubClient], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` with a client for the hub, in a fresh event loop."""
    import asyncio  # noqa: PLC0415

    from cloud_hub.client import HubApiError, HubClient, HubUnreachableError  # noqa: PLC0415

    conn = _connection(args)
    try:
        client = HubClient(conn.hub, conn.token, timeout_s=conn.timeout_s)
    except ValueError as exc:
        raise ConfigError(str(exc), source="<argv>", field="--hub") from exc

    async def main() -> T:
        async with client:
            return await work(client)

    try:
        return asyncio.run(main())
    except HubApiError as exc:
        if exc.status == 401 and conn.token is None:
            print(f"hint: pass --token or set {ENV_TOKEN}", file=sys.stderr)
        raise
    except HubUnreachableError:
        if not args.hub:
            print(
                f"hint: is the hub running at {conn.hub}? pass --hub or set {ENV_HUB}",
                file=sys.stderr,
            )
        raise


def _emit(data: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, as ``kubectl get`` prints them."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


async def _listing(
    fetch: Callable[[str | None], Any], args: argparse.Namespace, client: HubClient
) -> tuple[list[dict[str, Any]], str | None]:
    """The first page (from --cursor), or every page with --all."""
    if not args.all:
        page: Page = await fetch(args.cursor)
        return list(page.items), page.next_cursor

    async def from_cursor(cursor: str | None) -> Page:
        # iter_pages asks for the first page with None: start at --cursor instead.
        result: Page = await fetch(args.cursor if cursor is None else cursor)
        return result

    return [item async for item in client.iter_pages(from_cursor)], None


def _print_listing(
    items: list[dict[str, Any]],
    next_cursor: str | None,
    fmt: str,
    table: Callable[[list[dict[str, Any]]], str],
) -> None:
    if fmt != "table":
        _emit({"items": items, "next_cursor": next_cursor}, fmt)
        return
    if items:
        print(table(items))
    else:
        print("No resources found.", file=sys.stderr)
    if next_cursor is not None:
        print(f"(more: add --all, or --cursor {next_cursor})", file=sys.stderr)


# -- apply ------------------------------------------------------------------------------------


def _apply(args: argparse.Namespace) -> int:
    from cloud_hub.manifests import load_manifest, parse_manifest  # noqa: PLC0415

    if args.filename == "-":
        manifest = parse_manifest(sys.stdin.read(), source="<stdin>")
    else:
        # A Path, so that load_manifest always reads a file (never takes it for text).
        manifest = load_manifest(Path(args.filename))
    result = _run(args, lambda hub: hub.apply(manifest.to_document()))
    if args.output != "table":
        _emit(result.body, args.output)
        return 0
    verb = "created" if result.created else "unchanged"
    version = f" (version {result.version})" if result.version is not None else ""
    print(f"deployment/{result.name or manifest.name} {verb}{version}")
    if result.created and result.rollout is not None:
        print(f"rollout: {result.rollout.get('phase', '?')}")
    return 0


# -- get --------------------------------------------------------------------------------------


def _device_table(items: list[dict[str, Any]]) -> str:
    return format_table(
        ["ID", "REGION", "PROFILE", "STATUS", "LAST SEEN", "LABELS"],
        [
            [
                d.get("id"),
                d.get("region"),
                d.get("profile"),
                d.get("status"),
                d.get("last_seen"),
                d.get("labels"),
            ]
            for d in items
        ],
    )


def _deployment_table(items: list[dict[str, Any]]) -> str:
    rows = []
    for d in items:
        record = d.get("deployment", d)
        spec = (record.get("document") or {}).get("spec") or {}
        workload = spec.get("workload") or {}
        mode = spec.get("mode")
        if mode == "replicas":
            mode = f"replicas={spec.get('replicas')}"
        rows.append(
            [
                record.get("name"),
                record.get("version"),
                workload.get("image") or workload.get("name"),
                mode,
                "yes" if record.get("deleted") else "no",
                record.get("created_at"),
                record.get("actor"),
            ]
        )
    return format_table(["NAME", "VERSION", "WORKLOAD", "MODE", "DELETED", "CREATED", "BY"], rows)


def _rollout_progress(rollout: Mapping[str, Any]) -> tuple[str, str]:
    """``(wave, done)``: ``2/3`` and ``5/10`` (devices succeeded of the targets).

    From the progress summary (``status``) when the hub sends one (single
    rollouts), else from the raw state (listings).
    """
    status = rollout.get("status")
    if isinstance(status, Mapping) and isinstance(status.get("waves"), list):
        waves = [w for w in status["waves"] if isinstance(w, Mapping)]
        current = status.get("current_wave")
        size = sum(int(w.get("size", 0)) for w in waves)
        done = sum(int(w.get("succeeded", 0)) for w in waves)
    else:
        state = rollout.get("state") or {}
        waves = state.get("waves") or []
        current = state.get("current")
        outcome = state.get("outcome") or []
        size = len(outcome)
        done = sum(1 for o in outcome if o == "succeeded")
    wave = f"{current + 1}/{len(waves)}" if isinstance(current, int) and waves else "-"
    return wave, f"{done}/{size}" if size else "-"


def _rollout_table(items: list[dict[str, Any]]) -> str:
    rows = []
    for r in items:
        wave, done = _rollout_progress(r)
        rows.append(
            [r.get("deployment"), r.get("version"), r.get("phase"), wave, done, r.get("updated_at")]
        )
    return format_table(["DEPLOYMENT", "VERSION", "PHASE", "WAVE", "SUCCEEDED", "UPDATED"], rows)


def _get(args: argparse.Namespace) -> int:
    resource: str = args.resource
    device_only = {
        "--label": bool(args.label),
        "--region": args.region is not None,
        "--profile": args.profile is not None,
    }
    if resource != "devices":
        for flag, given in device_only.items():
            if given:
                raise ConfigError(
                    f"applies to devices only, not {resource}", source="<argv>", field=flag
                )
    allowed = _DEVICE_STATUSES if resource == "devices" else _ROLLOUT_PHASES
    if resource != "deployments" and args.status is not None and args.status not in allowed:
        raise ConfigError(
            f"{args.status!r} is not one of {', '.join(allowed)}", source="<argv>", field="--status"
        )
    if resource == "deployments" and args.status is not None:
        raise ConfigError("applies to devices and rollouts only", source="<argv>", field="--status")

    async def work(hub: HubClient) -> tuple[list[dict[str, Any]], str | None]:
        fetch: Callable[[str | None], Any]
        if resource == "devices":
            labels = dict(args.label)

            def fetch(c: str | None) -> Any:
                return hub.list_devices(
                    labels=labels,
                    region=args.region,
                    profile=args.profile,
                    status=args.status,
                    cursor=c,
                    limit=args.limit,
                )
        elif resource == "deployments":

            def fetch(c: str | None) -> Any:
                return hub.list_deployments(cursor=c, limit=args.limit)
        else:

            def fetch(c: str | None) -> Any:
                return hub.list_rollouts(phase=args.status, cursor=c, limit=args.limit)

        return await _listing(fetch, args, hub)

    items, cursor = _run(args, work)
    table = {"devices": _device_table, "deployments": _deployment_table}.get(
        resource, _rollout_table
    )
    _print_listing(items, cursor, args.output, table)
    return 0


# -- describe -----------------------------------------------------------------------------------


def _section(title: str, data: Any) -> str:
    import yaml  # noqa: PLC0415

    if data in (None, {}, []):
        return f"{title}: -"
    body = yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip()
    return f"{title}:\n" + "\n".join(f"  {line}" for line in body.splitlines())


def _fields(pairs: Sequence[tuple[str, Any]]) -> list[str]:
    width = max(len(k) for k, _ in pairs) + 1
    return [f"{(k + ':').ljust(width)} {_cell(v)}" for k, v in pairs]


def _describe_device(body: Mapping[str, Any]) -> str:
    device = body.get("device", body)
    lines = _fields(
        [
            ("ID", device.get("id")),
            ("Region", device.get("region")),
            ("Profile", device.get("profile")),
            ("Arch", device.get("arch")),
            ("Status", device.get("status")),
            ("Last seen", device.get("last_seen")),
            ("Enrolled", device.get("enrolled_at")),
            ("MQTT user", device.get("mqtt_username")),
            ("Labels", device.get("labels")),
        ]
    )
    for key in ("health", "state", "assignments", "facts"):
        value = body.get(key, device.get(key) if key == "facts" else None)
        lines.append(_section(key.capitalize(), value))
    return "\n".join(lines)


def _describe_deployment(body: Mapping[str, Any]) -> str:
    record = body.get("deployment", body)
    rollout = body.get("rollout")
    pairs: list[tuple[str, Any]] = [
        ("Name", record.get("name")),
        ("Version", record.get("version")),
        ("Created", record.get("created_at")),
        ("By", record.get("actor")),
        ("Deleted", "yes" if record.get("deleted") else "no"),
        ("Rollout", rollout.get("phase") if isinstance(rollout, Mapping) else None),
    ]
    if isinstance(rollout, Mapping):
        wave, done = _rollout_progress(rollout)
        pairs += [("Wave", wave), ("Succeeded", done)]
    lines = _fields(pairs)
    lines.append(_section("Spec", (record.get("document") or {}).get("spec")))
    assignments = body.get("assignments")
    if isinstance(assignments, list):
        ids = [a.get("device_id", a) if isinstance(a, Mapping) else a for a in assignments]
        lines.append(_section(f"Assignments ({len(ids)})", ids))
    return "\n".join(lines)


def _describe(args: argparse.Namespace) -> int:
    if args.resource == "device":
        body = _run(args, lambda hub: hub.get_device(args.name))
        text = _describe_device(body)
    else:
        body = _run(args, lambda hub: hub.get_deployment(args.name))
        text = _describe_deployment(body)
    if args.output == "table":
        print(text)
    else:
        _emit(body, args.output)
    return 0


# -- rollout ------------------------------------------------------------------------------------


def _rollout_text(rollout: Mapping[str, Any]) -> str:
    state = rollout.get("state") or {}
    raw_status = rollout.get("status")
    status: Mapping[str, Any] = raw_status if isinstance(raw_status, Mapping) else {}
    wave, done = _rollout_progress(rollout)
    pairs: list[tuple[str, Any]] = [
        ("Deployment", rollout.get("deployment")),
        ("Version", rollout.get("version")),
        ("Previous", status.get("previous_version", state.get("previous_version"))),
        ("Phase", rollout.get("phase")),
        ("Reason", status.get("reason", state.get("reason")) or None),
        ("Wave", wave),
        ("Succeeded", done),
    ]
    if "failures" in status:
        budget = status.get("failure_budget")
        pairs.append(("Failures", f"{status['failures']} (budget {budget})"))
    pairs.append(("Updated", rollout.get("updated_at")))
    lines = _fields(pairs)
    waves = [w for w in status.get("waves") or [] if isinstance(w, Mapping)]
    if waves:
        columns = ["size", "needed", "succeeded", "failed", "pending", "skipped", "offline"]
        rows = [
            [i + 1, *(w.get(c) for c in columns), w.get("closed_by")] for i, w in enumerate(waves)
        ]
        lines += ["", format_table(["WAVE", *(c.upper() for c in columns), "CLOSED BY"], rows)]
    return "\n".join(lines)


def _rollout(args: argparse.Namespace) -> int:
    command: str = args.command
    name: str = args.name
    if command == "status":
        rollout = _run(args, lambda hub: hub.get_rollout(name))
    else:
        rollout = _run(args, lambda hub: hub.rollout_command(name, command))  # type: ignore[arg-type]
    if args.output != "table":
        _emit(rollout, args.output)
        return 0
    if command != "status":
        past = {"pause": "paused", "resume": "resumed", "undo": "undone"}[command]
        print(f"rollout/{name} {past}")
    print(_rollout_text(rollout))
    return 0


# -- enrollment tokens --------------------------------------------------------------------------


def _token_create(args: argparse.Namespace) -> int:
    name = args.name or f"enroll-{args.region}"
    created = _run(
        args,
        lambda hub: hub.create_enroll_token(
            name=name,
            region=args.region,
            labels=dict(args.label),
            max_uses=args.uses,
            ttl_s=args.ttl,
        ),
    )
    if args.output != "table":
        _emit(created, args.output)
        return 0
    print(
        "\n".join(
            _fields(
                [
                    ("ID", created.get("id")),
                    ("Name", created.get("name")),
                    ("Region", created.get("region")),
                    ("Labels", created.get("labels")),
                    ("Uses", f"{created.get('uses', 0)}/{created.get('max_uses')}"),
                    ("Expires", created.get("expires_at")),
                ]
            )
        )
    )
    print(f"Token:   {created.get('token')}")
    print(
        "(shown once; enroll a gateway with `novacron agent enroll --hub URL --token TOKEN`)",
        file=sys.stderr,
    )
    return 0


def _token_table(items: list[dict[str, Any]]) -> str:
    return format_table(
        ["ID", "NAME", "REGION", "USES", "EXPIRES", "REVOKED", "LABELS"],
        [
            [
                t.get("id"),
                t.get("name"),
                t.get("region"),
                f"{t.get('uses', 0)}/{t.get('max_uses')}",
                t.get("expires_at"),
                t.get("revoked_at"),
                t.get("labels"),
            ]
            for t in items
        ],
    )


def _token_list(args: argparse.Namespace) -> int:
    async def work(hub: HubClient) -> tuple[list[dict[str, Any]], str | None]:
        return await _listing(
            lambda c: hub.list_enroll_tokens(cursor=c, limit=args.limit), args, hub
        )

    items, cursor = _run(args, work)
    _print_listing(items, cursor, args.output, _token_table)
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    _run(args, lambda hub: hub.revoke_enroll_token(args.id))
    print(f"enrollment token {args.id} revoked")
    return 0
