"""The device's Ed25519 identity key: made once at first start, loaded ever after.

The key is the device's identity towards the hub (enrollment registers its public
half) and signs what the device sends. It lives in ``<data_dir>/device.key`` unless
the agent config names another ``key_path``; the file is written atomically with
mode 0600 by :func:`sync.keys.save_private_key`.

These are blocking file operations: call them before the event loop runs or
through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from sync._exceptions import ConfigError
from sync.keys import Signer, generate_private_key, save_private_key

__all__ = ["DEVICE_KEY_NAME", "load_or_create_device_key"]

logger = logging.getLogger(__name__)

DEVICE_KEY_NAME: Final = "device.key"
"""File name of the device key inside the data directory (the config's default)."""


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
