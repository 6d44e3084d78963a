"""Keys the device holds: its own Ed25519 identity and the hub's and relays' public keys.

The key is the device's identity towards the hub (enrollment registers its public
half) and signs what the device sends. It lives in ``<data_dir>/device.key`` unless
the agent config names another ``key_path``; the file is written atomically with
mode 0600 by :func:`sync.keys.save_private_key`.

Enrollment (:mod:`edge_agent.enroll`) stores the hub's public key in
``<data_dir>/hub.pub`` and the region's relay keys in ``<data_dir>/relays.pub``; the
agent reads them back with :func:`load_hub_public_key` and
:func:`load_relay_public_keys`. They live here, not in the enrollment module, so a
running agent never imports the enrollment code (pydantic wire models, HTTP client).

These are blocking file operations: call them before the event loop runs or
through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path
from typing import Final

from edge_agent._exceptions import EnrollmentCorruptError, NotEnrolledError
from sync._exceptions import ConfigError, SignatureError
from sync.keys import KeyRing, Signer, generate_private_key, save_private_key

__all__ = [
    "DEVICE_KEY_NAME",
    "HUB_KEY_FILE",
    "RELAY_KEYS_FILE",
    "decode_public_key",
    "load_hub_public_key",
    "load_or_create_device_key",
    "load_relay_public_keys",
]

logger = logging.getLogger(__name__)

DEVICE_KEY_NAME: Final = "device.key"
"""File name of the device key inside the data directory (the config's default)."""

HUB_KEY_FILE: Final = "hub.pub"
"""File name of the hub's public key (one base64 line) inside the data directory."""

RELAY_KEYS_FILE: Final = "relays.pub"
"""File name of the region's relay public keys (base64, one per line) inside the data directory."""

_RAW_KEY_LEN: Final = 32


def load_or_create_device_key(path: str | os.PathLike[str]) -> Signer:
    """Load the device key at ``path``, making and storing a new one if it is missing.

    A missing parent directory is created with mode 0700. An existing file is
    never replaced: a key that cannot be read is an error, not a reason to make a
    new identity.

    Args:
        path: the private key file.

    Returns:
        A signer around the device key; its ``key_id`` is derived from the public key.

    Raises:
        ConfigError: the file exists but is not a readable Ed25519 key, or the new
            key cannot be written.
    """
    target = Path(path)
    if target.exists() or target.is_symlink():
        return Signer.from_file(target)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create key directory: {exc}", source=str(target)) from exc
    signer = Signer(generate_private_key())
    save_private_key(signer.private_key, target)
    logger.info("made a new device key %s at %s", signer.key_id, target)
    return signer


def decode_public_key(value: str) -> bytes:
    """Decode an Ed25519 public key given as base64 of its 32 raw bytes.

    Raises:
        ValueError: not standard base64, not 32 bytes, or not an Ed25519 key.
    """
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("must be standard base64") from exc
    if len(raw) != _RAW_KEY_LEN:
        raise ValueError(f"must be the base64 of {_RAW_KEY_LEN} raw bytes, got {len(raw)}")
    try:
        KeyRing().add(raw)  # the same check the agent's key rings make
    except SignatureError as exc:
        raise ValueError("not a valid Ed25519 public key") from exc
    return raw


def load_hub_public_key(data_dir: str | os.PathLike[str]) -> bytes:
    """Read the hub's public key from ``<data_dir>/hub.pub``. Blocking.

    Returns:
        The 32 raw bytes of the key.

    Raises:
        NotEnrolledError: the file is missing.
        EnrollmentCorruptError: the file is unreadable or not a base64 Ed25519 key.
    """
    path = Path(data_dir) / HUB_KEY_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise NotEnrolledError(path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrollmentCorruptError(path, f"cannot read: {exc}") from exc
    try:
        return decode_public_key(text)
    except ValueError as exc:
        raise EnrollmentCorruptError(path, str(exc)) from exc


def load_relay_public_keys(data_dir: str | os.PathLike[str]) -> list[bytes]:
    """Read the region's relay keys from ``<data_dir>/relays.pub`` (one per line). Blocking.

    Returns:
        The raw 32-byte keys; empty when the file is missing.

    Raises:
        EnrollmentCorruptError: the file is unreadable or holds a bad key.
    """
    path = Path(data_dir) / RELAY_KEYS_FILE
    try:
        lines = path.read_text(encoding="ascii").split()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrollmentCorruptError(path, f"cannot read: {exc}") from exc
    try:
        return [decode_public_key(line) for line in lines]
    except ValueError as exc:
        raise EnrollmentCorruptError(path, str(exc)) from exc
