"""``BATCH`` / ``BATCH_ACK``: round trips, id ranges, tampering and malformed bodies."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import DecodeError, ProtocolError, SignatureError, WireError
from sync.envelope import decode_envelope, encode_envelope, packb
from sync.keys import KeyRing, Signer
from sync.relaying import (
    BATCH,
    BATCH_ACK,
    Batch,
    BatchItem,
    decode_batch,
    decode_batch_ack,
    encode_batch,
    encode_batch_ack,
    id_ranges,
    open_device_envelope,
)

RELAY = Signer.generate()
HUB = Signer.generate()
OTHER = Signer.generate()
DEVICE = Signer.generate()
RELAY_RING = KeyRing()
RELAY_RING.add(RELAY.public_key_bytes)
HUB_RING = KeyRing()
HUB_RING.add(HUB.public_key_bytes)
DEVICE_RING = KeyRing()
DEVICE_RING.add(DEVICE.public_key_bytes)

DEVICE_ENV = encode_envelope("DELTAS", "gw-1", 3, 1_700_000_000_000, packb({"x": 1}), DEVICE)
ITEMS = (
    BatchItem(1, "gw-1", "delta", DEVICE_ENV),
    BatchItem(2, "gw-1", "event", b"\x90"),
    BatchItem(5, "gw-2", "metric", b""),
    BatchItem(6, "relay-1", "presence", packb({"online": 3})),
    BatchItem(9, "gw-3", "agg", packb({"n": 1})),
)


def _batch(items: tuple[BatchItem, ...] = ITEMS, signer: Signer = RELAY) -> bytes:
    return encode_batch(signer, src="relay-1", seq=4, ts=1_700_000_000_123, epoch=77, items=items)


def _signed(type_: str, body: object, *, src: str = "relay-1", signer: Signer = RELAY) -> bytes:
    """A correctly signed envelope around an arbitrary body."""
    return encode_envelope(type_, src, 1, 2, packb(body), signer)


def _good_body() -> dict[str, Any]:
    return {"r": "relay-1", "ep": 1, "ids": [1], "k": ["delta"], "d": ["gw-1"], "p": [b"x"]}


# -- round trips ----------------------------------------------------------------------------


def test_batch_round_trip() -> None:
    batch = decode_batch(_batch(), RELAY_RING)
    assert isinstance(batch, Batch)
    assert batch.relay == "relay-1"
    assert batch.epoch == 77
    assert batch.items == ITEMS
    assert batch.envelope.type == BATCH
    assert (batch.envelope.seq, batch.envelope.ts) == (4, 1_700_000_000_123)
    assert batch.envelope.kid == RELAY.key_id


def test_empty_batch_round_trip() -> None:
    assert decode_batch(_batch(()), RELAY_RING).items == ()


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**62),
            st.text(min_size=1, max_size=20),
            st.sampled_from(["delta", "event", "metric", "presence", "agg"]),
            st.binary(max_size=64),
        ),
        max_size=30,
    )
)
def test_batch_round_trip_property(rows: list[tuple[int, str, str, bytes]]) -> None:
    items = tuple(BatchItem(i, d, k, p) for i, d, k, p in rows)
    assert decode_batch(_batch(items), RELAY_RING).items == items


def test_batch_ack_round_trip() -> None:
    data = encode_batch_ack(HUB, src="hub", seq=9, ts=5, relay="relay-1", ids=[7, 3, 4, 5, 7, 10])
    env = decode_envelope(data, HUB_RING)
    assert env.type == BATCH_ACK
    assert env.src == "hub"
    assert decode_batch_ack(env) == ("relay-1", [3, 4, 5, 7, 10])


def test_batch_ack_of_nothing() -> None:
    data = encode_batch_ack(HUB, src="hub", seq=1, ts=1, relay="relay-1", ids=[])
    assert decode_batch_ack(decode_envelope(data, HUB_RING)) == ("relay-1", [])


@settings(max_examples=200)
@given(st.lists(st.integers(0, 5_000), max_size=200))
def test_batch_ack_round_trip_property(ids: list[int]) -> None:
    data = encode_batch_ack(HUB, src="hub", seq=1, ts=1, relay="r", ids=ids)
    assert decode_batch_ack(decode_envelope(data, HUB_RING)) == ("r", sorted(set(ids)))


# -- id_ranges ------------------------------------------------------------------------------


def _reference_ranges(ids: list[int]) -> list[list[int]]:
    """The obvious quadratic version: grow each run from its smallest member."""
    members = set(ids)
    out = []
    for lo in sorted(members):
        if lo - 1 in members:
            continue
        hi = lo
        while hi + 1 in members:
            hi += 1
        out.append([lo, hi])
    return out


@settings(max_examples=300)
@given(st.lists(st.integers(0, 300), max_size=120) | st.lists(st.integers(0, 2**62), max_size=20))
def test_id_ranges_matches_reference(ids: list[int]) -> None:
    ranges = id_ranges(ids)
    assert ranges == _reference_ranges(ids)
    expanded = [i for lo, hi in ranges for i in range(lo, hi + 1)]
    assert expanded == sorted(set(ids))
    # Maximal: neighbouring ranges neither touch nor overlap.
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))


def test_id_ranges_examples() -> None:
    assert id_ranges([]) == []
    assert id_ranges([5]) == [[5, 5]]
    assert id_ranges([3, 1, 2, 2, 7, 9, 8, 20]) == [[1, 3], [7, 9], [20, 20]]


# -- tampering ------------------------------------------------------------------------------


def test_every_flipped_byte_is_a_wire_error() -> None:
    data = _batch(ITEMS[:2])
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(data)
            tampered[pos] ^= mask
            with pytest.raises(WireError):
                decode_batch(bytes(tampered), RELAY_RING)


@settings(max_examples=200)
@given(st.data())
def test_random_flipped_byte_is_a_wire_error(data: st.DataObject) -> None:
    wire = _batch()
    pos = data.draw(st.integers(0, len(wire) - 1))
    mask = data.draw(st.integers(1, 255))
    tampered = bytearray(wire)
    tampered[pos] ^= mask
    with pytest.raises(WireError):
        decode_batch(bytes(tampered), RELAY_RING)


def test_truncated_and_extended_batches_are_wire_errors() -> None:
    data = _batch()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(WireError):
            decode_batch(data[:cut], RELAY_RING)
    with pytest.raises(WireError):
        decode_batch(data + b"\x00", RELAY_RING)


def test_batch_signed_by_another_key() -> None:
    with pytest.raises(SignatureError):
        decode_batch(_batch(signer=OTHER), RELAY_RING)


def test_batch_signed_by_another_key_claiming_the_relay_kid() -> None:
    forger = Signer(OTHER.private_key, key_id=RELAY.key_id)
    with pytest.raises(SignatureError):
        decode_batch(_batch(signer=forger), RELAY_RING)


def test_batch_ack_signed_by_another_key() -> None:
    data = encode_batch_ack(OTHER, src="hub", seq=1, ts=1, relay="relay-1", ids=[1])
    with pytest.raises(SignatureError):
        decode_envelope(data, HUB_RING)


# -- malformed BATCH bodies -----------------------------------------------------------------


def _without(key: str) -> dict[str, Any]:
    body = _good_body()
    del body[key]
    return body


def _with(**changes: Any) -> dict[str, Any]:
    return {**_good_body(), **changes}


MALFORMED_BATCH_BODIES: dict[str, object] = {
    "not a map": [1, 2, 3],
    "nil": None,
    "missing r": _without("r"),
    "missing ep": _without("ep"),
    "missing ids": _without("ids"),
    "missing p": _without("p"),
    "extra key": _with(x=1),
    "ids not a list": _with(ids=1),
    "kinds a map": _with(k={"a": "delta"}),
    "devices a string": _with(d="gw-1"),
    "payloads bytes": _with(p=b"x"),
    "short ids": _with(ids=[]),
    "long kinds": _with(k=["delta", "delta"]),
    "long devices": _with(d=["gw-1", "gw-2"]),
    "short payloads": _with(p=[]),
    "id a string": _with(ids=["1"]),
    "id a bool": _with(ids=[True]),
    "id a float": _with(ids=[1.0]),
    "unknown kind": _with(k=["deltas"]),
    "kind bytes": _with(k=[b"delta"]),
    "device bytes": _with(d=[b"gw-1"]),
    "device nil": _with(d=[None]),
    "payload a string": _with(p=["x"]),
    "relay id mismatch": _with(r="relay-2"),
    "relay id not a string": _with(r=1),
    "epoch a string": _with(ep="1"),
    "epoch a bool": _with(ep=False),
    "epoch nil": _with(ep=None),
    "too many items": _with(
        ids=list(range(10_001)),
        k=["delta"] * 10_001,
        d=["d"] * 10_001,
        p=[b""] * 10_001,
    ),
}


@pytest.mark.parametrize("body", MALFORMED_BATCH_BODIES.values(), ids=MALFORMED_BATCH_BODIES)
def test_malformed_batch_body(body: object) -> None:
    with pytest.raises(ProtocolError):
        decode_batch(_signed(BATCH, body), RELAY_RING)


def test_batch_of_ten_thousand_items_is_accepted() -> None:
    n = 10_000
    body = _with(ids=list(range(n)), k=["delta"] * n, d=["d"] * n, p=[b""] * n)
    assert len(decode_batch(_signed(BATCH, body), RELAY_RING).items) == n


@pytest.mark.parametrize("type_", [BATCH_ACK, "DELTAS", "HELLO"])
def test_envelope_of_another_type_is_not_a_batch(type_: str) -> None:
    with pytest.raises(ProtocolError):
        decode_batch(_signed(type_, _good_body()), RELAY_RING)


def test_batch_body_that_is_not_msgpack() -> None:
    data = encode_envelope(BATCH, "relay-1", 1, 2, b"\xc1", RELAY)
    with pytest.raises(DecodeError):
        decode_batch(data, RELAY_RING)


# -- malformed BATCH_ACK bodies -------------------------------------------------------------

MALFORMED_ACK_BODIES: dict[str, object] = {
    "not a map": [[1, 2]],
    "missing ids": {"r": "relay-1"},
    "missing r": {"ids": []},
    "extra key": {"r": "relay-1", "ids": [], "x": 0},
    "ids a map": {"r": "relay-1", "ids": {"1": 2}},
    "range not a list": {"r": "relay-1", "ids": [3]},
    "range of one": {"r": "relay-1", "ids": [[3]]},
    "range of three": {"r": "relay-1", "ids": [[1, 2, 3]]},
    "range of strings": {"r": "relay-1", "ids": [["1", "2"]]},
    "range of bools": {"r": "relay-1", "ids": [[False, True]]},
    "range of floats": {"r": "relay-1", "ids": [[1.0, 2.0]]},
    "reversed range": {"r": "relay-1", "ids": [[5, 4]]},
    "negative range": {"r": "relay-1", "ids": [[-3, 4]]},
    "relay not a string": {"r": 1, "ids": [[1, 1]]},
    "relay nil": {"r": None, "ids": []},
    "one range of a million and one": {"r": "relay-1", "ids": [[0, 1_000_000]]},
    "ranges summing past a million": {
        "r": "relay-1",
        "ids": [[0, 600_000], [700_000, 1_200_000]],
    },
}


def _ack_envelope(body: object) -> Any:
    return decode_envelope(_signed(BATCH_ACK, body, src="hub", signer=HUB), HUB_RING)


@pytest.mark.parametrize("body", MALFORMED_ACK_BODIES.values(), ids=MALFORMED_ACK_BODIES)
def test_malformed_batch_ack_body(body: object) -> None:
    with pytest.raises(ProtocolError):
        decode_batch_ack(_ack_envelope(body))


def test_batch_ack_of_a_million_ids_is_accepted() -> None:
    relay, ids = decode_batch_ack(_ack_envelope({"r": "relay-1", "ids": [[1, 1_000_000]]}))
    assert relay == "relay-1"
    assert len(ids) == 1_000_000


def test_batch_ack_with_an_astronomical_range() -> None:
    # 2**62 ids: the bound must be checked before the range is materialised.
    with pytest.raises(ProtocolError):
        decode_batch_ack(_ack_envelope({"r": "relay-1", "ids": [[0, 2**62]]}))


# -- open_device_envelope -------------------------------------------------------------------


def test_open_device_envelope() -> None:
    env = open_device_envelope(DEVICE_ENV, "gw-1", DEVICE_RING)
    assert (env.type, env.src, env.seq) == ("DELTAS", "gw-1", 3)


def test_open_device_envelope_of_another_device() -> None:
    with pytest.raises(DecodeError):
        open_device_envelope(DEVICE_ENV, "gw-2", DEVICE_RING)


def test_open_device_envelope_signed_by_another_key() -> None:
    forged = encode_envelope("DELTAS", "gw-1", 3, 1, packb({"x": 1}), OTHER)
    with pytest.raises(SignatureError):
        open_device_envelope(forged, "gw-1", DEVICE_RING)
    impostor = Signer(OTHER.private_key, key_id=DEVICE.key_id)
    forged = encode_envelope("DELTAS", "gw-1", 3, 1, packb({"x": 1}), impostor)
    with pytest.raises(SignatureError):
        open_device_envelope(forged, "gw-1", DEVICE_RING)


def test_open_device_envelope_with_the_ring_of_another_device() -> None:
    other_ring = KeyRing()
    other_ring.add(OTHER.public_key_bytes)
    with pytest.raises(SignatureError):
        open_device_envelope(DEVICE_ENV, "gw-1", other_ring)


def test_open_device_envelope_of_garbage() -> None:
    with pytest.raises(WireError):
        open_device_envelope(b"\x00garbage", "gw-1", DEVICE_RING)
