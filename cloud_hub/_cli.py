"""``novacron audit``: verify the hub's audit log and export anchors of it.

Imported by the CLI dispatcher on every run, so nothing heavy is imported at
module level; each handler imports what it needs.

Exit status of ``audit verify``: 0 when the log is intact, 1 when tampering is
found (the first bad seq and the reason are printed), 2 on bad arguments or a
missing file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_hub.audit import VerifyReport


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``audit`` command group to the ``novacron`` parser."""
    parser = subparsers.add_parser(
        "audit",
        help="verify the hub's hash-chained audit log",
        description="Every mutating call to the hub API is written to a hash-chained, "
        "append-only audit log (audit.db in the hub's data directory) with an anchor "
        "file (audit.anchor) holding the latest (seq, hash).",
    )
    sub = parser.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=True)

    p = sub.add_parser(
        "verify",
        help="check that no entry was altered, dropped, reordered or cut off",
        description="Walk the chain and compare it with its anchors. Exit status 0 when "
        "intact, 1 when tampering is found (prints the first bad seq and the reason), "
        "2 on bad arguments or a missing file. The local anchor (audit.anchor next to the "
        "database) is used when present; add --anchor for anchors exported elsewhere.",
    )
    _add_location(p)
    p.add_argument(
        "--anchor",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="also check against this exported anchor file (repeatable)",
    )
    p.add_argument(
        "--no-local-anchor",
        action="store_true",
        help="ignore the local audit.anchor file",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "anchor",
        help="verify the log, then print its head (seq, hash) to keep elsewhere",
        description="Verify the log and print its current head as a JSON anchor. Keep it "
        "out of reach of the hub host (another machine, write-once storage, a ticket): "
        "an attacker who rewrites both the database and the local anchor is caught only "
        "by an anchor they cannot change. Check later with `novacron audit verify "
        "--anchor FILE`. Exit status 1 (and nothing written) if the log is not intact.",
    )
    _add_location(p)
    p.add_argument(
        "--out", type=Path, default=None, help="write the anchor to this file (default: stdout)"
    )
    p.set_defaults(func=_anchor)


def _add_location(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path, help="the hub's data directory (uses DIR/audit.db)")
    where.add_argument("--db", type=Path, help="the audit database file")


def _db_path(args: argparse.Namespace) -> Path:
    from cloud_hub.audit import DB_FILENAME  # noqa: PLC0415
    from sync._exceptions import ConfigError  # noqa: PLC0415

    if args.db is not None:
        path, flag = Path(args.db), "--db"
    else:
        path, flag = Path(args.data_dir) / DB_FILENAME, "--data-dir"
    if not path.is_file():
        raise ConfigError(f"no audit log at {path}", source="<argv>", field=flag)
    return path


def _load_report(args: argparse.Namespace, *, local: bool) -> VerifyReport:
    from cloud_hub._exceptions import AuditNotFoundError  # noqa: PLC0415
    from cloud_hub.audit import Anchor, default_anchor_path, verify  # noqa: PLC0415
    from sync._exceptions import ConfigError  # noqa: PLC0415

    path = _db_path(args)
    anchors: list[Path | Anchor] = []
    if local and default_anchor_path(path).exists():
        anchors.append(default_anchor_path(path))
    for extra in getattr(args, "anchor", []):
        if not Path(extra).is_file():
            raise ConfigError(f"no anchor file at {extra}", source="<argv>", field="--anchor")
        anchors.append(Path(extra))
    try:
        report = verify(path, anchors=anchors)
    except AuditNotFoundError as exc:
        raise ConfigError(str(exc), source="<argv>") from exc
    if local and not default_anchor_path(path).exists():
        warning = (
            f"no local anchor at {default_anchor_path(path)}: removal of the newest "
            "entries cannot be detected"
        )
        report = _with_warning(report, warning)
    return report


def _with_warning(report: VerifyReport, warning: str) -> VerifyReport:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(report, warnings=(*report.warnings, warning))


def _verify(args: argparse.Namespace) -> int:
    report = _load_report(args, local=not args.no_local_anchor)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if report.ok:
            print(
                f"audit log intact: {report.entries_checked} entries, head seq "
                f"{report.head_seq} ({report.head_hash[:16]}...), "
                f"{report.anchors_checked} anchor(s) checked"
            )
        else:
            print(
                f"audit log TAMPERED: first bad seq {report.first_bad_seq}: "
                f"{report.reason} ({report.message})"
            )
    return 0 if report.ok else 1


def _anchor(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from cloud_hub.audit import Anchor, write_anchor  # noqa: PLC0415

    report = _load_report(args, local=True)
    if not report.ok:
        print(
            f"audit log TAMPERED: first bad seq {report.first_bad_seq}: {report.reason} "
            f"({report.message}); no anchor exported",
            file=sys.stderr,
        )
        return 1
    anchor = Anchor(report.head_seq, report.head_hash, time.time_ns() // 1_000_000)
    if args.out is None:
        sys.stdout.write(anchor.to_json())
    else:
        write_anchor(args.out, anchor)
        print(f"anchor seq {anchor.seq} written to {args.out}")
    return 0
