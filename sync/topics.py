"""MQTT topic scheme: build, parse and validate.

::

    nc/v1/r/<region>/d/<device>/up      agent -> relay
    nc/v1/r/<region>/d/<device>/down    relay -> agent
    nc/v1/r/<region>/d/<device>/state   retained birth/death (LWT)
    nc/v1/hub/r/<region>/up             relay -> hub
    nc/v1/hub/r/<region>/down           hub -> relay
    nc/v1/hub/r/<region>/state          retained relay birth/death (LWT)

Ids (regions, devices) are 1..64 Unicode characters (so at most 256 UTF-8 bytes,
far below MQTT's 65,535-byte topic limit) and may not contain the MQTT
separators and wildcards ``/``, ``+``, ``#``, the ``$`` that marks broker-internal
topics, NUL, whitespace, control or invisible format characters (Unicode
categories Cc, Cf, Zs, Zl, Zp), or lone surrogates (not encodable as UTF-8).
Because ids can never contain ``/`` or wildcards, every topic built here names
exactly one device or region, and the parser is an exact inverse of the builders.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final, Literal, cast

from sync._exceptions import TopicError

__all__ = [
    "MAX_ID_LEN",
    "TOPIC_PREFIX",
    "DeviceKind",
    "HubKind",
    "ParsedTopic",
    "Tier",
    "device_topic",
    "hub_downlink_filter",
    "hub_topic",
    "hub_uplink_filter",
    "parse_topic",
    "region_downlink_filter",
    "region_state_filter",
    "region_uplink_filter",
    "validate_id",
]

TOPIC_PREFIX: Final = "nc/v1"
MAX_ID_LEN: Final = 64
"""Longest accepted id, in Unicode characters."""

DeviceKind = Literal["up", "down", "state"]
HubKind = Literal["up", "down", "state"]
Tier = Literal["device", "hub"]

_DEVICE_KINDS: Final = frozenset({"up", "down", "state"})
_HUB_KINDS: Final = frozenset({"up", "down", "state"})
_FORBIDDEN_CHARS: Final = frozenset("/+#$\x00")
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
# Fast path for the common case; anything else goes through the full check.
_SAFE_ASCII: Final = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


def validate_id(value: str | bytes, *, what: str = "id") -> str:
    """Check that ``value`` may be used as a region or device id in a topic.

    Args:
        value: the id, as str or as UTF-8 bytes.
        what: what the id is, for the error message (``"region"``, ``"device"``).

    Returns:
        The id as str.

    Raises:
        TopicError: the id is empty, too long, not valid UTF-8, or contains a
            forbidden character.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TopicError(f"{what} is not valid UTF-8") from exc
    elif not isinstance(value, str):
        raise TopicError(f"{what} must be str or bytes, not {type(value).__name__}")
    if _SAFE_ASCII.fullmatch(value):
        return value
    if not value:
        raise TopicError(f"{what} is empty")
    if len(value) > MAX_ID_LEN:
        raise TopicError(f"{what} is {len(value)} characters long (max {MAX_ID_LEN})")
    for ch in value:
        if ch in _FORBIDDEN_CHARS:
            raise TopicError(f"{what} {value!r} contains forbidden character {ch!r}")
        category = unicodedata.category(ch)
        if category in _FORBIDDEN_CATEGORIES:
            if category == "Cs":
                raise TopicError(f"{what} {value!r} is not valid UTF-8 (lone surrogate)")
            raise TopicError(f"{what} {value!r} contains whitespace or control character {ch!r}")
    return value


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic of the NovaCron scheme, taken apart.

    Attributes:
        tier: ``"device"`` for ``nc/v1/r/...`` topics, ``"hub"`` for
            ``nc/v1/hub/...`` topics.
        region: the region id.
        device: the device id, or None on hub topics.
        kind: ``"up"``, ``"down"`` or (device tier only) ``"state"``.
    """

    tier: Tier
    region: str
    device: str | None
    kind: DeviceKind

    @property
    def topic(self) -> str:
        """Rebuild the topic string."""
        if self.device is None:
            return f"{TOPIC_PREFIX}/hub/r/{self.region}/{self.kind}"
        return f"{TOPIC_PREFIX}/r/{self.region}/d/{self.device}/{self.kind}"


def device_topic(region: str, device: str, kind: DeviceKind) -> str:
    """Return ``nc/v1/r/<region>/d/<device>/<kind>``.

    Raises:
        TopicError: an invalid id or kind.
    """
    if kind not in _DEVICE_KINDS:
        raise TopicError(f"device topic kind must be up, down or state, not {kind!r}")
    region = validate_id(region, what="region")
    device = validate_id(device, what="device")
    return f"{TOPIC_PREFIX}/r/{region}/d/{device}/{kind}"


def hub_topic(region: str, kind: HubKind) -> str:
    """Return ``nc/v1/hub/r/<region>/<kind>``.

    Raises:
        TopicError: an invalid id or kind.
    """
    if kind not in _HUB_KINDS:
        raise TopicError(f"hub topic kind must be up or down, not {kind!r}")
    region = validate_id(region, what="region")
    return f"{TOPIC_PREFIX}/hub/r/{region}/{kind}"


def region_uplink_filter(region: str) -> str:
    """Return ``nc/v1/r/<region>/d/+/up``: what a relay subscribes to."""
    return f"{TOPIC_PREFIX}/r/{validate_id(region, what='region')}/d/+/up"


def region_state_filter(region: str) -> str:
    """Return ``nc/v1/r/<region>/d/+/state``: every device's birth/death."""
    return f"{TOPIC_PREFIX}/r/{validate_id(region, what='region')}/d/+/state"


def region_downlink_filter(region: str) -> str:
    """Return ``nc/v1/r/<region>/d/+/down`` (monitoring, tests)."""
    return f"{TOPIC_PREFIX}/r/{validate_id(region, what='region')}/d/+/down"


def hub_uplink_filter() -> str:
    """Return ``nc/v1/hub/r/+/up``: what the hub subscribes to."""
    return f"{TOPIC_PREFIX}/hub/r/+/up"


def hub_downlink_filter(region: str) -> str:
    """Return ``nc/v1/hub/r/<region>/down``: what a region's relay subscribes to."""
    return hub_topic(region, "down")


def parse_topic(topic: str | bytes) -> ParsedTopic:
    """Take a concrete topic of the scheme apart, validating every id.

    Args:
        topic: the topic, as str or UTF-8 bytes; filters with wildcards are
            refused.

    Returns:
        The parsed topic; ``parsed.topic == topic``.

    Raises:
        TopicError: the topic is not valid UTF-8, does not follow the scheme, or
            holds an invalid id.
    """
    if isinstance(topic, bytes):
        try:
            topic = topic.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TopicError("topic is not valid UTF-8") from exc
    elif not isinstance(topic, str):
        raise TopicError(f"topic must be str or bytes, not {type(topic).__name__}")
    parts = topic.split("/")
    match parts:
        case ["nc", "v1", "r", region, "d", device, kind] if kind in _DEVICE_KINDS:
            return ParsedTopic(
                "device",
                validate_id(region, what="region"),
                validate_id(device, what="device"),
                cast("DeviceKind", kind),
            )
        case ["nc", "v1", "hub", "r", region, kind] if kind in _HUB_KINDS:
            return ParsedTopic(
                "hub", validate_id(region, what="region"), None, cast("DeviceKind", kind)
            )
        case _:
            raise TopicError(f"topic {topic[:200]!r} does not follow the nc/v1 scheme")
