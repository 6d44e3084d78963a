"""The shared, I/O-free core of NovaCron Edge."""

from __future__ import annotations

from sync._exceptions import (
    ClockSkewError,
    ConfigError,
    CrdtError,
    DecodeError,
    NovaCronError,
    OversizeError,
    ProtocolError,
    SignatureError,
    SyncError,
    TopicError,
    UnsupportedVersionError,
    WireError,
)

__all__ = [
    "ClockSkewError",
    "ConfigError",
    "CrdtError",
    "DecodeError",
    "NovaCronError",
    "OversizeError",
    "ProtocolError",
    "SignatureError",
    "SyncError",
    "TopicError",
    "UnsupportedVersionError",
    "WireError",
]
