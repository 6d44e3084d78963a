"""Relay ↔ hub store-and-forward messages: ``BATCH`` and ``BATCH_ACK``.

A relay forwards what its devices sent — their own signed envelopes, byte for
byte — in batches it signs itself; the hub checks the relay's signature on the
batch and each device's signature on its envelope, so nothing is trusted on
the relay's word alone. The hub answers with ``BATCH_ACK`` naming the outbox
ids it has durably ingested; only then does the relay delete them.

``BATCH`` body (columnar, so a batch of 500 costs one list per field)::

    {"r": relay id, "ep": relay epoch, "ids": [int], "k": [kind], "d": [device],
     "p": [bytes]}

``kind`` is ``delta`` | ``event`` | ``metric`` (device envelopes), ``presence``
or ``agg`` (relay-made reports, msgpack maps, covered by the batch signature).

``BATCH_ACK`` body: ``{"r": relay id, "ids": [[lo, hi], ...]}`` (inclusive
ranges). Both are pure functions over bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sync._exceptions import DecodeError, ProtocolError
from sync.envelope import (
    Envelope,
    decode_envelope,
    decode_envelope_unverified,
    encode_envelope,
    packb,
    verify_envelope,
)
from sync.keys import KeyRing, Signer

__all__ = [
    "BATCH",
    "BATCH_ACK",
    "ITEM_KINDS",
    "Batch",
    "BatchItem",
    "decode_batch",
    "decode_batch_ack",
    "encode_batch",
    "encode_batch_ack",
    "id_ranges",
    "open_device_envelope",
    "verify_batch",
]

BATCH = "BATCH"
BATCH_ACK = "BATCH_ACK"
ITEM_KINDS = frozenset(("delta", "event", "metric", "presence", "agg"))
_MAX_ITEMS = 10_000


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One forwarded item: an outbox id, its device, kind and payload."""

    id: int
    device: str
    kind: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    """A verified ``BATCH``."""

    envelope: Envelope
    relay: str
    epoch: int
    items: tuple[BatchItem, ...]


def encode_batch(
    signer: Signer, *, src: str, seq: int, ts: int, epoch: int, items: Sequence[BatchItem]
) -> bytes:
    """Sign a batch of items as relay ``src``."""
    body = packb(
        {
            "r": src,
            "ep": epoch,
            "ids": [i.id for i in items],
            "k": [i.kind for i in items],
            "d": [i.device for i in items],
            "p": [i.payload for i in items],
        }
    )
    return encode_envelope(BATCH, src, seq, ts, body, signer)


def decode_batch(data: bytes, relay_keys: KeyRing) -> Batch:
    """Verify and decode a ``BATCH``.

    Raises:
        WireError: bad bytes or signature.
        ProtocolError: not a batch, or a malformed body.
    """
    return verify_batch(decode_envelope_unverified(data), relay_keys)


def verify_batch(env: Envelope, relay_keys: KeyRing) -> Batch:
    """:func:`decode_batch` of an envelope already decoded (unverified) by the caller.

    The signature is checked here, before the body is decoded.

    Raises:
        SignatureError: unknown key or bad signature.
        ProtocolError: not a batch, or a malformed body.
    """
    verify_envelope(env, relay_keys)
    if env.type != BATCH:
        raise ProtocolError(f"expected {BATCH}, got {env.type!r}")
    body = env.decode_body()
    if type(body) is not dict or body.keys() != {"r", "ep", "ids", "k", "d", "p"}:
        raise ProtocolError("BATCH body must be a map with keys r, ep, ids, k, d, p")
    ids, kinds, devices, payloads = body["ids"], body["k"], body["d"], body["p"]
    columns = (ids, kinds, devices, payloads)
    if any(type(c) is not list for c in columns) or len({len(c) for c in columns}) != 1:
        raise ProtocolError("BATCH columns must be lists of one length")
    if len(ids) > _MAX_ITEMS or body["r"] != env.src or type(body["ep"]) is not int:
        raise ProtocolError("BATCH too large, or its relay id or epoch is wrong")
    items: list[BatchItem] = []
    for i, k, d, p in zip(ids, kinds, devices, payloads, strict=True):
        if type(i) is not int or k not in ITEM_KINDS or type(d) is not str or type(p) is not bytes:
            raise ProtocolError("BATCH item has the wrong types")
        items.append(BatchItem(i, d, k, p))
    return Batch(env, env.src, body["ep"], tuple(items))


def id_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Compress ids into sorted inclusive ``[lo, hi]`` ranges."""
    out: list[list[int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] + 1 == i:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def encode_batch_ack(
    signer: Signer, *, src: str, seq: int, ts: int, relay: str, ids: Iterable[int]
) -> bytes:
    """Sign an acknowledgement of outbox ``ids`` for ``relay``."""
    body = packb({"r": relay, "ids": id_ranges(ids)})
    return encode_envelope(BATCH_ACK, src, seq, ts, body, signer)


def decode_batch_ack(env: Envelope) -> tuple[str, list[int]]:
    """Decode an already verified ``BATCH_ACK``: ``(relay id, ids)``.

    Raises:
        ProtocolError: a malformed body or more than 1,000,000 ids.
    """
    body: Any = env.decode_body()
    if type(body) is not dict or body.keys() != {"r", "ids"} or type(body["ids"]) is not list:
        raise ProtocolError("BATCH_ACK body must be a map with keys r, ids")
    ids: list[int] = []
    total = 0
    for rng in body["ids"]:
        if (
            type(rng) is not list
            or len(rng) != 2
            or type(rng[0]) is not int
            or type(rng[1]) is not int
            or not 0 <= rng[0] <= rng[1]
        ):
            raise ProtocolError("BATCH_ACK ranges must be [lo, hi] with 0 <= lo <= hi")
        total += rng[1] - rng[0] + 1
        if total > 1_000_000:  # checked before the range is materialised
            raise ProtocolError("BATCH_ACK names too many ids")
        ids.extend(range(rng[0], rng[1] + 1))
    relay = body["r"]
    if type(relay) is not str:
        raise ProtocolError("BATCH_ACK relay id must be a string")
    return relay, ids


def open_device_envelope(payload: bytes, device: str, device_keys: KeyRing) -> Envelope:
    """Verify a forwarded device envelope end to end (the hub's check).

    Raises:
        WireError: bad bytes or a signature that is not the device's.
        DecodeError: the envelope claims another device.
    """
    env = decode_envelope(payload, device_keys)
    if env.src != device:
        raise DecodeError(f"envelope from {env.src!r} forwarded as device {device!r}")
    return env
