"""Strict, bounded msgpack decoding shared by the envelope and body decoders.

Why this is safe against hostile input, cheaply:

* The size cap is checked before msgpack sees a byte (:class:`OversizeError`).
* msgpack's C unpacker checks every declared length (str, bin, array, map, ext)
  against the ``max_*_len`` arguments *when it reads the header*, so a map header
  claiming 2**32 entries or a bin32 claiming 4 GiB fails at once, before any
  allocation. Because the input is already capped, a declared length can never be
  satisfied beyond the cap either.
* ``max_ext_len=0`` makes the C unpacker refuse every ext type at header time,
  including the timestamp type -1 which would otherwise bypass ``ext_hook``.
  ``ext_hook`` raises as a second line of defence.
* The C unpacker is iterative with a fixed stack of 1024 containers; deeper input
  raises ``StackError`` (no Python recursion, no ``RecursionError``).
* ``strict_map_key=True`` rejects non-str/bytes map keys inside the C loop; the
  remaining checks (``bytes`` keys, the configured nesting depth) run in
  :func:`_check_tree`, a breadth-first walk that does the per-element work with
  C-level iterators (``map(type, chain.from_iterable(level))``), so a flat batch of
  500 deltas costs roughly one extra ``unpackb`` and never recurses. Small
  inputs (most protocol bodies: an ACK, one delta, one event) take a plain loop
  over the same levels instead, whose fixed cost is a fraction of the
  iterator set-up per level; it accepts exactly what :func:`_check_tree`
  accepts, and leaves the refusals (and their messages) to it.

Duplicate keys inside a body map are resolved by msgpack (last one wins) rather
than rejected: detecting them needs an ``object_pairs_hook`` that doubled decode
time on map-heavy bodies, and every tier decodes bodies with this same function,
so there is no parser differential to exploit. Envelopes themselves are checked
for canonical encoding, which does exclude duplicate keys there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import is_
from typing import Any, Final, NoReturn

import msgpack

from sync._exceptions import ConfigError, DecodeError, OversizeError

__all__ = ["DEFAULT_LIMITS", "BytesLike", "DecodeLimits", "packb", "unpackb_strict"]

BytesLike = bytes | bytearray | memoryview
"""What the decoders accept as input."""

# The C unpacker's fixed container stack (msgpack/unpack_template.h).
_MSGPACK_STACK_LIMIT: Final = 1024

_CONTAINERS: Final = frozenset({list, dict})
_STR_ONLY: Final = frozenset({str})


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Caps applied by every strict decode.

    Attributes:
        max_size: largest accepted input, in bytes (checked before parsing).
        max_depth: deepest accepted nesting of arrays/maps; a top-level container
            is depth 1, a scalar depth 0. At most 1023 (msgpack's C stack).
        max_items: largest number of elements in one array, or of entries in one
            map.
        max_str_len: longest accepted string, in UTF-8 bytes.
        max_bin_len: longest accepted binary value, in bytes.
    """

    max_size: int = 256 * 1024
    max_depth: int = 32
    max_items: int = 100_000
    max_str_len: int = 256 * 1024
    max_bin_len: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in ("max_size", "max_depth", "max_items", "max_str_len", "max_bin_len"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"must be a positive int, got {value!r}", field=name)
        if self.max_depth >= _MSGPACK_STACK_LIMIT:
            raise ConfigError(
                f"must be below msgpack's stack limit {_MSGPACK_STACK_LIMIT}",
                field="max_depth",
            )


DEFAULT_LIMITS: Final = DecodeLimits()
"""256 KiB, depth 32, 100,000 items per container, strings and bins up to 256 KiB."""


_SMALL_INPUT: Final = 2048
"""Inputs up to this many bytes are checked by :func:`_small_tree_ok` first."""

_local = threading.local()


def packb(obj: object) -> bytes:
    """Pack ``obj`` the way every NovaCron peer does (``use_bin_type=True``).

    Args:
        obj: msgpack-serialisable value (None, bool, int, float, str, bytes, list,
            tuple, dict with str keys).

    Returns:
        The msgpack bytes; str becomes msgpack str, bytes becomes msgpack bin.

    Raises:
        DecodeError: ``obj`` holds a value msgpack cannot represent (an int out of
            the 64-bit range, an unsupported type, nesting too deep).
    """
    # ``msgpack.packb`` is ``Packer(...).pack``: the same bytes. One packer per
    # thread saves making (and allocating the buffer of) a new one per call; it
    # is reset after every call, failed ones included.
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    try:
        return packer.pack(obj)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"cannot pack value: {exc}") from exc


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def _size_of(data: BytesLike) -> int:
    if type(data) is bytes:
        return len(data)
    if isinstance(data, memoryview):
        return data.nbytes
    if isinstance(data, bytes | bytearray):
        return len(data)
    raise DecodeError(f"expected bytes, got {type(data).__name__}")


