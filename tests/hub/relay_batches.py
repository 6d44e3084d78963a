"""Relay BATCHes as the hub receives them, for the ingest and reconciler tests."""

from __future__ import annotations

from collections.abc import Iterable

from sync.keys import KeyRing, Signer
from sync.relaying import BatchItem, encode_batch

RELAY = "relay-1"
REGION = "north"


def ring(*signers: Signer) -> KeyRing:
    """A key ring holding the public keys of ``signers``."""
    keys = KeyRing()
    for signer in signers:
        keys.add(signer.public_key_bytes, signer.key_id)
    return keys


def relay_batch(
    relay: Signer, seq: int, items: Iterable[tuple[int, str, str, bytes]], *, src: str = RELAY
) -> bytes:
    """A BATCH signed by ``relay`` (epoch 1) of ``(id, device, kind, payload)`` items."""
    return encode_batch(
        relay,
        src=src,
        seq=seq,
        ts=1,
        epoch=1,
        items=[BatchItem(i, device, kind, payload) for i, device, kind, payload in items],
    )
