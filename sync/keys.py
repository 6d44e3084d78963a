"""Ed25519 keys: generation, storage, signing and a ring of trusted public keys.

Every device makes a key at install; the hub and relays have their own. Private
keys are stored as PKCS#8 PEM (or the 32 raw seed bytes) in a file of mode 0600,
written atomically so a crash never leaves a half-written key behind.

Signing and verification go through :mod:`sync._ed25519`: PyNaCl (libsodium)
where installed, else ``cryptography``. ``cryptography`` itself is imported
only for what this module does not do itself: reading a key file that is not
in the exact layout :func:`save_private_key` writes (or 32 raw bytes).
Functions taking a private key accept either backend's keys, and
``cryptography``'s ``Ed25519PrivateKey``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Literal, Self

from sync._ed25519 import BACKEND, PrivateKey, PublicKey
from sync._exceptions import ConfigError, SignatureError

__all__ = [
    "KEY_ID_LEN",
    "KeyRing",
    "PrivateKey",
    "Signer",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "private_key_from_seed",
    "save_private_key",
]

logger = logging.getLogger(__name__)

KEY_ID_LEN: Final = 16
"""Length of a derived key id: hex characters of the public key's SHA-256."""

_MAX_KEY_ID_LEN: Final = 64
_RAW_KEY_LEN: Final = 32
_SIG_LEN: Final = 64

# An unencrypted PKCS#8 Ed25519 private key (RFC 8410) as cryptography writes it:
# this DER prefix then the 32-byte seed, base64 on one 64-character PEM line.
_PKCS8_ED25519_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
_PEM_HEAD: Final = b"-----BEGIN PRIVATE KEY-----\n"
_PEM_TAIL: Final = b"\n-----END PRIVATE KEY-----"
_PEM_BODY_LEN: Final = 64


def generate_private_key() -> PrivateKey:
    """Make a fresh Ed25519 private key from the OS random source."""
    return BACKEND.private_key(os.urandom(_RAW_KEY_LEN))


def private_key_from_seed(seed: bytes) -> PrivateKey:
    """The Ed25519 private key of a 32-byte seed.

    Raises:
        ValueError: ``seed`` is not 32 bytes.
    """
    return BACKEND.private_key(seed)


def key_id(public_key_bytes: bytes) -> str:
    """Derive the short, stable id of a public key.

    Args:
        public_key_bytes: the 32 raw bytes of an Ed25519 public key.

    Returns:
        The first :data:`KEY_ID_LEN` hex characters of its SHA-256.

    Raises:
        SignatureError: ``public_key_bytes`` is not 32 bytes.
    """
    if not isinstance(public_key_bytes, bytes) or len(public_key_bytes) != _RAW_KEY_LEN:
        raise SignatureError("an Ed25519 public key is 32 raw bytes")
    return hashlib.sha256(public_key_bytes).hexdigest()[:KEY_ID_LEN]


# Parameters named ``key_id`` shadow the function inside the classes below.
_derive_key_id = key_id


