"""Envelope encode/decode, strict msgpack decoding and its limits."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import (
    ConfigError,
    DecodeError,
    NovaCronError,
    OversizeError,
    SignatureError,
    UnsupportedVersionError,
    WireError,
)
from sync.envelope import (
    DEFAULT_LIMITS,
    WIRE_VERSION,
    DecodeLimits,
    Envelope,
    decode_envelope,
    decode_envelope_unverified,
    encode_envelope,
    packb,
    unpackb_strict,
    verify_envelope,
)
from sync.keys import KeyRing, Signer

SIGNER = Signer.generate()
OTHER = Signer.generate()
RING = KeyRing()
RING.add(SIGNER.public_key_bytes)

DELTAS = [
    ["scope", f"key/{i}", {"n": i, "tags": ["a", "b"]}, 1_700_000_000_000 + i, "o", i]
    for i in range(20)
]
BODY = packb(DELTAS)
WIRE = encode_envelope("DELTAS", "dev-1", 7, 1_700_000_000_000, BODY, SIGNER)


def _raw_envelope(**overrides: object) -> bytes:
    """Pack an envelope map by hand (no validation), signed by SIGNER."""
    fields: dict[str, object] = {
        "v": 1,
        "type": "DELTAS",
        "src": "dev-1",
        "kid": SIGNER.key_id,
        "seq": 1,
        "ts": 2,
        "body": BODY,
    }
    fields.update({k: v for k, v in overrides.items() if k != "sig"})
    signed = msgpack.packb(
        [fields.get(k) for k in ("v", "type", "src", "kid", "seq", "ts", "body")]
    )
    fields["sig"] = overrides.get("sig", SIGNER.sign(signed))
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


# -- round trip ------------------------------------------------------------------


def test_round_trip() -> None:
    env = decode_envelope(WIRE, RING)
    assert env == Envelope(
        WIRE_VERSION, "DELTAS", "dev-1", SIGNER.key_id, 7, 1_700_000_000_000, BODY, env.sig
    )
    assert len(env.sig) == 64
    assert env.decode_body() == DELTAS
    verify_envelope(env, RING)


def test_wire_is_a_map_with_exactly_the_documented_keys() -> None:
    raw = msgpack.unpackb(WIRE)
    assert list(raw) == ["v", "type", "src", "kid", "seq", "ts", "body", "sig"]
    assert isinstance(raw["body"], bytes)
    # The signature covers packb of the field list, not the map.
    RING.verify(
        raw["kid"],
        msgpack.packb([raw[k] for k in ("v", "type", "src", "kid", "seq", "ts", "body")]),
        raw["sig"],
    )


def test_handcrafted_envelope_matches_encoder() -> None:
    assert _raw_envelope() == encode_envelope("DELTAS", "dev-1", 1, 2, BODY, SIGNER)


def test_accepts_bytearray_and_memoryview() -> None:
    assert decode_envelope(bytearray(WIRE), RING) == decode_envelope(memoryview(WIRE), RING)


def test_envelope_is_frozen() -> None:
    env = decode_envelope(WIRE, RING)
    with pytest.raises(AttributeError):
        env.seq = 8  # type: ignore[misc]


# -- trust -------------------------------------------------------------------------


def test_unknown_kid() -> None:
    wire = encode_envelope("DELTAS", "dev-1", 1, 2, BODY, OTHER)
    with pytest.raises(SignatureError, match="unknown key id"):
        decode_envelope(wire, RING)
    # The unverified path still reads it, for routing only.
    assert decode_envelope_unverified(wire).kid == OTHER.key_id


def test_forged_envelope_claiming_a_trusted_kid() -> None:
    forger = Signer(OTHER.private_key, key_id=SIGNER.key_id)
    wire = encode_envelope("DELTAS", "dev-1", 1, 2, BODY, forger)
    assert decode_envelope_unverified(wire).kid == SIGNER.key_id
    with pytest.raises(SignatureError, match="invalid signature"):
        decode_envelope(wire, RING)


def test_tampered_field_after_signing() -> None:
    env = decode_envelope(WIRE, RING)
    tampered = Envelope(env.v, env.type, "dev-2", env.kid, env.seq, env.ts, env.body, env.sig)
    with pytest.raises(SignatureError):
        verify_envelope(tampered, RING)


# -- shape and fields ----------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 255, -1, 2**64 - 1])
def test_unknown_version(version: int) -> None:
    with pytest.raises(UnsupportedVersionError) as info:
        decode_envelope(_raw_envelope(v=version), RING)
    assert info.value.version == version


def test_future_version_with_other_keys_still_reports_version() -> None:
    data = msgpack.packb({"v": 2, "whatever": [1, 2, 3], "x": b"y"})
    with pytest.raises(UnsupportedVersionError):
        decode_envelope(data, RING)


@pytest.mark.parametrize(
    "overrides",
    [
        {"v": "1"},
        {"v": True},
        {"v": 1.0},
        {"type": b"DELTAS"},
        {"type": ""},
        {"type": "x" * 65},
        {"src": 5},
        {"src": None},
        {"kid": ""},
        {"seq": -1},
        {"seq": 2**63},
        {"seq": "1"},
        {"seq": 1.5},
        {"ts": -5},
        {"ts": True},
        {"body": "text"},
        {"body": [1, 2]},
        {"sig": b"short"},
        {"sig": "x" * 64},
    ],
    ids=repr,
)
def test_wrong_field_types(overrides: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        decode_envelope(_raw_envelope(**overrides), RING)


@pytest.mark.parametrize(
    "obj",
    [
        [1, "DELTAS"],
        "envelope",
        42,
        {},
        {"type": "x"},
        {"v": 1},
        {
            "v": 1,
            "type": "x",
            "src": "s",
            "kid": "k",
            "seq": 1,
            "ts": 1,
            "body": b"",
            "sig": b"",
            "extra": 1,
        },
    ],
    ids=repr,
)
def test_wrong_shape(obj: object) -> None:
    with pytest.raises(DecodeError):
        decode_envelope(msgpack.packb(obj), RING)


def test_non_canonical_key_order_rejected() -> None:
    raw = msgpack.unpackb(WIRE)
    reordered = msgpack.packb(dict(reversed(list(raw.items()))))
    with pytest.raises(DecodeError, match="canonical"):
        decode_envelope(reordered, RING)


def test_non_canonical_int_encoding_rejected() -> None:
    # seq=7 as uint64 instead of a positive fixint: same value, other bytes.
    i = WIRE.index(b"\xa3seq") + 4
    assert WIRE[i] == 7
    data = WIRE[:i] + b"\xcf" + struct.pack(">Q", 7) + WIRE[i + 1 :]
    with pytest.raises(DecodeError, match="canonical"):
        decode_envelope(data, RING)


def test_duplicate_key_rejected() -> None:
    # A 9-entry map whose last entry repeats "seq": msgpack keeps the last value.
    data = b"\x89" + WIRE[1:] + b"\xa3seq\x07"
    with pytest.raises(DecodeError):
        decode_envelope(data, RING)


def test_trailing_bytes() -> None:
    with pytest.raises(DecodeError, match="trailing"):
        decode_envelope(WIRE + b"\x00", RING)


def test_not_bytes() -> None:
    with pytest.raises(DecodeError):
        decode_envelope("text", RING)  # type: ignore[arg-type]


# -- encode side ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "src", "seq", "ts", "body"),
    [
        ("", "s", 1, 1, b""),
        ("T", "", 1, 1, b""),
        ("T", "s" * 129, 1, 1, b""),
        ("T", "s", -1, 1, b""),
        ("T", "s", 1, 2**63, b""),
        ("T", "s", True, 1, b""),
        ("T", "s", 1, 1, "body"),
    ],
)
def test_encode_rejects_bad_fields(type_: str, src: str, seq: int, ts: int, body: bytes) -> None:
    with pytest.raises(WireError):
        encode_envelope(type_, src, seq, ts, body, SIGNER)


def test_encode_refuses_what_receivers_would_refuse_for_size() -> None:
    limits = DecodeLimits(max_size=1024)
    with pytest.raises(OversizeError):
        encode_envelope("T", "s", 1, 1, b"\x00" * 1024, SIGNER, limits=limits)


# -- size caps -------------------------------------------------------------------------


def test_oversize_checked_before_parsing() -> None:
    limits = DecodeLimits(max_size=len(WIRE) - 1)
    with pytest.raises(OversizeError) as info:
        decode_envelope(WIRE, RING, limits=limits)
    assert (info.value.size, info.value.limit) == (len(WIRE), len(WIRE) - 1)
    # Garbage is refused for its size alone, before msgpack sees it.
    with pytest.raises(OversizeError):
        unpackb_strict(b"\xc1" * (DEFAULT_LIMITS.max_size + 1))


def test_default_size_cap() -> None:
    assert DEFAULT_LIMITS.max_size == 256 * 1024
    body = packb(b"\x00" * (DEFAULT_LIMITS.max_size - 200))
    wire = encode_envelope("T", "s", 1, 1, body, SIGNER)
    assert decode_envelope(wire, RING).body == body
    with pytest.raises(OversizeError):
        encode_envelope("T", "s", 1, 1, packb(b"\x00" * DEFAULT_LIMITS.max_size), SIGNER)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_size": 0},
        {"max_depth": -1},
        {"max_items": 0},
        {"max_depth": 1024},
        {"max_str_len": 1.5},
    ],
    ids=repr,
)
def test_limits_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DecodeLimits(**kwargs)  # type: ignore[arg-type]


# -- strict body decoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        None,
        True,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        float("inf"),
        "",
        "héllo ✓",
        b"\x00\xff",
        [],
        {},
        DELTAS,
        {"a": {"b": {"c": [1, [2, [3]]]}}, "d": []},
    ],
    ids=repr,
)
def test_unpackb_strict_round_trip(obj: object) -> None:
    assert unpackb_strict(packb(obj)) == obj


def test_tuples_come_back_as_lists() -> None:
    assert unpackb_strict(packb((1, (2, 3)))) == [1, [2, 3]]


def test_packb_errors_are_typed() -> None:
    with pytest.raises(DecodeError):
        packb(2**64)
    with pytest.raises(DecodeError):
        packb(object())


def _nested_list(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"


def _nested_map(depth: int) -> bytes:
    return b"\x81\xa1k" * depth + b"\x01"


@pytest.mark.parametrize("build", [_nested_list, _nested_map])
def test_depth_cap(build: object) -> None:
    assert callable(build)
    limits = DecodeLimits(max_depth=32)
    unpackb_strict(build(32), limits=limits)
    with pytest.raises(DecodeError, match="nested"):
        unpackb_strict(build(33), limits=limits)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("depth", [100, 1023, 1024, 1025, 10_000, 200_000])
def test_deep_nesting_fails_fast_without_recursion_error(depth: int) -> None:
    for data in (_nested_list(depth), _nested_map(depth)):
        with pytest.raises(DecodeError) as info:
            unpackb_strict(data)
        assert isinstance(info.value, OversizeError) == (len(data) > DEFAULT_LIMITS.max_size)
        with pytest.raises(WireError):
            decode_envelope(data, RING)


def test_depth_cap_mixed_levels() -> None:
    # Depth reached through a list inside a map inside a list, next to scalars.
    value: object = 1
    for i in range(40):
        value = [i, {"k": value, "s": "x"}, "pad"] if i % 2 else {"x": value, "n": i}
    with pytest.raises(DecodeError, match="nested"):
        unpackb_strict(packb(value))
    assert unpackb_strict(packb(value), limits=DecodeLimits(max_depth=60)) == value


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "data",
    [
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 2**32-1 entries
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 2**32-1 items
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc9\xff\xff\xff\xff\x05",  # ext32 claiming 4 GiB
        b"\x91\xdd\xff\xff\xff\xff",  # nested
        b"\xde\xff\xff" + b"\xa1a\x01",  # map16 with 65535 entries declared, one present
        b"\xdc\xff\xff" + b"\xc0" * 100,
    ],
    ids=lambda d: d[:6].hex(),
)
def test_huge_declared_lengths_fail_fast(data: bytes) -> None:
    with pytest.raises(DecodeError):
        unpackb_strict(data)
    with pytest.raises(WireError):
        decode_envelope(data, RING)


def test_item_and_length_caps() -> None:
    limits = DecodeLimits(max_items=10, max_str_len=5, max_bin_len=3)
    assert unpackb_strict(packb(list(range(10))), limits=limits) == list(range(10))
    for bad in (list(range(11)), {str(i): i for i in range(11)}, "x" * 6, b"x" * 4):
        with pytest.raises(DecodeError):
            unpackb_strict(packb(bad), limits=limits)
    assert DEFAULT_LIMITS.max_items == 100_000
    with pytest.raises(DecodeError):
        unpackb_strict(b"\xdd" + struct.pack(">I", 100_001) + b"\xc0" * 100_001)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb(msgpack.ExtType(5, b"ab")),
        b"\xd6\xff\x00\x00\x00\x01",  # timestamp32 (fixext4, type -1)
        msgpack.packb(msgpack.Timestamp(1, 2)),  # timestamp64
        msgpack.packb([1, {"k": msgpack.ExtType(1, b"")}]),  # ext8, length 0
        b"\xd4\x01\x00",  # fixext1
    ],
    ids=lambda d: d.hex(),
)
def test_ext_types_rejected(data: bytes) -> None:
    with pytest.raises(DecodeError):
        unpackb_strict(data)


@pytest.mark.parametrize(
    "obj",
    [{1: "a"}, {b"k": 1}, {"ok": {b"k": 1}}, [{"a": 1}, {None: 1}], {1.5: 0}, {True: 0}],
    ids=repr,
)
def test_non_string_map_keys_rejected(obj: object) -> None:
    with pytest.raises(DecodeError, match="key"):
        unpackb_strict(msgpack.packb(obj, use_bin_type=True, strict_types=False))


def test_unhashable_map_key_rejected() -> None:
    with pytest.raises(DecodeError):
        unpackb_strict(b"\x81\x90\x01")  # {[]: 1}


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x02", b"\x92\x01", b"\xc1", b"\xa1\xff", b"\xa3\xed\xa0\x80", b"\xd9"],
    ids=lambda d: d.hex(),
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError):
        unpackb_strict(data)


def test_errors_chain_the_msgpack_cause() -> None:
    with pytest.raises(DecodeError) as info:
        unpackb_strict(b"\x92\x01")
    assert isinstance(info.value.__cause__, ValueError)


def test_every_wire_error_is_a_novacron_error() -> None:
    for exc in (DecodeError, OversizeError, UnsupportedVersionError, SignatureError):
        assert issubclass(exc, NovaCronError)


# -- corruption: truncation, bit flips, random bytes -----------------------------------------------


# A flip in the version byte is reported as what it is: an unknown version.
_CORRUPT = (SignatureError, DecodeError, UnsupportedVersionError)


def test_truncated_at_every_position() -> None:
    wire = encode_envelope("DELTAS", "dev-1", 7, 1, packb(DELTAS[:3]), SIGNER)
    for cut in range(len(wire)):
        with pytest.raises(DecodeError):
            decode_envelope(wire[:cut], RING)
    body = packb(DELTAS)
    for cut in range(len(body)):
        with pytest.raises(DecodeError):
            unpackb_strict(body[:cut])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(WIRE) - 1), label="pos")
    xor = data.draw(st.integers(1, 255), label="xor")
    corrupt = bytearray(WIRE)
    corrupt[pos] ^= xor
    with pytest.raises(_CORRUPT):
        decode_envelope(bytes(corrupt), RING)


def test_every_byte_flipped_once() -> None:
    small = encode_envelope("ACK", "dev-1", 1, 2, packb({"vv": {"o": 3}}), SIGNER)
    for pos in range(len(small)):
        for xor in (0x01, 0x80, 0xFF):
            corrupt = bytearray(small)
            corrupt[pos] ^= xor
            with pytest.raises(_CORRUPT):
                decode_envelope(bytes(corrupt), RING)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_give_typed_errors(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        unpackb_strict(data)
    with pytest.raises(WireError):
        decode_envelope(data, RING)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 64))
def test_random_splices_into_a_valid_envelope(junk: bytes, where: int) -> None:
    pos = where * len(WIRE) // 64
    data = WIRE[:pos] + junk + WIRE[pos:]
    with pytest.raises(WireError):
        decode_envelope(data, RING)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(_VALUES)
def test_strict_round_trip_property(value: object) -> None:
    assert unpackb_strict(packb(value), limits=DecodeLimits(max_depth=100)) == value
