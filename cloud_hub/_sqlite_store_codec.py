"""Encoding for the SQLite hub store: canonical JSON, event bodies, page cursors.

- JSON columns hold canonical JSON (:func:`dumps`: sorted keys, no spaces,
  ASCII, no NaN), so equal documents are equal text.
- Event bodies are JSON too; ``bytes`` inside a body (msgpack may carry them)
  are stored as standard base64 text and read back as ``str``. Anything else
  that is not JSON (sets, objects, NaN, non-string keys) is refused with
  :class:`~cloud_hub.store.StoreError` and nothing of the batch is stored.
- Cursors are base64url of ``[kind, query fingerprint, last key]``; a cursor of
  another listing or of another filter is refused with
  :class:`~cloud_hub.store.CursorError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from cloud_hub.store import MAX_PAGE_LIMIT, CursorError, Page, StoreError

__all__ = [
    "check_limit",
    "decode_cursor",
    "dumps",
    "dumps_body",
    "encode_cursor",
    "labels_map",
    "page",
]

_T = TypeVar("_T")

_MAX_CURSOR_LEN: Final = 2048


def dumps(value: object) -> str:
    """Canonical JSON of ``value``.

    Raises:
        StoreError: ``value`` is not JSON (bytes included: see :func:`dumps_body`).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"not storable as JSON: {exc}") from exc


def _bytes_as_base64(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps_body(value: object) -> str:
    """Canonical JSON of an event body, ``bytes`` as base64 text.

    Raises:
        StoreError: the body holds something else that is not JSON.
    """
    try:
        return json.dumps(
            value,
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
            default=_bytes_as_base64,
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(f"event body not storable as JSON: {exc}") from exc


def labels_map(labels: Mapping[str, str], what: str = "labels") -> dict[str, str]:
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise StoreError(f"{what} must map strings to strings")
    return dict(labels)


def check_limit(limit: int) -> int:
    """Return ``limit`` if it is a page size this store accepts.

    Raises:
        ValueError: not an int in ``1..MAX_PAGE_LIMIT`` (the caller's bug: an API
            validates its query parameters before calling the store).
    """
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE_LIMIT:
        raise ValueError(f"page limit must be an int in 1..{MAX_PAGE_LIMIT}, not {limit!r:.40}")
    return limit


def _fingerprint(kind: str, query: object) -> str:
    return hashlib.sha256(dumps([kind, query]).encode()).hexdigest()[:16]


def encode_cursor(kind: str, query: object, last_key: str) -> str:
    """An opaque cursor continuing after ``last_key`` in the listing ``kind``/``query``."""
    raw = dumps([kind, _fingerprint(kind, query), last_key]).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str | None, kind: str, query: object) -> str | None:
    """The last key a cursor names, or None for no cursor.

    Raises:
        CursorError: not a cursor of this listing with these filters.
    """
    if cursor is None:
        return None
    if not isinstance(cursor, str) or not cursor or len(cursor) > _MAX_CURSOR_LEN:
        raise CursorError("invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parsed = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise CursorError("invalid cursor") from exc
    if (
        not isinstance(parsed, list)
        or len(parsed) != 3
        or parsed[0] != kind
        or not isinstance(parsed[2], str)
    ):
        raise CursorError("invalid cursor")
    if parsed[1] != _fingerprint(kind, query):
        raise CursorError("cursor belongs to another query")
    return parsed[2]


def page(
    rows: list[Any],
    limit: int,
    *,
    make: Callable[[Any], _T],
    key: Callable[[_T], str],
    kind: str,
    query: object,
) -> Page[_T]:
    items = tuple(make(r) for r in rows[:limit])
    more = len(rows) > limit
    return Page(items, encode_cursor(kind, query, key(items[-1])) if more else None)
