"""Ed25519 signing and verification: PyNaCl (libsodium) first, else ``cryptography``.

Why not simply ``cryptography``: its extension module carries a statically
linked copy of OpenSSL, about 7 MB resident once loaded, in every process that
signs or verifies — the edge agent included, whose idle memory is a product
figure. PyNaCl's libsodium costs about a tenth of that. Ed25519 signatures are
deterministic (RFC 8032), so both backends make identical signatures from the
same key, and ``cryptography`` stays in use for reading key files in other
layouts (PEM written elsewhere) and as the fallback.

:data:`BACKEND` is chosen once, at import: ``nacl`` after a self-test against
RFC 8032's first test vector, else ``cryptography`` (PyNaCl missing, a failed
self-test, or ``NOVACRON_ED25519_BACKEND=cryptography`` set).
"""

from __future__ import annotations

import logging
import os
from typing import Final, Protocol

__all__ = [
    "BACKEND",
    "Backend",
    "PrivateKey",
    "PublicKey",
    "RawPublicKey",
    "cryptography_backend",
    "nacl_backend",
]

logger = logging.getLogger(__name__)

SEED_LEN: Final = 32
SIG_LEN: Final = 64
ENV_VAR: Final = "NOVACRON_ED25519_BACKEND"

# RFC 8032, section 7.1, TEST 1 (empty message).
_TEST_SEED: Final = bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
)
_TEST_PUBLIC: Final = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)
_TEST_SIG: Final = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


class PublicKey(Protocol):
    """A verifying key."""

    def public_bytes_raw(self) -> bytes:
        """The 32 raw public key bytes."""
        ...

    def is_valid(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``data``."""
        ...


class RawPublicKey(Protocol):
    """What a private key's ``public_key()`` returns, in either backend."""

    def public_bytes_raw(self) -> bytes:
        """The 32 raw public key bytes."""
        ...


class PrivateKey(Protocol):
    """A signing key (``cryptography``'s ``Ed25519PrivateKey`` is one too)."""

    def sign(self, data: bytes) -> bytes:
        """The 64-byte signature of ``data``."""
        ...

    def private_bytes_raw(self) -> bytes:
        """The 32-byte seed."""
        ...

    def public_key(self) -> RawPublicKey:
        """Its public key."""
        ...


class Backend(Protocol):
    """Makes keys; see the module docstring."""

    name: str

    def private_key(self, seed: bytes) -> PrivateKey:
        """The key of a 32-byte seed.

        Raises:
            ValueError: not 32 bytes.
        """
        ...

    def public_key(self, raw: bytes) -> PublicKey:
        """The verifying key of 32 raw bytes.

        Raises:
            ValueError: not a usable Ed25519 public key.
        """
        ...


# -- PyNaCl (libsodium) -----------------------------------------------------------------


class _NaclPublicKey:
    __slots__ = ("_bad", "_key", "_raw")

    def __init__(self, raw: bytes) -> None:
        from nacl.exceptions import BadSignatureError  # noqa: PLC0415
        from nacl.signing import VerifyKey  # noqa: PLC0415

        self._raw = bytes(raw)
        self._key = VerifyKey(self._raw)
        self._bad = BadSignatureError

    def public_bytes_raw(self) -> bytes:
        return self._raw

    def is_valid(self, signature: bytes, data: bytes) -> bool:
        if len(signature) != SIG_LEN:
            return False
        try:
            self._key.verify(bytes(data), bytes(signature))
        except self._bad:
            return False
        return True


class _NaclPrivateKey:
    # Signing calls libsodium's crypto_sign through PyNaCl's binding directly:
    # SigningKey.sign wraps the same call in a SignedMessage and two encoder
    # passes, a fifth of the cost of a signature on a small envelope.
    __slots__ = ("_crypto_sign", "_public", "_seed", "_sk")

    def __init__(self, seed: bytes) -> None:
        from nacl.bindings import crypto_sign, crypto_sign_seed_keypair  # noqa: PLC0415

        self._seed = bytes(seed)
        public, self._sk = crypto_sign_seed_keypair(self._seed)  # sk: libsodium's 64 bytes
        self._public = bytes(public)
        self._crypto_sign = crypto_sign

    def sign(self, data: bytes) -> bytes:
        # crypto_sign returns signature || message.
        return self._crypto_sign(bytes(data), self._sk)[:SIG_LEN]

    def private_bytes_raw(self) -> bytes:
        return self._seed

    def public_key(self) -> _NaclPublicKey:
        return _NaclPublicKey(self._public)

    def __repr__(self) -> str:
        return "<Ed25519 private key (nacl)>"


class _NaclBackend:
    name = "nacl"

    def private_key(self, seed: bytes) -> PrivateKey:
        if len(seed) != SEED_LEN:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return _NaclPrivateKey(seed)

    def public_key(self, raw: bytes) -> PublicKey:
        if len(raw) != SEED_LEN:
            raise ValueError("an Ed25519 public key is 32 bytes")
        return _NaclPublicKey(raw)


def nacl_backend() -> Backend | None:
    """The PyNaCl backend, or None when PyNaCl is missing or fails the self-test."""
    try:
        backend = _NaclBackend()
        key = backend.private_key(_TEST_SEED)
        ok = (
            key.public_key().public_bytes_raw() == _TEST_PUBLIC
            and key.sign(b"") == _TEST_SIG
            and backend.public_key(_TEST_PUBLIC).is_valid(_TEST_SIG, b"")
            and not backend.public_key(_TEST_PUBLIC).is_valid(_TEST_SIG, b"x")
        )
    except ImportError as exc:
        logger.debug("PyNaCl backend unavailable: %s", exc)
        return None
    if not ok:
        logger.warning("PyNaCl Ed25519 self-test failed; using cryptography")
        return None
    return backend


# -- cryptography ---------------------------------------------------------------------------


class _CryptographyPublicKey:
    __slots__ = ("_invalid", "_key")

    def __init__(self, raw: bytes) -> None:
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PublicKey,
        )

        self._key = Ed25519PublicKey.from_public_bytes(bytes(raw))
        self._invalid = InvalidSignature

    def public_bytes_raw(self) -> bytes:
        raw: bytes = self._key.public_bytes_raw()
        return raw

    def is_valid(self, signature: bytes, data: bytes) -> bool:
        if len(signature) != SIG_LEN:
            return False
        try:
            self._key.verify(bytes(signature), bytes(data))
        except self._invalid:
            return False
        return True


class _CryptographyBackend:
    name = "cryptography"

    def private_key(self, seed: bytes) -> PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PrivateKey,
        )

        if len(seed) != SEED_LEN:
            raise ValueError("an Ed25519 seed is 32 bytes")
        key: PrivateKey = Ed25519PrivateKey.from_private_bytes(bytes(seed))
        return key

    def public_key(self, raw: bytes) -> PublicKey:
        if len(raw) != SEED_LEN:
            raise ValueError("an Ed25519 public key is 32 bytes")
        return _CryptographyPublicKey(raw)


def cryptography_backend() -> Backend:
    """The ``cryptography`` backend (imports it on first use of a key)."""
    return _CryptographyBackend()


def _choose() -> Backend:
    if os.environ.get(ENV_VAR, "").strip().lower() == "cryptography":
        return cryptography_backend()
    return nacl_backend() or cryptography_backend()


BACKEND: Final[Backend] = _choose()
"""The backend this process uses."""
