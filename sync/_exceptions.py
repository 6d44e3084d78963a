"""Exception tree shared by every NovaCron Edge component.

::

    NovaCronError                      root of everything the project raises
    ├── ConfigError                    bad YAML / CLI input (file, field)
    └── SyncError                      base of the sync core
        ├── ClockSkewError             remote HLC too far ahead of local time
        ├── WireError                  bytes that are not a valid envelope
        │   ├── DecodeError            malformed msgpack / structure / caps
        │   │   └── OversizeError      payload larger than the size cap
        │   ├── UnsupportedVersionError
        │   └── SignatureError         bad or unknown signature / key id
        ├── TopicError                 invalid MQTT topic or id
        ├── ProtocolError              a well-formed message that breaks the protocol
        └── CrdtError                  an invalid delta or state

Component packages (``edge_agent``, ``regional_relay``, ``cloud_hub``,
``simulator``) derive their own bases from :class:`NovaCronError`.
"""

from __future__ import annotations


class NovaCronError(Exception):
    """Root of every exception NovaCron Edge raises on purpose."""


class ConfigError(NovaCronError):
    """Invalid configuration: a YAML file, a manifest or a CLI argument.

    Attributes:
        source: the file (or ``"<argv>"``) the bad value came from.
        field: dotted path of the offending field, when known.
    """

    def __init__(self, message: str, *, source: str = "", field: str = "") -> None:
        self.source = source
        self.field = field
        parts = [p for p in (source, field) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class SyncError(NovaCronError):
    """Base of every error raised by the ``sync`` core."""


class ClockSkewError(SyncError):
    """A remote hybrid-logical-clock timestamp is too far ahead of local time.

    Attributes:
        remote_ms: physical milliseconds of the remote timestamp.
        local_ms: local physical time in milliseconds when it was seen.
        max_skew_ms: the bound that was exceeded.
    """

    def __init__(self, remote_ms: int, local_ms: int, max_skew_ms: int) -> None:
        self.remote_ms = remote_ms
        self.local_ms = local_ms
        self.max_skew_ms = max_skew_ms
        super().__init__(
            f"remote clock {remote_ms - local_ms} ms ahead of local time "
            f"(max skew {max_skew_ms} ms)"
        )


class WireError(SyncError):
    """Bytes received from the network that cannot be accepted."""


class DecodeError(WireError):
    """Malformed msgpack, a wrong structure, or a decoder cap exceeded."""


class OversizeError(DecodeError):
    """A payload larger than the configured size cap."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"payload of {size} bytes exceeds the {limit}-byte cap")


class UnsupportedVersionError(WireError):
    """An envelope whose wire version this build does not speak."""

    def __init__(self, version: object) -> None:
        self.version = version
        super().__init__(f"unsupported envelope version {version!r}")


class SignatureError(WireError):
    """A missing, unknown-key or invalid Ed25519 signature."""


class TopicError(SyncError):
    """An invalid MQTT topic, or an id that may not appear in one."""


class ProtocolError(SyncError):
    """A well-formed message that violates the sync protocol."""


class CrdtError(SyncError):
    """An invalid CRDT delta or state."""
