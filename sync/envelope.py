"""Signed envelopes: the unit every NovaCron peer sends over MQTT.

Wire format, version 1: a msgpack map with exactly the keys, in this order,
``v, type, src, kid, seq, ts, body, sig``::

    v     int    wire version, 1
    type  str    message type (1..64 characters), e.g. "HELLO", "DELTAS"
    src   str    sender id (1..128 characters)
    kid   str    id of the signing key (1..64 characters), looked up in a KeyRing
    seq   int    per-session sequence number, 0 <= seq < 2**63
    ts    int    sender timestamp (HLC or ms), 0 <= ts < 2**63
    body  bin    the msgpack-encoded message body (decode with unpackb_strict)
    sig   bin    64-byte Ed25519 signature over
                 packb([v, type, src, kid, seq, ts, body])

Decoding is strict. The size cap is checked first; msgpack's own length caps
refuse absurd declared lengths at the header; the map must be the canonical
encoding (shortest forms, the key order above, no duplicates), so the wire bytes
of an accepted envelope are a function of its fields and cannot be re-encoded by a
relay without being refused. An unknown ``v`` raises
:class:`UnsupportedVersionError` before the rest of the shape is judged, so a
newer peer gets a precise error.

The body is not decoded here: callers decode it with :func:`unpackb_strict` (or
:meth:`Envelope.decode_body`) once the signature has been checked, so nothing
unauthenticated is ever walked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sync._exceptions import (
    DecodeError,
    OversizeError,
    UnsupportedVersionError,
    WireError,
)
from sync._msgpack_strict import (
    DEFAULT_LIMITS,
    BytesLike,
    DecodeLimits,
    _raw_unpack,
    _size_of,
    packb,
    unpackb_strict,
)
from sync.keys import KeyRing, Signer

__all__ = [
    "DEFAULT_LIMITS",
    "WIRE_VERSION",
    "BytesLike",
    "DecodeLimits",
    "Envelope",
    "decode_envelope",
    "decode_envelope_unverified",
    "encode_envelope",
    "packb",
    "unpackb_strict",
    "verify_envelope",
]

WIRE_VERSION: Final = 1
"""The envelope version this build writes and reads."""

MAX_TYPE_LEN: Final = 64
MAX_SRC_LEN: Final = 128
MAX_KID_LEN: Final = 64
SIG_LEN: Final = 64
_INT_LIMIT: Final = 2**63

_KEYS: Final = ("v", "type", "src", "kid", "seq", "ts", "body", "sig")
_KEY_SET: Final = frozenset(_KEYS)
# Generous for the outer parse, so an envelope from a newer version with more
# keys still reaches the version check instead of failing on a cap.
_OUTER_MAX_ENTRIES: Final = 64
_OUTER_MAX_STR: Final = 1024


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded envelope; see the module docstring for the fields."""

    v: int
    type: str
    src: str
    kid: str
    seq: int
    ts: int
    body: bytes
    sig: bytes

    def signed_bytes(self) -> bytes:
        """Return the exact bytes the signature covers."""
        return packb([self.v, self.type, self.src, self.kid, self.seq, self.ts, self.body])

    def decode_body(self, *, limits: DecodeLimits = DEFAULT_LIMITS) -> object:
        """Strictly decode :attr:`body` (see :func:`unpackb_strict`).

        Raises:
            DecodeError: the body is not acceptable msgpack under ``limits``.
        """
        return unpackb_strict(self.body, limits=limits)


def _check_str(name: str, value: object, max_len: int, err: type[WireError]) -> str:
    if type(value) is not str or not 1 <= len(value) <= max_len:
        raise err(f"envelope field {name!r} must be a str of 1..{max_len} characters")
    return value


def _check_int(name: str, value: object, err: type[WireError]) -> int:
    if type(value) is not int or not 0 <= value < _INT_LIMIT:
        raise err(f"envelope field {name!r} must be an int in [0, 2**63)")
    return value


def _fields_ok(type_: object, src: object, kid: object, seq: object, ts: object) -> bool:
    """Whether :func:`_check_fields` would pass (one expression, no error built)."""
    return (
        type(type_) is str
        and 1 <= len(type_) <= MAX_TYPE_LEN
        and type(src) is str
        and 1 <= len(src) <= MAX_SRC_LEN
        and type(kid) is str
        and 1 <= len(kid) <= MAX_KID_LEN
        and type(seq) is int
        and 0 <= seq < _INT_LIMIT
        and type(ts) is int
        and 0 <= ts < _INT_LIMIT
    )


def _check_fields(
    type_: object, src: object, kid: object, *, seq: object, ts: object, err: type[WireError]
) -> None:
    _check_str("type", type_, MAX_TYPE_LEN, err)
    _check_str("src", src, MAX_SRC_LEN, err)
    _check_str("kid", kid, MAX_KID_LEN, err)
    _check_int("seq", seq, err)
    _check_int("ts", ts, err)


