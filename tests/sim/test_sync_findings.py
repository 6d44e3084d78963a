"""Protocol defects the deterministic simulator found, kept as regression tests.

* A late ACK of a previous session must not drop the new session's message of
  the same seq (ACKs count only for the session they name).
* A peer that reconnects with a new session must confirm our HELLO again before
  we count on it knowing our vector (so a lost HELLO answer is retried).
"""

from __future__ import annotations

from sync.hlc import HybridLogicalClock
from sync.keys import KeyRing, Signer
from sync.protocol import Replica, SyncSession
from sync.testing import ManualClock

DEV = Signer.generate("dev")
RELAY = Signer.generate("relay")


def _ring(s: Signer) -> KeyRing:
    ring = KeyRing()
    ring.add(s.public_key_bytes, s.key_id)
    return ring


def test_late_ack_of_old_session_does_not_drop_new_message() -> None:
    clock = ManualClock()
    device = Replica("dev", HybridLogicalClock(clock))
    relay = Replica("relay", HybridLogicalClock(clock))
    relay_side = SyncSession(relay, "dev", RELAY, _ring(DEV), clock, scopes=[], session_id="r")

    old = SyncSession(
        device, "relay", DEV, _ring(RELAY), clock, scopes=[], streams=["ev"], session_id="d1"
    )
    old.start()  # HELLO seq 1 (lost)
    device.stream("ev").append({"n": 1})
    [events_1] = old.tick()  # EVENTS seq 2
    late_ack = relay_side.receive(events_1)  # the relay stores event 1 and ACKs seq 2 of "d1"

    # The link drops before that ACK arrives; the device reconnects with a new session.
    new = SyncSession(
        device, "relay", DEV, _ring(RELAY), clock, scopes=[], streams=["ev"], session_id="d2"
    )
    new.start()  # HELLO seq 1 (lost)
    device.stream("ev").append({"n": 2})
    new.tick()  # EVENTS seq 2 of "d2": events 1 and 2, lost on the way
    for data in late_ack:
        new.receive(data)  # the late ACK of "d1" seq 2
    assert new.unacked == 1, "the new session's EVENTS seq 2 was dropped by an ACK for d1"


def test_lost_hello_answer_after_peer_reconnect_is_recovered() -> None:
    clock = ManualClock()
    device = Replica("dev", HybridLogicalClock(clock))
    relay = Replica("relay", HybridLogicalClock(clock))
    scope = "device/dev"
    for r in (device, relay):
        r.scope(scope)
    r_side = SyncSession(relay, "dev", RELAY, _ring(DEV), clock, scopes=[scope], session_id="r")

    def exchange(d_side: SyncSession, first: list[bytes], rounds: int = 50) -> None:
        to_relay, to_device = list(first), []
        for _ in range(rounds):
            for data in to_relay:
                to_device += r_side.receive(data)
            to_relay = []
            for data in to_device:
                to_relay += d_side.receive(data)
            to_device = []
            clock.advance(2_000)
            to_relay += d_side.tick()
            to_device += r_side.tick()

    d1 = SyncSession(device, "relay", DEV, _ring(RELAY), clock, scopes=[scope], session_id="d1")
    exchange(d1, d1.start())
    assert d1.hello_confirmed and r_side.hello_confirmed
    # Offline: the device writes; then it reconnects with a new session.
    device.set(scope, "status", 3)
    d2 = SyncSession(device, "relay", DEV, _ring(RELAY), clock, scopes=[scope], session_id="d2")
    [hello] = d2.start()
    answer = r_side.receive(hello)  # [HELLO (reply), ACK of d2's HELLO]
    assert len(answer) == 2
    d2.receive(answer[1])  # the HELLO answer is lost; the ACK arrives
    exchange(d2, [])
    assert relay.scope(scope).get("status") == 3, "the offline write never reached the relay"
