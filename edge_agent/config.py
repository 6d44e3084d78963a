"""Configuration of one edge agent, loaded once from YAML at start.

A minimal config names the device, its region, its data directory, its firmware
profile and at least one relay broker::

    device_id: gw-0042
    region: eu-west
    data_dir: /var/lib/novacron
    profile: raspberry-pi-4
    relays: [mqtts://relay-eu-west-1.example.net:8883]

Everything else has a default. Three defaults come from the firmware profile: the
enabled ``drivers`` (all the profile offers), ``quotas.journal_quota_mb`` and
``link.batch_max`` (the profile's ``sync_batch_size``). They are filled in when the
config is validated with the profile in the validation context, which is what
:func:`load_agent_config` and :meth:`AgentConfig.for_profile` do; validated without a
profile, those fields must be given explicitly.

Relative paths in a config file are relative to the file's directory.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from firmware_profiles import PROFILE_NAME_PATTERN, DriverName, FirmwareProfile, load_profile
from firmware_profiles._yamlio import read_yaml_mapping, validation_error
from sync._exceptions import ConfigError

__all__ = [
    "ALWAYS_AVAILABLE_DRIVERS",
    "AgentConfig",
    "Credentials",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_DATA_DIR",
    "LinkSettings",
    "Quotas",
    "RelayEndpoint",
    "SupervisorSettings",
    "check_against_profile",
    "example_agent_config",
    "load_agent_config",
    "validate_mqtt_id",
]

DEFAULT_CONFIG_PATH = Path("/etc/novacron/agent.yaml")
DEFAULT_DATA_DIR = Path("/var/lib/novacron")

# Drivers that need nothing from the hardware, allowed whatever the profile says:
# the simulator runs real agents with the ``sim`` driver on every device class.
ALWAYS_AVAILABLE_DRIVERS: frozenset[str] = frozenset({"sim"})

_MQTT_ID_FORBIDDEN = frozenset("#+/$")
_MQTT_ID_MAX = 64
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def validate_mqtt_id(value: str) -> str:
    """Check that ``value`` can be used as one level of an MQTT topic.

    Args:
        value: a device id or region name.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: empty, longer than 64 characters, or containing ``#``, ``+``,
            ``/``, ``$``, whitespace or a control character.
    """
    if not value:
        raise ValueError("must not be empty")
    if len(value) > _MQTT_ID_MAX:
        raise ValueError(f"must be at most {_MQTT_ID_MAX} characters")
    for char in value:
        if char in _MQTT_ID_FORBIDDEN:
            raise ValueError(f"must not contain {char!r} (an MQTT wildcard or separator)")
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Cs"):
            raise ValueError("must not contain whitespace or control characters")
    return value


MqttId = Annotated[str, AfterValidator(validate_mqtt_id)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context
    if isinstance(context, Mapping):
        base = context.get("base_dir")
        if isinstance(base, Path):
            return base
    return None


def _resolve_path(value: object, base: Path | None) -> object:
    """Make a relative path absolute against ``base``; leave anything else for pydantic."""
    if base is None or not isinstance(value, str | os.PathLike):
        return value
    path = Path(value)
    return path if path.is_absolute() else base / path


class RelayEndpoint(_Frozen):
    """One relay MQTT broker; written in YAML as ``mqtt://host:port`` or ``mqtts://``."""

    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    tls: bool

    @model_validator(mode="before")
    @classmethod
    def _parse_url(cls, data: object) -> object:
        if not isinstance(data, str):
            return data
        parts = urlsplit(data.strip())
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"relay URL {data!r} must start with mqtt:// or mqtts://")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put broker credentials under 'credentials', not in the relay URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"relay URL {data!r} must not have a path, query or fragment")
        if not parts.hostname:
            raise ValueError(f"relay URL {data!r} has no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"relay URL {data!r} has an invalid port") from exc
        return {
            "host": parts.hostname,
            "port": port if port is not None else _DEFAULT_PORTS[parts.scheme],
            "tls": parts.scheme == "mqtts",
        }

    @property
    def url(self) -> str:
        """The endpoint as a URL, e.g. ``mqtts://relay.example.net:8883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


class Credentials(_Frozen):
    """Broker account of the device: a password inline or in a file (not both)."""

    username: str = Field(min_length=1, max_length=256)
    password: SecretStr | None = None
    password_file: Path | None = None

    @field_validator("password_file", mode="before")
    @classmethod
    def _resolve(cls, value: object, info: ValidationInfo) -> object:
        return _resolve_path(value, _base_dir(info))

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("give exactly one of password or password_file")
        return self

    def read_password(self) -> str:
        """Return the password, reading ``password_file`` if that is how it is given.

        Blocking file I/O: call it once at start, before the event loop runs or from
        a thread. Trailing newlines in the file are ignored.

        Raises:
            ConfigError: the password file cannot be read.
        """
        if self.password is not None:
            return self.password.get_secret_value()
        assert self.password_file is not None  # guaranteed by the validator
        try:
            return self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read password file: {exc}",
                source=str(self.password_file),
                field="credentials.password_file",
            ) from exc


class Quotas(_Frozen):
    """Local limits of the agent."""

    journal_quota_mb: int = Field(
        ge=1, description="journal size cap; defaults to the firmware profile's quota"
    )
    max_workloads: int = Field(default=32, ge=1, le=10_000)


class _Backoff(_Frozen):
    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=60.0, gt=0, le=86_400)
    backoff_jitter: float = Field(
        default=0.2, ge=0, le=1, description="random spread as a fraction of each delay"
    )

    @model_validator(mode="after")
    def _check_backoff(self) -> Self:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must not be below backoff_initial_s")
        return self


class SupervisorSettings(_Backoff):
    """How the workload supervisor reconciles and restarts (defaults for workloads)."""

    reconcile_interval_s: float = Field(default=15.0, gt=0, le=3600)
    max_restart_attempts: int = Field(default=5, ge=1, le=10_000)


class LinkSettings(_Backoff):
    """How the agent talks to its relay over MQTT."""

    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=120.0, gt=0, le=86_400)
    batch_max: int = Field(
        ge=1, le=100_000, description="max items per batch; defaults to the profile's"
    )
    ack_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    keepalive_s: int = Field(default=30, ge=5, le=65535)


class AgentConfig(_Frozen):
    """Everything one edge agent needs to know at start."""

    device_id: MqttId
    region: MqttId
    data_dir: Path
    profile: str = Field(pattern=PROFILE_NAME_PATTERN, description="firmware profile name")
    relays: tuple[RelayEndpoint, ...] = Field(
        min_length=1, description="relay brokers in failover order"
    )
    credentials: Credentials | None = None
    key_path: Path
    drivers: tuple[DriverName, ...] = Field(min_length=1)
    quotas: Quotas
    podman_url: str = Field(default="unix:///run/podman/podman.sock", min_length=1)
    libvirt_uri: str = Field(default="qemu:///system", min_length=1)
    control_socket: Path
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    link: LinkSettings

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: object, info: ValidationInfo) -> object:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        base = _base_dir(info)
        for key in ("data_dir", "key_path", "control_socket"):
            if key in data:
                data[key] = _resolve_path(data[key], base)
        data_dir = data.get("data_dir")
        if isinstance(data_dir, str | os.PathLike):
            data.setdefault("key_path", Path(data_dir) / "device.key")
            data.setdefault("control_socket", Path(data_dir) / "agent.sock")
        profile = info.context.get("profile") if isinstance(info.context, Mapping) else None
        if isinstance(profile, FirmwareProfile):
            data.setdefault("drivers", profile.drivers)
            data["quotas"] = _with_default(
                data.get("quotas"), "journal_quota_mb", profile.journal_quota_mb
            )
            data["link"] = _with_default(data.get("link"), "batch_max", profile.sync_batch_size)
        return data

    @field_validator("podman_url")
    @classmethod
    def _check_podman_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("unix", "tcp", "ssh", "http"):
            raise ValueError("must be a unix://, tcp://, ssh:// or http:// URL")
        return value

    @field_validator("libvirt_uri")
    @classmethod
    def _check_libvirt_uri(cls, value: str) -> str:
        if ":" not in value or not urlsplit(value).scheme:
            raise ValueError("must be a libvirt URI such as qemu:///system")
        return value

    @field_validator("drivers")
    @classmethod
    def _unique_drivers(cls, value: tuple[DriverName, ...]) -> tuple[DriverName, ...]:
        if len(set(value)) != len(value):
            raise ValueError("drivers must not repeat")
        return value

    @field_validator("relays")
    @classmethod
    def _unique_relays(cls, value: tuple[RelayEndpoint, ...]) -> tuple[RelayEndpoint, ...]:
        seen = {(r.host.lower(), r.port) for r in value}
        if len(seen) != len(value):
            raise ValueError("relays must not repeat")
        return value

    @classmethod
    def for_profile(
        cls,
        data: Mapping[str, Any],
        profile: FirmwareProfile,
        *,
        base_dir: Path | None = None,
        source: str = "",
    ) -> AgentConfig:
        """Validate ``data`` with defaults from, and checks against, ``profile``.

        Args:
            data: the config as a mapping (e.g. parsed YAML).
            profile: the firmware profile named by ``data["profile"]``.
            base_dir: directory that relative paths are relative to.
            source: where ``data`` came from, for error messages.

        Raises:
            pydantic.ValidationError: the data is invalid.
            ConfigError: the data is valid but does not fit the profile.
        """
        context: dict[str, Any] = {"profile": profile}
        if base_dir is not None:
            context["base_dir"] = base_dir
        config = cls.model_validate(data, context=context)
        check_against_profile(config, profile, source=source)
        return config


def _with_default(section: object, key: str, value: object) -> object:
    if section is None:
        return {key: value}
    if isinstance(section, Mapping):
        return {key: value, **section}
    return section  # a model instance or a wrong type: leave it to validation


def check_against_profile(
    config: AgentConfig, profile: FirmwareProfile, *, source: str = ""
) -> None:
    """Check that ``config`` fits the device class ``profile``.

    Args:
        config: a validated agent config.
        profile: the firmware profile of the device.
        source: where the config came from, for error messages.

    Raises:
        ConfigError: the profile name differs, a driver is not available on the
            profile, or the journal quota does not fit the profile's storage.
    """
    if config.profile != profile.name:
        raise ConfigError(
            f"config names profile {config.profile!r} but was checked against {profile.name!r}",
            source=source,
            field="profile",
        )
    allowed = set(profile.drivers) | ALWAYS_AVAILABLE_DRIVERS
    for index, driver in enumerate(config.drivers):
        if driver not in allowed:
            raise ConfigError(
                f"driver {driver!r} is not available on profile {profile.name!r} "
                f"(available: {', '.join(sorted(allowed))})",
                source=source,
                field=f"drivers[{index}]",
            )
    if config.quotas.journal_quota_mb >= profile.storage_mb:
        raise ConfigError(
            f"{config.quotas.journal_quota_mb} MB must be below the storage of profile "
            f"{profile.name!r} ({profile.storage_mb} MB)",
            source=source,
            field="quotas.journal_quota_mb",
        )


def load_agent_config(
    path: str | os.PathLike[str], *, profile_dirs: Iterable[str | os.PathLike[str]] = ()
) -> AgentConfig:
    """Read, validate and check an agent config file against its firmware profile.

    Args:
        path: the YAML config file.
        profile_dirs: extra firmware profile directories, searched before the
            built-in ones.

    Returns:
        The validated config, with profile-derived defaults filled in.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, not a mapping, names
            an unknown profile, or fails validation; the error names the file and
            the dotted field.
    """
    file = Path(path)
    source = str(file)
    data = read_yaml_mapping(file)
    name = data.get("profile")
    if name is None:
        raise ConfigError("Field required", source=source, field="profile")
    if not isinstance(name, str) or not re.match(PROFILE_NAME_PATTERN, name):
        raise ConfigError(
            f"must be a firmware profile name such as 'raspberry-pi-4', got {name!r}",
            source=source,
            field="profile",
        )
    try:
        profile = load_profile(name, profile_dirs)
    except ConfigError as exc:
        raise ConfigError(str(exc), source=source, field="profile") from exc
    try:
        return AgentConfig.for_profile(data, profile, base_dir=file.resolve().parent, source=source)
    except ValidationError as exc:
        raise validation_error(exc, source=source) from exc


_EXAMPLE = """\
# NovaCron Edge agent configuration.
# Only device_id, region, data_dir, profile and relays are required; every other
# setting below shows its default. Relative paths are relative to this file.

# Device identity, as given at enrollment. 1-64 characters, no '#', '+', '/',
# '$' or whitespace (ids are MQTT topic levels).
device_id: {device_id}
region: {region}

# Where the journal, the device key and the control socket live (mode 0700).
data_dir: {data_dir}

# Firmware profile (device class); see `novacron profiles list`.
profile: {profile}

# Relay brokers in failover order: mqtt://host:port or mqtts://host:port.
relays:
  - {relay}

# Broker account of this device; use password_file rather than password.
# credentials:
#   username: {device_id}
#   password_file: {data_dir}/broker.password

# Ed25519 device key, made at install (default: <data_dir>/device.key).
# key_path: {data_dir}/device.key

# Workload drivers to enable; must be offered by the profile ('sim' always is).
# Default: every driver of the profile.
# drivers: [process, podman]

quotas:
  # Journal size cap in MB; default: the profile's journal_quota_mb.
  # journal_quota_mb: 512
  max_workloads: 32

podman_url: unix:///run/podman/podman.sock
libvirt_uri: qemu:///system

# Local control socket for offline status/stop/start (default: <data_dir>/agent.sock).
# control_socket: {data_dir}/agent.sock

supervisor:
  reconcile_interval_s: 15.0
  max_restart_attempts: 5
  backoff_initial_s: 1.0
  backoff_max_s: 60.0
  backoff_jitter: 0.2

link:
  backoff_initial_s: 1.0
  backoff_max_s: 120.0
  backoff_jitter: 0.2
  # Max items per sync batch; default: the profile's sync_batch_size.
  # batch_max: 200
  ack_timeout_s: 30.0
  keepalive_s: 30
"""


def example_agent_config(
    *,
    device_id: str = "gw-0001",
    region: str = "default",
    data_dir: Path = DEFAULT_DATA_DIR,
    profile: str = "generic-x86_64",
    relay: str = "mqtt://localhost:1883",
) -> str:
    """A commented starting config, e.g. for ``novacron agent install``.

    Args:
        device_id: the device id to write.
        region: the region to write.
        data_dir: the data directory to write.
        profile: the firmware profile name to write.
        relay: the one relay URL to write.

    Returns:
        YAML text that :func:`load_agent_config` accepts as it is.
    """
    return _EXAMPLE.format(
        device_id=device_id, region=region, data_dir=data_dir, profile=profile, relay=relay
    )