def encode_envelope(  # noqa: PLR0917 - positional API fixed by the sync protocol
    type: str,
    src: str,
    seq: int,
    ts: int,
    body: bytes,
    signer: Signer,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> bytes:
    """Sign and encode one envelope.

    Args:
        type: message type (1..64 characters).
        src: sender id (1..128 characters).
        seq: per-session sequence number, ``0 <= seq < 2**63``.
        ts: sender timestamp, ``0 <= ts < 2**63``.
        body: the already msgpack-encoded body (see :func:`packb`).
        signer: signs the envelope; its ``key_id`` becomes ``kid``.
        limits: the receiver's limits; an envelope they would refuse for size
            is refused here.

    Returns:
        The wire bytes.

    Raises:
        WireError: a field has the wrong type or is out of range.
        OversizeError: the encoded envelope exceeds ``limits.max_size``.
    """
    if body.__class__ is not bytes:  # (``type`` is the parameter here)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise WireError("envelope body must be bytes")
        body = bytes(body)
    kid = signer.key_id
    if not _fields_ok(type, src, kid, seq, ts):
        _check_fields(type, src, kid, seq=seq, ts=ts, err=WireError)
    sig = signer.sign(packb([WIRE_VERSION, type, src, kid, seq, ts, body]))
    data = packb(
        {
            "v": WIRE_VERSION,
            "type": type,
            "src": src,
            "kid": kid,
            "seq": seq,
            "ts": ts,
            "body": body,
            "sig": sig,
        }
    )
    if len(data) > limits.max_size:
        raise OversizeError(len(data), limits.max_size)
    return data


def decode_envelope_unverified(
    data: BytesLike, *, limits: DecodeLimits = DEFAULT_LIMITS
) -> Envelope:
    """Decode an envelope WITHOUT checking its signature.

    Danger: every field of the result, ``src`` and ``kid`` included, is
    attacker-controlled until :func:`verify_envelope` succeeds. Use this only to
    route or to choose the key ring (a relay that must read ``src`` before it
    knows which key to trust), never to act on the content, and never decode or
    apply the body of an unverified envelope. Prefer :func:`decode_envelope`.

    Args:
        data: the wire bytes.
        limits: ``max_size`` bounds the whole envelope; the other caps apply
            when the body is decoded.

    Returns:
        The envelope, structurally valid and canonically encoded.

    Raises:
        OversizeError: ``data`` exceeds ``limits.max_size``.
        UnsupportedVersionError: ``v`` is an int other than 1.
        DecodeError: anything else wrong with the bytes or the fields.
    """
    size = _size_of(data)
    if size > limits.max_size:
        raise OversizeError(size, limits.max_size)
    # Small containers and strings only: bulky junk fails at its header.
    obj = _raw_unpack(
        data,
        max_items=_OUTER_MAX_ENTRIES,
        max_map_len=_OUTER_MAX_ENTRIES,
        max_str_len=_OUTER_MAX_STR,
        max_bin_len=limits.max_size,
    )
    if type(obj) is not dict:
        raise DecodeError("envelope must be a msgpack map")
    if "v" not in obj:
        raise DecodeError("envelope has no version field 'v'")
    v = obj["v"]
    if type(v) is not int:
        raise DecodeError("envelope field 'v' must be an int")
    if v != WIRE_VERSION:
        raise UnsupportedVersionError(v)
    if obj.keys() != _KEY_SET:
        missing = sorted(_KEY_SET - obj.keys())
        extra = sorted(map(repr, obj.keys() - _KEY_SET))
        raise DecodeError(f"envelope keys wrong: missing {missing}, unexpected {extra}")
    type_, src, kid, seq, ts, body, sig = (
        obj["type"],
        obj["src"],
        obj["kid"],
        obj["seq"],
        obj["ts"],
        obj["body"],
        obj["sig"],
    )
    if not _fields_ok(type_, src, kid, seq, ts):
        _check_fields(type_, src, kid, seq=seq, ts=ts, err=DecodeError)
    if type(body) is not bytes:
        raise DecodeError("envelope field 'body' must be msgpack bin")
    if type(sig) is not bytes or len(sig) != SIG_LEN:
        raise DecodeError(f"envelope field 'sig' must be {SIG_LEN} bytes of msgpack bin")
    # The decoded map keeps the wire order of its keys: in any other order than
    # _KEYS the bytes are not canonical, and in that order they are exactly
    # when re-packing the map gives them back.
    if tuple(obj) != _KEYS or packb(obj) != data:
        raise DecodeError("envelope is not canonically encoded")
    return Envelope(v, type_, src, kid, seq, ts, body, sig)


def verify_envelope(env: Envelope, keyring: KeyRing) -> None:
    """Check ``env``'s signature against ``keyring``.

    Args:
        env: an envelope, typically from :func:`decode_envelope_unverified`.
        keyring: the trusted keys.

    Raises:
        SignatureError: ``env.kid`` is unknown or the signature is invalid.
    """
    keyring.verify(env.kid, env.signed_bytes(), env.sig)


def decode_envelope(
    data: BytesLike, keyring: KeyRing, *, limits: DecodeLimits = DEFAULT_LIMITS
) -> Envelope:
    """Decode an envelope and verify its signature.

    Args:
        data: the wire bytes.
        keyring: trusted keys; ``kid`` must name one of them.
        limits: ``max_size`` bounds the whole envelope.

    Returns:
        The verified envelope. Decode its body with :meth:`Envelope.decode_body`.

    Raises:
        OversizeError: ``data`` exceeds ``limits.max_size``.
        UnsupportedVersionError: ``v`` is an int other than 1.
        DecodeError: the bytes or the fields are malformed.
        SignatureError: unknown ``kid`` or invalid signature.
    """
    env = decode_envelope_unverified(data, limits=limits)
    verify_envelope(env, keyring)
    return env
