"""Splitting outgoing LWW batches and causal contexts so every envelope fits its cap.

Pure helpers for :mod:`sync.protocol`. A batch is planned as a list of
:class:`Chunk` (entries, extra context dots, and whether it is the last one);
:func:`pack_chunks` packs each and halves any whose body comes out larger than
the budget, so the cut depends on the bytes the entries actually encode to, not
only on how many there are (500 entries of 1 KiB values already pass the
256 KiB envelope cap).

Context dots are cut up front by :func:`split_vector`, with a conservative
estimate of their packed size and a bound on out-of-order counters per piece
(:meth:`~sync.dots.VersionVector.from_wire` refuses more than 100,000 in one
vector), so a fragmented vector never needs a second cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from sync.dots import VersionVector

__all__ = ["Chunk", "entry_dots", "pack_chunks", "plan_chunks", "split_vector"]

# Upper bounds of packed sizes: an int is at most 9 bytes, a container header 5,
# a str header 5. Overestimating only makes pieces smaller.
_RANGE_BYTES = 1 + 9 + 9  # [lo, hi]
_ORIGIN_BYTES = 5 + 1 + 9 + 5  # str header, [m, [...]] wrapper

MAX_PIECE_COUNTERS = 50_000
"""Most out-of-order counters in one piece of :func:`split_vector` (half the
receiver's cap, leaving room for the dots of the entries it rides with)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One planned message: wire entries, extra context dots, and whether it is last.

    Attributes:
        entries: wire-form LWW entries (see :meth:`~sync.crdt.LwwMap.entries_wire`).
        ctx: dots the message covers besides those of ``entries``, or ``None``.
        last: whether this message carries what belongs to the end of the
            batch (a snapshot's horizon); kept by the right half of a split.
    """

    entries: list[list[Any]]
    ctx: VersionVector | None = None
    last: bool = False


def entry_dots(entries: Iterable[list[Any]]) -> VersionVector:
    """The dots of wire-form entries, as a vector."""
    out = VersionVector()
    add = out.add_counter
    for e in entries:
        add(e[2], e[3])
    return out


def split_vector(
    vv: VersionVector, *, max_bytes: int, max_counters: int = MAX_PIECE_COUNTERS
) -> list[VersionVector]:
    """Cut ``vv`` into pieces whose union is ``vv``, each small on the wire.

    Args:
        vv: the vector to cut.
        max_bytes: bound on the packed size of each piece's wire form
            (estimated from above).
        max_counters: bound on the out-of-order counters of each piece.

    Returns:
        The pieces, none empty; ``[]`` for an empty vector.
    """
    pieces: list[VersionVector] = []
    cur = VersionVector()
    cur_bytes = cur_counters = 0
    cur_origins: set[str] = set()

    def room(nbytes: int, counters: int) -> None:
        nonlocal cur, cur_bytes, cur_counters
        if cur and (cur_bytes + nbytes > max_bytes or cur_counters + counters > max_counters):
            pieces.append(cur)
            cur = VersionVector()
            cur_bytes = cur_counters = 0
            cur_origins.clear()

    for origin, item in vv.to_wire().items():
        origin_bytes = _ORIGIN_BYTES + 4 * len(origin)
        ranges: list[list[int]] = []
        if isinstance(item, int):
            prefix = item
        else:
            prefix, ranges = cast("tuple[int, list[list[int]]]", tuple(item))
        if prefix:
            room(origin_bytes, 0)
            cur.add_range(origin, 1, prefix)
            cur_bytes += origin_bytes
            cur_origins.add(origin)
        for first, hi in ranges:
            # A range longer than a piece may hold is cut into several.
            for lo in range(first, hi + 1, max_counters):
                top = min(hi, lo + max_counters - 1)
                fresh = origin not in cur_origins
                room(_RANGE_BYTES + (origin_bytes if fresh else 0), top - lo + 1)
                if origin not in cur_origins:
                    cur_bytes += origin_bytes
                    cur_origins.add(origin)
                cur.add_range(origin, lo, top)
                cur_bytes += _RANGE_BYTES
                cur_counters += top - lo + 1
    if cur:
        pieces.append(cur)
    return pieces


def plan_chunks(
    entries: list[list[Any]],
    ctx_pieces: list[VersionVector],
    max_batch: int,
    *,
    tail: bool = False,
) -> list[Chunk]:
    """Plan the messages of a batch: ``max_batch`` entries each, then the context.

    A single context piece rides with the last entries (as a one-message batch
    always did); more pieces follow as messages of their own.

    Args:
        entries: every wire entry to send.
        ctx_pieces: the extra context, already cut by :func:`split_vector`.
        max_batch: most entries per message.
        tail: the batch ends with data of its own (a snapshot's horizon): flag
            the last chunk ``last``, and plan one even if there is nothing else.

    Returns:
        The chunks; maybe ``[]`` unless ``tail``.
    """
    chunks = [Chunk(entries[i : i + max_batch]) for i in range(0, len(entries), max_batch)]
    if len(ctx_pieces) == 1 and chunks:
        chunks[-1] = Chunk(chunks[-1].entries, ctx_pieces[0])
    else:
        chunks += [Chunk([], piece) for piece in ctx_pieces]
    if tail:
        last = chunks.pop() if chunks else Chunk([])
        chunks.append(Chunk(last.entries, last.ctx, last=True))
    return chunks


def pack_chunks(
    chunks: list[Chunk], build: Callable[[Chunk], bytes], max_bytes: int
) -> list[tuple[Chunk, bytes]]:
    """Pack every chunk with ``build``, halving those whose body exceeds ``max_bytes``.

    The left half of a split gets entries only; the right half keeps the
    context and the ``last`` flag, so extra dots still travel after (or with)
    the entries they were planned with. A chunk that cannot be cut further (one
    entry and nothing else) is returned as it is, too large: the envelope
    encoder has the final word on the hard cap.

    Returns:
        ``(chunk, body)`` pairs in sending order.
    """
    out: list[tuple[Chunk, bytes]] = []
    todo = list(reversed(chunks))
    while todo:
        chunk = todo.pop()
        body = build(chunk)
        n = len(chunk.entries)
        if len(body) <= max_bytes or (n <= 1 and not (n and (chunk.ctx or chunk.last))):
            out.append((chunk, body))
            continue
        half = n // 2 if n > 1 else n
        left = Chunk(chunk.entries[:half])
        right = Chunk(chunk.entries[half:], chunk.ctx, chunk.last)
        todo += [right, left]
    return out
