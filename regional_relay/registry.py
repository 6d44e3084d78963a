"""The region's device registry: which devices a relay serves, and their keys.

The hub keeps one hub-signed LWW scope per region, ``region/<region>``, with one
entry per enrolled device: key ``device/<id>``, value (inside the
:mod:`sync.signed` wrapper) ``{"public_key": <base64 of the 32 raw Ed25519
bytes>}``. A device leaving the region (decommission, move) is a signed write of
``None``: signed scopes have no tombstones, so a relay in the middle can neither
forge nor erase an enrollment. The relay syncs the scope in its hub session,
checks every entry against the hub key (the same
:class:`~sync.signed.EntryVerifier` path as ``desired/*``), and keeps it in its
outbox like desired state, so a relay restarted while the hub is away still
knows its devices.

``devices_file`` (the static YAML registry) stays as an optional seed: a device
listed there is served until the hub's registry says otherwise; a registry
entry, once synced, always wins (``None`` removes even a seeded device).

:class:`DeviceRegistry` is pure: it turns registry entries into the effective
device key map and reports what changed, for :class:`~regional_relay.relay.Relay`
to act on (accept uplinks, add ``desired/<id>`` to its hub session, drop a
removed device's session).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sync._exceptions import NovaCronError
from sync.topics import validate_id

__all__ = [
    "DEVICE_KEY_PREFIX",
    "REGISTRY_PREFIX",
    "DeviceRegistry",
    "RegistryChange",
    "parse_registry_value",
    "registry_device",
    "registry_key",
    "registry_scope",
    "registry_value",
]

log = logging.getLogger(__name__)

REGISTRY_PREFIX: Final = "region/"
DEVICE_KEY_PREFIX: Final = "device/"
_KEY_LEN: Final = 32


def registry_scope(region: str) -> str:
    """The registry scope of ``region``: ``region/<region>``."""
    return f"{REGISTRY_PREFIX}{validate_id(region, what='region')}"


def registry_key(device: str) -> str:
    """The registry entry key of ``device``: ``device/<id>``."""
    return f"{DEVICE_KEY_PREFIX}{validate_id(device, what='device')}"


def registry_device(key: str) -> str | None:
    """The device id of a registry entry key, or None if the key is not one."""
    if not key.startswith(DEVICE_KEY_PREFIX):
        return None
    try:
        return validate_id(key[len(DEVICE_KEY_PREFIX) :], what="device")
    except NovaCronError:
        return None


def registry_value(public_key: bytes) -> dict[str, Any]:
    """The (unsigned) registry payload for a device's raw Ed25519 public key.

    Raises:
        ValueError: the key is not 32 bytes.
    """
    if len(public_key) != _KEY_LEN:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return {"public_key": base64.b64encode(public_key).decode("ascii")}


def parse_registry_value(payload: object) -> bytes | None:
    """The raw public key a verified registry payload carries; None for a removal.

    Raises:
        ValueError: the payload is neither None nor ``{"public_key": b64 of 32 bytes}``.
    """
    if payload is None:
        return None
    if type(payload) is not dict or payload.keys() != {"public_key"}:
        raise ValueError("registry value must be a map with the key public_key")
    text = payload["public_key"]
    if type(text) is not str:
        raise ValueError("public_key must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"public_key is not base64: {exc}") from exc
    if len(raw) != _KEY_LEN:
        raise ValueError("public_key is not 32 bytes")
    return raw


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """What one application of registry entries changed.

    Attributes:
        added: devices now served, or served with a new key: id -> raw key.
        removed: devices no longer served.
    """

    added: dict[str, bytes] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class DeviceRegistry:
    """The effective device key map: a static seed overridden by hub entries.

    Args:
        seed: the ``devices_file`` keys (device id -> raw public key).
    """

    def __init__(self, seed: Mapping[str, bytes] | None = None) -> None:
        self._seed = dict(seed or {})
        self._entries: dict[str, bytes | None] = {}
        self.malformed = 0
        """Registry entries ignored as malformed (signed by the hub, yet unusable)."""

    def keys(self) -> dict[str, bytes]:
        """Device id -> raw public key of every device served now."""
        out = dict(self._seed)
        for device, key in self._entries.items():
            if key is None:
                out.pop(device, None)
            else:
                out[device] = key
        return out

    def key(self, device: str) -> bytes | None:
        """The key ``device`` is served with, or None if it is not served."""
        if device in self._entries:
            return self._entries[device]
        return self._seed.get(device)

    def apply(self, entries: Iterable[tuple[str, Any]]) -> RegistryChange:
        """Apply verified registry entries ``(key, signed payload)``.

        Args:
            entries: the entries' keys and unwrapped payloads (see
                :func:`sync.signed.unwrap`); keys that are not ``device/<id>``
                and malformed payloads are skipped, counted and logged.

        Returns:
            The devices added (or re-keyed) and removed.
        """
        change = RegistryChange()
        for key, payload in entries:
            device = registry_device(key)
            try:
                new = parse_registry_value(payload)
            except ValueError as exc:
                device = None
                log.debug("registry entry %r: %s", key, exc)
            if device is None:
                self.malformed += 1
                log.warning("ignored registry entry %r: not device/<id> or malformed", key)
                continue
            old = self.key(device)
            self._entries[device] = new
            if new is None:
                if old is not None:
                    change.removed.add(device)
                    change.added.pop(device, None)
            elif new != old:
                change.added[device] = new
                change.removed.discard(device)
        return change
