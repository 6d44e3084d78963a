"""Enrollment wire format: request and answer models, hub errors. Pure, no I/O.

The network and file handling around it live in :mod:`edge_agent.enroll`, which
re-exports every public name; see there for the exception tree.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
)

from edge_agent._exceptions import EnrollError
from edge_agent.config import RelayEndpoint, validate_mqtt_id
from edge_agent.identity import decode_public_key
from firmware_profiles import PROFILE_NAME_PATTERN, Arch
from sync._exceptions import ConfigError
from sync.models import DeviceFacts

ENROLL_PATH: Final = "/api/v1/enroll"
"""Path of the enrollment endpoint below the hub's base URL."""

_REVEAL: Final = "reveal_secrets"
_SNIPPET: Final = 300


# --------------------------------------------------------------------------- errors
# EnrollError, NotEnrolledError and EnrollmentCorruptError live in edge_agent._exceptions
# (the running agent raises them without importing this module); the enrollment
# module re-exports them.


class AlreadyEnrolledError(EnrollError):
    """The data directory already holds an enrollment and ``force`` was not given.

    Attributes:
        path: the existing ``enrollment.json``.
        device_id: the enrolled device id, if the file could be read.
    """

    def __init__(self, path: Path, device_id: str | None) -> None:
        self.path = path
        self.device_id = device_id
        who = f"as {device_id!r} " if device_id else ""
        super().__init__(
            f"this device is already enrolled {who}({path}); pass --force to enroll again"
        )


class UnsupportedDeviceError(EnrollError):
    """The machine's architecture is none that NovaCron Edge supports.

    Attributes:
        machine: what :func:`platform.machine` reported.
    """

    def __init__(self, machine: str) -> None:
        self.machine = machine
        known = ", ".join(get_args(Arch))
        super().__init__(f"unsupported CPU architecture {machine!r} (supported: {known})")


class HubUnreachableError(EnrollError):
    """The hub could not be reached: connection, DNS, TLS or timeout.

    Attributes:
        url: the enrollment URL.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(f"cannot reach the hub at {url}: {reason}")


class MalformedResponseError(EnrollError):
    """The hub reported success with a body that is not a valid enrollment answer.

    Attributes:
        url: the enrollment URL.
        status: the HTTP status.
    """

    def __init__(self, url: str, status: int, reason: str) -> None:
        self.url = url
        self.status = status
        super().__init__(f"invalid answer from the hub at {url} (HTTP {status}): {reason}")


class HubResponseError(EnrollError):
    """The hub answered with an error status (RFC 7807 fields where it sent them).

    Attributes:
        url: the enrollment URL.
        status: the HTTP status.
        title: the problem title, or the HTTP reason phrase.
        detail: the problem detail, or a snippet of the body; may be empty.
        problem_type: the problem ``type`` URI; empty if none was sent.
    """

    def __init__(
        self, url: str, status: int, title: str, detail: str = "", problem_type: str = ""
    ) -> None:
        self.url = url
        self.status = status
        self.title = title
        self.detail = detail
        self.problem_type = problem_type
        text = f"{title}: {detail}" if detail else title
        super().__init__(f"hub answered {status} at {url}: {text}")


class HubRejectedError(HubResponseError):
    """The hub refused the enrollment with a 4xx: bad, spent or expired token, known key."""

    def __init__(
        self, url: str, status: int, title: str, detail: str = "", problem_type: str = ""
    ) -> None:
        super().__init__(url, status, title, detail, problem_type)
        text = f"{title}: {detail}" if detail else title
        self.args = (f"hub refused enrollment ({status}): {text}",)


# --------------------------------------------------------------------------- models


def _check_public_key(value: str) -> str:
    decode_public_key(value)
    return value


def _check_relay_url(value: str) -> str:
    try:
        RelayEndpoint.model_validate(value)
    except ValidationError as exc:
        raise ValueError(exc.errors(include_url=False)[0]["msg"]) from exc
    return value


PublicKeyB64 = Annotated[str, Field(max_length=64), AfterValidator(_check_public_key)]
"""An Ed25519 public key as base64 of its 32 raw bytes."""
MqttIdStr = Annotated[str, AfterValidator(validate_mqtt_id)]
RelayUrl = Annotated[str, Field(max_length=300), AfterValidator(_check_relay_url)]
"""A relay broker URL: ``mqtt://host[:port]`` or ``mqtts://host[:port]``."""


def _dump_secret(value: SecretStr, info: SerializationInfo) -> str:
    context = info.context
    if isinstance(context, Mapping) and context.get(_REVEAL):
        return value.get_secret_value()
    return str(value)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EnrollRequest(_Frozen):
    """Body of ``POST /api/v1/enroll``; :meth:`to_json` reveals the token."""

    token: SecretStr = Field(min_length=1, max_length=4096)
    public_key: PublicKeyB64
    facts: DeviceFacts
    profile: str = Field(pattern=PROFILE_NAME_PATTERN)

    @field_serializer("token", when_used="json")
    def _token(self, value: SecretStr, info: SerializationInfo) -> str:
        return _dump_secret(value, info)

    def to_json(self) -> dict[str, Any]:
        """The request as a JSON-ready mapping, with the token in clear."""
        return self.model_dump(mode="json", context={_REVEAL: True})