def _raw_unpack(
    data: BytesLike,
    *,
    max_items: int,
    max_map_len: int,
    max_str_len: int,
    max_bin_len: int,
) -> object:
    """Run msgpack's C unpacker with caps, translating every failure."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_ext_len=0,
            max_str_len=max_str_len,
            max_bin_len=max_bin_len,
            max_array_len=max_items,
            max_map_len=max_map_len,
        )
    except DecodeError:
        raise
    except msgpack.ExtraData as exc:
        raise DecodeError("trailing bytes after the msgpack value") from exc
    except msgpack.StackError as exc:
        raise DecodeError("msgpack value nested too deeply") from exc
    except msgpack.FormatError as exc:
        raise DecodeError("invalid msgpack byte") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError(f"string is not valid UTF-8: {exc.reason}") from exc
    except (ValueError, TypeError, OverflowError, MemoryError, RecursionError) as exc:
        # ValueError: truncated input, a declared length over a cap, bad map key type.
        raise DecodeError(f"malformed msgpack: {exc}") from exc


def _children(lists: list[Any], dicts: list[Any]) -> Iterator[object]:
    if not dicts:
        return chain.from_iterable(lists)
    values = chain.from_iterable(map(dict.values, dicts))
    return chain(chain.from_iterable(lists), values) if lists else values


def _check_tree(obj: object, max_depth: int) -> None:
    """Reject nesting deeper than ``max_depth`` and non-str map keys.

    Breadth-first, one level at a time, with the per-element work done by C-level
    iterators (``map``, ``chain``, ``compress``): no Python bytecode runs per
    scalar, and a level made only of scalars is scanned once without being
    materialised.
    """
    if type(obj) is list:
        lists: list[Any] = [obj]
        dicts: list[Any] = []
    elif type(obj) is dict:
        lists, dicts = [], [obj]
    else:
        return
    depth = 1
    while True:
        if dicts and not _STR_ONLY.issuperset(map(type, chain.from_iterable(dicts))):
            raise DecodeError("map keys must be strings")
        types = set(map(type, _children(lists, dicts)))
        if _CONTAINERS.isdisjoint(types):
            return
        depth += 1
        if depth > max_depth:
            raise DecodeError(f"msgpack value nested deeper than {max_depth}")
        children = list(_children(lists, dicts))
        if len(types) == 1:
            lists, dicts = (children, []) if list in types else ([], children)
            continue
        child_types = list(map(type, children))
        lists = (
            list(compress(children, map(is_, child_types, repeat(list)))) if list in types else []
        )
        dicts = (
            list(compress(children, map(is_, child_types, repeat(dict)))) if dict in types else []
        )


def _small_tree_ok(obj: object, max_depth: int) -> bool:
    """Whether :func:`_check_tree` would accept ``obj``: the same levels, plain loops.

    For small values, where setting up :func:`_check_tree`'s iterators costs
    more than visiting each element. ``False`` means "refused": the caller
    then runs :func:`_check_tree` for the error.
    """
    t = type(obj)
    if t is not list and t is not dict:
        return True
    level: list[Any] = [obj]
    depth = 1
    while level:
        if depth > max_depth:
            return False
        below: list[Any] = []
        for c in level:
            if type(c) is dict:
                for k, v in c.items():
                    if type(k) is not str:
                        return False
                    t = type(v)
                    if t is list or t is dict:
                        below.append(v)
            else:
                for v in c:
                    t = type(v)
                    if t is list or t is dict:
                        below.append(v)
        level = below
        depth += 1
    return True


def unpackb_strict(data: BytesLike, *, limits: DecodeLimits = DEFAULT_LIMITS) -> object:
    """Decode one msgpack value from untrusted bytes, enforcing ``limits``.

    Accepted values are None, bool, int, float, str, bytes, list and dict with
    str keys. Ext types (including timestamps), non-str map keys, trailing
    bytes, invalid UTF-8 and anything beyond the caps are refused.

    Args:
        data: the complete msgpack value, nothing before or after it.
        limits: caps to enforce; the size cap is checked before parsing.

    Returns:
        The decoded value (arrays as lists).

    Raises:
        OversizeError: ``data`` is larger than ``limits.max_size``.
        DecodeError: anything else wrong with ``data``; never a raw msgpack,
            ``ValueError``, ``RecursionError`` or ``MemoryError``.
    """
    size = _size_of(data)
    if size > limits.max_size:
        raise OversizeError(size, limits.max_size)
    obj = _raw_unpack(
        data,
        max_items=limits.max_items,
        max_map_len=limits.max_items,
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
    )
    if size > _SMALL_INPUT or not _small_tree_ok(obj, limits.max_depth):
        _check_tree(obj, limits.max_depth)
    return obj
