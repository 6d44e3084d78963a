"""The audit chain itself, free of SQLite: entries, canonical encoding, hashes, anchors.

See :mod:`cloud_hub.audit` for the format and the guarantees.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Self, TypeGuard

from cloud_hub._exceptions import AuditError, AuditNotFoundError

__all__ = [
    "GENESIS_HASH",
    "MAX_DETAIL_BYTES",
    "MAX_TEXT_CHARS",
    "Anchor",
    "AuditEntry",
    "canonical_bytes",
    "canonical_detail",
    "clean_text",
    "default_anchor_path",
    "entry_hash",
    "hashed_seq",
    "is_hash",
    "read_anchor",
    "write_anchor",
]

GENESIS_HASH: Final = "0" * 64
"""``prev_hash`` of the first entry."""
MAX_DETAIL_BYTES: Final = 4096
"""Largest canonical ``detail`` stored; a larger one is replaced by a summary."""
MAX_TEXT_CHARS: Final = 1024
"""Longest ``actor``, ``role``, ``action`` or ``target`` stored; longer is cut."""

_HEX: Final = frozenset("0123456789abcdef")


# -- the chain (pure) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of the audit log.

    Attributes:
        seq: position in the chain, from 1.
        ts_ms: wall-clock time of the append, Unix milliseconds.
        actor: who made the call (the API token id).
        role: the actor's role when the call was made.
        action: method and route, e.g. ``"POST /api/v1/deployments"``.
        target: what was acted on, e.g. ``"deployment/web"`` (``""`` when none).
        outcome: the HTTP status code returned.
        detail: canonical JSON text of the call's details.
        prev_hash: the previous entry's hash (:data:`GENESIS_HASH` for seq 1).
        hash: sha256 hex of :func:`canonical_bytes` of the other fields.
    """

    seq: int
    ts_ms: int
    actor: str
    role: str
    action: str
    target: str
    outcome: int
    detail: str
    prev_hash: str
    hash: str

    def detail_obj(self) -> Any:
        """Return :attr:`detail` parsed from JSON."""
        return json.loads(self.detail)

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as a JSON-ready dict (``detail`` parsed)."""
        d = asdict(self)
        d["detail"] = self.detail_obj()
        return d

    def computed_hash(self) -> str:
        """Return the hash the entry's fields (all but :attr:`hash`) call for."""
        return entry_hash(
            seq=self.seq,
            ts_ms=self.ts_ms,
            actor=self.actor,
            role=self.role,
            action=self.action,
            target=self.target,
            outcome=self.outcome,
            detail=self.detail,
            prev_hash=self.prev_hash,
        )


def canonical_bytes(
    *,
    seq: int,
    ts_ms: int,
    actor: str,
    role: str,
    action: str,
    target: str,
    outcome: int,
    detail: str,
    prev_hash: str,
) -> bytes:
    """Return the canonical encoding that an entry's hash covers.

    JSON of the nine fields with sorted keys, no whitespace and only ASCII
    characters (non-ASCII as ``\\uXXXX`` escapes), encoded as ASCII. ``detail``
    is the stored JSON text, embedded as a string.

    Raises:
        AuditError: a value is not JSON-encodable.
    """
    fields = {
        "action": action,
        "actor": actor,
        "detail": detail,
        "outcome": outcome,
        "prev_hash": prev_hash,
        "role": role,
        "seq": seq,
        "target": target,
        "ts_ms": ts_ms,
    }
    try:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"entry cannot be encoded: {exc}") from exc
    return text.encode("ascii")


def entry_hash(
    *,
    seq: int,
    ts_ms: int,
    actor: str,
    role: str,
    action: str,
    target: str,
    outcome: int,
    detail: str,
    prev_hash: str,
) -> str:
    """Return ``sha256(canonical_bytes(...)).hexdigest()`` for these fields."""
    return hashlib.sha256(
        canonical_bytes(
            seq=seq,
            ts_ms=ts_ms,
            actor=actor,
            role=role,
            action=action,
            target=target,
            outcome=outcome,
            detail=detail,
            prev_hash=prev_hash,
        )
    ).hexdigest()