class MqttAccount(_Frozen):
    """The device's broker account, made by the hub at enrollment."""

    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(min_length=1, max_length=1024)

    @field_serializer("password", when_used="json")
    def _password(self, value: SecretStr, info: SerializationInfo) -> str:
        return _dump_secret(value, info)


class EnrollResponse(_Frozen):
    """What the hub answers to a successful enrollment."""

    device_id: MqttIdStr
    region: MqttIdStr
    relays: tuple[RelayUrl, ...] = Field(min_length=1, max_length=32)
    mqtt: MqttAccount
    hub_public_key: PublicKeyB64
    relay_public_keys: tuple[PublicKeyB64, ...] = ()
    """Keys of the region's relays, the agent's sync peers (may be rotated later)."""

    @field_validator("relays")
    @classmethod
    def _unique_relays(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        endpoints = [RelayEndpoint.model_validate(url) for url in value]
        if len({(e.host.lower(), e.port) for e in endpoints}) != len(endpoints):
            raise ValueError("relays must not repeat")
        return value

    @property
    def hub_public_key_bytes(self) -> bytes:
        """The hub's public key as 32 raw bytes (for :class:`sync.keys.KeyRing`)."""
        return base64.b64decode(self.hub_public_key)

    @property
    def relay_endpoints(self) -> tuple[RelayEndpoint, ...]:
        """The relays parsed as config endpoints, in failover order."""
        return tuple(RelayEndpoint.model_validate(url) for url in self.relays)


class Enrollment(EnrollResponse):
    """A stored enrollment: the hub's answer and what was sent to get it."""

    hub_url: str = Field(min_length=1, max_length=2048)
    profile: str = Field(pattern=PROFILE_NAME_PATTERN)
    device_public_key: PublicKeyB64
    device_key_id: str = Field(min_length=1, max_length=64)
    enrolled_at: AwareDatetime

    def to_json(self) -> dict[str, Any]:
        """The enrollment as a JSON-ready mapping, with the broker password in clear."""
        return self.model_dump(mode="json", context={_REVEAL: True})


# --------------------------------------------------------------------------- parsing


def enroll_url(hub_url: str) -> str:
    """Return the enrollment endpoint below ``hub_url``.

    Args:
        hub_url: the hub's base URL, ``http(s)://host[:port][/prefix]``.

    Raises:
        ConfigError: not an http(s) URL with a host, or with credentials, a query
            or a fragment.
    """
    parts = urlsplit(hub_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"must be an http:// or https:// URL with a host, got {hub_url!r}",
            source="<argv>",
            field="--hub",
        )
    if parts.username is not None or parts.query or parts.fragment:
        raise ConfigError(
            "must not carry credentials, a query or a fragment", source="<argv>", field="--hub"
        )
    try:
        parts.port  # noqa: B018 - raises on an invalid port
    except ValueError as exc:
        raise ConfigError(f"invalid port in {hub_url!r}", source="<argv>", field="--hub") from exc
    path = parts.path.rstrip("/") + ENROLL_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _problem_error(url: str, status: int, reason: str, body: bytes) -> HubResponseError:
    title, detail, problem_type = reason or f"HTTP {status}", "", ""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        if isinstance(doc.get("title"), str) and doc["title"]:
            title = doc["title"]
        if isinstance(doc.get("detail"), str):
            detail = doc["detail"]
        if isinstance(doc.get("type"), str):
            problem_type = doc["type"]
    elif body:
        detail = " ".join(body.decode("utf-8", "replace").split())
    if len(detail) > _SNIPPET:
        detail = detail[:_SNIPPET] + "..."
    cls = HubRejectedError if 400 <= status < 500 else HubResponseError
    return cls(url, status, title[:_SNIPPET], detail, problem_type[:_SNIPPET])


def parse_answer(url: str, status: int, reason: str, body: bytes | None) -> EnrollResponse:
    """Turn the hub's HTTP answer into an :class:`EnrollResponse` or an error.

    Args:
        url: the enrollment URL, for messages.
        status: the HTTP status.
        reason: the HTTP reason phrase.
        body: the body, or None if it was larger than the cap.

    Raises:
        HubRejectedError: a 4xx status.
        HubResponseError: any other status than 200 or 201.
        MalformedResponseError: 200/201 with a body that is too large, not JSON, or
            not a valid answer.
    """
    if status not in (200, 201):
        raise _problem_error(url, status, reason, body or b"")
    if body is None:
        raise MalformedResponseError(url, status, "body larger than the size cap")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedResponseError(url, status, f"not JSON ({exc})") from exc
    try:
        return EnrollResponse.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<body>'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        raise MalformedResponseError(url, status, problems) from exc