def _public_bytes(private_key: PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


def _pem(seed: bytes) -> bytes:
    """Unencrypted PKCS#8 PEM of a seed, byte for byte as ``cryptography`` writes it."""
    der = _PKCS8_ED25519_PREFIX + seed
    return _PEM_HEAD + base64.b64encode(der) + _PEM_TAIL + b"\n"


def save_private_key(
    private_key: PrivateKey,
    path: str | os.PathLike[str],
    *,
    fmt: Literal["pem", "raw"] = "pem",
) -> None:
    """Write ``private_key`` to ``path`` atomically, readable by the owner only.

    The key is written to a temporary file created with mode 0600 in the same
    directory, flushed and fsynced, then renamed over ``path``; the directory is
    fsynced too. An existing file at ``path`` is replaced.

    Args:
        private_key: the key to store.
        path: destination file.
        fmt: ``"pem"`` (unencrypted PKCS#8) or ``"raw"`` (the 32-byte seed).

    Raises:
        ConfigError: the file cannot be written.
    """
    seed = private_key.private_bytes_raw()
    data = _pem(seed) if fmt == "pem" else seed
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise ConfigError(f"cannot write private key: {exc}", source=str(target)) from exc


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read a private key written by :func:`save_private_key`.

    PEM (PKCS#8 or OpenSSH-compatible PEM that ``cryptography`` loads) and the
    32 raw seed bytes are both accepted. A file readable by group or others is
    loaded, with a warning.

    Args:
        path: the key file.

    Returns:
        The private key.

    Raises:
        ConfigError: the file is missing, unreadable, or not an Ed25519 key.
    """
    source = str(path)
    try:
        mode = Path(path).stat().st_mode
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key: {exc}", source=source) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("private key file %s is accessible by group/others", source)
    if len(data) == _RAW_KEY_LEN:
        return BACKEND.private_key(data)
    seed = _pkcs8_seed(data)
    if seed is not None:
        return BACKEND.private_key(seed)
    return BACKEND.private_key(_seed_from_other_pem(data, source))


def _seed_from_other_pem(data: bytes, source: str) -> bytes:
    """The seed of a key file in another layout, read with ``cryptography``."""
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 - see module doc
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError("not a PEM or raw Ed25519 private key", source=source) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"expected an Ed25519 key, found {type(key).__name__}", source=source)
    return key.private_bytes_raw()


def _pkcs8_seed(data: bytes) -> bytes | None:
    """The seed of a PEM key in exactly the layout :func:`save_private_key` writes.

    Returns None for anything else (other layouts, encrypted keys, other key
    types), which :func:`load_private_key` leaves to cryptography's full loader.
    """
    if not data.startswith(_PEM_HEAD):
        return None
    body = data[len(_PEM_HEAD) :]
    body = body.removesuffix(b"\n")
    if not body.endswith(_PEM_TAIL):
        return None
    body = body[: -len(_PEM_TAIL)]
    if len(body) != _PEM_BODY_LEN:
        return None
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_PKCS8_ED25519_PREFIX) + _RAW_KEY_LEN:
        return None
    if not der.startswith(_PKCS8_ED25519_PREFIX):
        return None
    return der[len(_PKCS8_ED25519_PREFIX) :]


def _check_kid(kid: object) -> str:
    if not isinstance(kid, str) or not 1 <= len(kid) <= _MAX_KEY_ID_LEN:
        raise SignatureError(f"a key id is a str of 1..{_MAX_KEY_ID_LEN} characters")
    return kid


class Signer:
    """Signs with one Ed25519 private key and names it by a key id.

    Attributes:
        key_id: the id carried in envelopes (``kid``); by default
            :func:`key_id` of the public key.
        public_key_bytes: the 32 raw bytes of the public key.
    """

    __slots__ = ("_private_key", "key_id", "public_key_bytes")

    def __init__(self, private_key: PrivateKey, key_id: str | None = None) -> None:
        """Wrap ``private_key``.

        Args:
            private_key: the signing key.
            key_id: explicit id (1..64 characters); derived from the public key
                when omitted.

        Raises:
            SignatureError: ``key_id`` is not a valid id.
        """
        self._private_key = private_key
        self.public_key_bytes: bytes = _public_bytes(private_key)
        self.key_id: str = (
            _derive_key_id(self.public_key_bytes) if key_id is None else _check_kid(key_id)
        )

    @classmethod
    def generate(cls, key_id: str | None = None) -> Self:
        """Make a signer around a fresh key (tests, simulator, first install)."""
        return cls(generate_private_key(), key_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], key_id: str | None = None) -> Self:
        """Load the key at ``path`` (see :func:`load_private_key`) and wrap it."""
        return cls(load_private_key(path), key_id)

    @property
    def private_key(self) -> PrivateKey:
        """The wrapped private key (for :func:`save_private_key`)."""
        return self._private_key

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id!r})"


class KeyRing:
    """Trusted public keys by key id, and verification against them.

    Iterating yields key ids; ``kid in ring`` and ``len(ring)`` work as for a
    mapping.
    """

    __slots__ = ("_keys", "_raw")

    def __init__(self) -> None:
        """Create an empty ring."""
        self._keys: dict[str, PublicKey] = {}
        self._raw: dict[str, bytes] = {}

    def add(self, public_key_bytes: bytes, key_id: str | None = None) -> str:
        """Trust ``public_key_bytes`` under ``key_id``.

        Adding the same key under the same id again is a no-op.

        Args:
            public_key_bytes: 32 raw Ed25519 public key bytes.
            key_id: explicit id; derived with :func:`key_id` when omitted.

        Returns:
            The id the key is stored under.

        Raises:
            SignatureError: the key is not a valid Ed25519 public key, the id is
                invalid, or the id is already bound to a different key.
        """
        kid = _derive_key_id(public_key_bytes) if key_id is None else _check_kid(key_id)
        existing = self._raw.get(kid)
        if existing is not None:
            if existing != public_key_bytes:
                raise SignatureError(f"key id {kid!r} is already bound to another key")
            return kid
        try:
            key = BACKEND.public_key(public_key_bytes)
        except (ValueError, TypeError) as exc:
            raise SignatureError("invalid Ed25519 public key") from exc
        self._keys[kid] = key
        self._raw[kid] = bytes(public_key_bytes)
        return kid

    def remove(self, kid: str) -> None:
        """Stop trusting ``kid``; unknown ids are ignored."""
        self._keys.pop(kid, None)
        self._raw.pop(kid, None)

    def get(self, kid: str) -> bytes | None:
        """Return the raw public key stored under ``kid``, or None."""
        return self._raw.get(kid)

    def verify(self, kid: str, data: bytes, sig: bytes) -> None:
        """Check that ``sig`` is ``kid``'s signature of ``data``.

        Args:
            kid: key id claimed by the sender.
            data: the exact signed bytes.
            sig: the 64-byte signature.

        Raises:
            SignatureError: ``kid`` is unknown or the signature is invalid.
        """
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError(f"unknown key id {kid!r}")
        if len(sig) != _SIG_LEN:
            raise SignatureError(f"signature must be {_SIG_LEN} bytes, got {len(sig)}")
        if not key.is_valid(sig, data):
            raise SignatureError(f"invalid signature for key id {kid!r}")

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __repr__(self) -> str:
        return f"KeyRing({sorted(self._keys)!r})"
