"""End-to-end signed LWW entries: the hub's word survives any number of hops.

Envelopes are signed hop by hop (agent ↔ relay ↔ hub), so an agent receiving
desired state from its relay can verify the relay, not the hub. Desired state
is written rarely and matters most, so the hub signs each such entry itself:
the entry's value is ``{"v": value, "kid": key id, "sig": signature}`` where
the signature covers ``packb(["nc-entry/1", scope, key, ts, origin, value])``.
``ts`` is the entry's HLC timestamp, which is unique per origin, so a replayed
old entry keeps its old timestamp and loses to newer writes; a relay cannot
forge, alter or re-date one.

A signed scope has no tombstones: removal is a signed write of ``None``, so a
hop in the middle cannot delete what the hub wrote either.

:class:`EntryVerifier` plugs into :class:`~sync.protocol.SyncSession` as its
``validate`` hook: a DELTAS or SNAPSHOT message holding any entry of a signed
scope that fails verification is refused whole, before it changes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sync._exceptions import SignatureError
from sync.crdt import LwwMap
from sync.envelope import packb
from sync.keys import KeyRing, Signer
from sync.replica import Replica

__all__ = ["EntryVerifier", "sign_value", "signed_write", "unwrap", "verify_entry"]

_DOMAIN = "nc-entry/1"


def _signed_bytes(scope: str, key: str, ts: int, origin: str, value: Any) -> bytes:
    return packb([_DOMAIN, scope, key, ts, origin, value])


def sign_value(
    signer: Signer, scope: str, key: str, *, ts: int, origin: str, value: Any
) -> dict[str, Any]:
    """Wrap ``value`` with a signature binding it to its scope, key, time and origin."""
    sig = signer.sign(_signed_bytes(scope, key, ts, origin, value))
    return {"v": value, "kid": signer.key_id, "sig": sig}


def signed_write(replica: Replica, scope: str, key: str, value: Any, signer: Signer) -> LwwMap:
    """Write a signed entry into ``replica`` now; return the delta to send."""
    ts = replica.hlc.now()
    wrapped = sign_value(signer, scope, key, ts=ts, origin=replica.replica_id, value=value)
    return replica.scope(scope).set(key, wrapped, ts=ts, origin=replica.replica_id)


def unwrap(value: Any) -> Any:
    """The signed payload of a (verified) signed entry value."""
    return value["v"] if isinstance(value, dict) else None


def verify_entry(keyring: KeyRing, scope: str, entry: list[Any]) -> Any:
    """Check one wire entry ``[key, ts, origin, counter, deleted, value]``.

    Returns:
        The signed payload.

    Raises:
        SignatureError: a tombstone, a malformed wrapper, an unknown key or a
            bad signature.
    """
    key, ts, origin, _counter, deleted, value = entry
    if deleted:
        raise SignatureError(f"tombstone in signed scope {scope!r} (key {key!r})")
    if (
        not isinstance(value, dict)
        or value.keys() != {"v", "kid", "sig"}
        or not isinstance(value["kid"], str)
        or not isinstance(value["sig"], bytes)
    ):
        raise SignatureError(f"unsigned entry in signed scope {scope!r} (key {key!r})")
    keyring.verify(value["kid"], _signed_bytes(scope, key, ts, origin, value["v"]), value["sig"])
    return value["v"]


class EntryVerifier:
    """A ``validate`` hook: entries of scopes matching ``is_signed`` must verify.

    Args:
        keyring: the keys allowed to sign (the hub's).
        is_signed: which scopes are signed, e.g. ``lambda s: s.startswith("desired/")``.
    """

    def __init__(self, keyring: KeyRing, is_signed: Callable[[str], bool]) -> None:
        self.keyring = keyring
        self.is_signed = is_signed
        self.rejected = 0

    def __call__(self, scope: str, entries: list[list[Any]]) -> None:
        if not self.is_signed(scope):
            return
        try:
            for entry in entries:
                verify_entry(self.keyring, scope, entry)
        except SignatureError:
            self.rejected += 1
            raise
