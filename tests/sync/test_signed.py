"""End-to-end signed entries: only the hub's own writes pass a signed scope."""

from __future__ import annotations

import pytest

from sync._exceptions import SignatureError
from sync.crdt import LwwMap
from sync.hlc import HybridLogicalClock
from sync.keys import KeyRing, Signer
from sync.protocol import SyncSession
from sync.replica import Replica
from sync.signed import EntryVerifier, sign_value, signed_write, unwrap, verify_entry
from sync.testing import ManualClock

SCOPE = "desired/gw-1"


def _replica(name: str, clock: ManualClock) -> Replica:
    return Replica(name, HybridLogicalClock(clock))


def test_signed_write_verifies_and_unwraps() -> None:
    hub = Signer.generate()
    keys = KeyRing()
    keys.add(hub.public_key_bytes)
    replica = _replica("hub", ManualClock())
    delta = signed_write(replica, SCOPE, "web", {"image": "a"}, hub)
    (entry,) = delta.entries_wire()
    assert verify_entry(keys, SCOPE, entry) == {"image": "a"}
    assert unwrap(entry[5]) == {"image": "a"}


@pytest.mark.parametrize(
    "tamper",
    ["value", "ts", "key", "scope", "origin", "tombstone", "unsigned", "other-key"],
)
def test_any_tampering_is_refused(tamper: str) -> None:
    hub, mallory = Signer.generate(), Signer.generate()
    keys = KeyRing()
    keys.add(hub.public_key_bytes)
    replica = _replica("hub", ManualClock())
    (entry,) = signed_write(replica, SCOPE, "web", {"image": "a"}, hub).entries_wire()
    key, ts, origin, counter, deleted, value = entry
    scope = SCOPE
    match tamper:
        case "value":
            value = {**value, "v": {"image": "evil"}}
        case "ts":
            ts += 1
        case "key":
            key = "db"
        case "scope":
            scope = "desired/gw-2"
        case "origin":
            origin = "relay"
        case "tombstone":
            deleted, value = True, None
        case "unsigned":
            value = {"image": "a"}
        case "other-key":
            value = sign_value(mallory, SCOPE, key, ts=ts, origin=origin, value={"image": "a"})
            value["kid"] = hub.key_id
    with pytest.raises(SignatureError):
        verify_entry(keys, scope, [key, ts, origin, counter, deleted, value])


def test_session_refuses_a_forged_desired_batch_whole() -> None:
    """A relay forwarding desired state cannot slip in an entry of its own."""
    clock = ManualClock()
    hub, relay, agent = Signer.generate(), Signer.generate(), Signer.generate()
    hub_keys = KeyRing()
    hub_keys.add(hub.public_key_bytes)
    relay_keys, agent_keys = KeyRing(), KeyRing()
    relay_keys.add(relay.public_key_bytes)
    agent_keys.add(agent.public_key_bytes)
    relay_replica = _replica("relay", clock)
    agent_replica = _replica("gw-1", clock)
    verifier = EntryVerifier(hub_keys, lambda s: s.startswith("desired/"))
    at_relay = SyncSession(relay_replica, "gw-1", relay, agent_keys, clock, scopes=[SCOPE])
    at_agent = SyncSession(
        agent_replica, "relay", agent, relay_keys, clock, scopes=[SCOPE], validate=verifier
    )
    # Handshake.
    pending = at_agent.start()
    for _ in range(4):
        replies = [r for m in pending for r in at_relay.receive(m)]
        pending = [r for m in replies for r in at_agent.receive(m)]
    good = LwwMap()
    good.merge_delta(signed_write(relay_replica, SCOPE, "web", {"image": "a"}, hub))
    forged = relay_replica.set(
        SCOPE, "db", {"v": {"image": "evil"}, "kid": hub.key_id, "sig": b"\0" * 64}
    )
    for data in at_relay.local_update(SCOPE, forged):
        with pytest.raises(SignatureError):
            at_agent.receive(data)
    assert agent_replica.scope(SCOPE).get("db") is None
    for data in at_relay.local_update(SCOPE, good):
        at_agent.receive(data)
    assert unwrap(agent_replica.scope(SCOPE).get("web")) == {"image": "a"}
    assert verifier.rejected >= 1