def hashed_seq(entry: AuditEntry, candidates: range) -> int | None:
    """Return the seq (among ``candidates``) the entry's hash was computed with, if any.

    Only the seq changes between candidates, so the bytes before it are hashed once
    and each candidate costs one short ``update`` (a few hundred ns).
    """
    if entry.computed_hash() == entry.hash:
        return entry.seq
    encoded = canonical_bytes(
        seq=0,
        ts_ms=entry.ts_ms,
        actor=entry.actor,
        role=entry.role,
        action=entry.action,
        target=entry.target,
        outcome=entry.outcome,
        detail=entry.detail,
        prev_hash=entry.prev_hash,
    )
    # Keys are sorted, so "seq" is followed by "target"; quotes inside string
    # values are escaped, so this marker cannot occur inside one.
    marker = b',"seq":0,"target":'
    cut = encoded.index(marker) + len(b',"seq":')
    head = hashlib.sha256(encoded[:cut])
    tail = encoded[cut + 1 :]
    for candidate in candidates:
        h = head.copy()
        h.update(str(candidate).encode("ascii"))
        h.update(tail)
        if h.hexdigest() == entry.hash:
            return candidate
    return None


def canonical_detail(detail: object) -> str:
    if detail is None:
        return "{}"
    if not isinstance(detail, Mapping):
        raise AuditError(f"detail must be a mapping, not {type(detail).__name__}")
    try:
        text = json.dumps(dict(detail), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"detail is not JSON-encodable: {exc}") from exc
    if len(text) <= MAX_DETAIL_BYTES:  # ensure_ascii: characters == bytes
        return text
    # An audit entry must be written even when the caller's detail is huge: keep a
    # fingerprint of it rather than refusing the entry.
    summary = {
        "truncated": True,
        "bytes": len(text),
        "sha256": hashlib.sha256(text.encode("ascii")).hexdigest(),
    }
    return json.dumps(summary, sort_keys=True, separators=(",", ":"))


def clean_text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise AuditError(f"{what} must be str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AuditError(f"{what} is not valid Unicode text: {exc}") from exc
    if len(value) > MAX_TEXT_CHARS:
        extra = len(value) - MAX_TEXT_CHARS
        return f"{value[:MAX_TEXT_CHARS]}...[+{extra} chars]"
    return value


# -- anchor ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Anchor:
    """A chain head recorded elsewhere than the chain: ``(seq, hash)``.

    Attributes:
        seq: the head's seq (0 for an empty log).
        hash: the head's hash (:data:`GENESIS_HASH` for an empty log).
        ts_ms: when the anchor was taken, Unix milliseconds (informative only).
    """

    seq: int
    hash: str
    ts_ms: int = 0

    def to_json(self) -> str:
        """Return the anchor file's content (one JSON line)."""
        return json.dumps({"seq": self.seq, "hash": self.hash, "ts_ms": self.ts_ms}) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Parse an anchor file's content.

        Raises:
            ValueError: not an anchor (``TypeError`` when not a JSON object).
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("an anchor is a JSON object")
        seq, hash_, ts_ms = data.get("seq"), data.get("hash"), data.get("ts_ms", 0)
        if type(seq) is not int or seq < 0:
            raise ValueError("anchor seq must be an integer >= 0")
        if not is_hash(hash_):
            raise ValueError("anchor hash must be 64 lowercase hex digits")
        if type(ts_ms) is not int:
            raise ValueError("anchor ts_ms must be an integer")
        return cls(seq, hash_, ts_ms)


def is_hash(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def default_anchor_path(db_path: str | Path) -> Path:
    """Return where the local anchor of a database lives (``audit.db`` -> ``audit.anchor``)."""
    return Path(db_path).with_suffix(".anchor")


def read_anchor(path: str | Path) -> Anchor:
    """Read an anchor file.

    Raises:
        AuditNotFoundError: the file does not exist.
        AuditError: it cannot be read or is not an anchor.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise AuditNotFoundError("no such anchor file", path=str(p)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read anchor: {exc}", path=str(p)) from exc
    try:
        return Anchor.from_json(text)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"not an audit anchor: {exc}", path=str(p)) from exc


def write_anchor(path: str | Path, anchor: Anchor, *, durable: bool = True) -> None:
    """Write an anchor file atomically (temporary file, fsync, rename, fsync of the dir).

    Raises:
        AuditError: the file cannot be written.
    """
    p = Path(path)
    tmp = p.with_name(f"{p.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(anchor.to_json())
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        tmp.replace(p)
        if durable:
            dir_fd = os.open(p.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise AuditError(f"cannot write anchor: {exc}", path=str(p)) from exc
