"""Configuration of the cloud hub, loaded once from YAML at start.

Everything has a default: ``novacron hub serve`` with no file listens on
127.0.0.1:8090 with SQLite in the data directory and no MQTT broker (API only:
enrollment, deployments and rollouts are stored and placed, and desired state is
signed and kept until a broker is configured). A production hub names its broker,
its regions and where Mosquitto's account files live::

    listen: 0.0.0.0:8090
    data_dir: /var/lib/novacron-hub
    broker:
      url: mqtt://hub-broker.internal:1883
      credentials: {username: hub, password_file: /etc/novacron/hub.password}
    regions:
      eu-west:
        relay_id: relay-eu-west-1
        relay_public_key: 3q2+7w...base64 of 32 bytes...=
        relays: [mqtts://eu-west.example.net:8883]
    accounts:
      passwd_file: /etc/mosquitto/novacron.passwd
      acl_file: /etc/mosquitto/novacron.acl
      pid_file: /run/mosquitto/mosquitto.pid

Files in the data directory: ``hub.db`` (the fleet store), ``tokens.db`` (API
tokens, hashed), ``audit.db`` (the hash-chained audit log), ``hub.key`` (the
hub's Ed25519 signing key, made at first start, mode 0600) and ``hub.pub`` (its
public key, for relays and agents). Relative paths in a config file are relative
to the file's directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final

from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, model_validator

from edge_agent._enroll_wire import PublicKeyB64
from edge_agent.config import (
    Credentials,
    RelayEndpoint,
    _base_dir,
    _Frozen,
    _resolve_path,
    validate_mqtt_id,
)
from firmware_profiles._yamlio import read_yaml_mapping, validation_error
from sync._exceptions import ConfigError

__all__ = [
    "DEFAULT_HUB_DATA_DIR",
    "DEFAULT_LISTEN",
    "AccountsSettings",
    "HubBroker",
    "HubConfig",
    "RegionSettings",
    "load_hub_config",
    "parse_listen",
]

DEFAULT_LISTEN: Final = "127.0.0.1:8090"
DEFAULT_HUB_DATA_DIR: Final = Path("/var/lib/novacron-hub")

MqttId = Annotated[str, AfterValidator(validate_mqtt_id)]


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 picks a free one.

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _check_listen(value: str) -> str:
    parse_listen(value)
    return value


class HubBroker(_Frozen):
    """The hub's MQTT broker, where the regions' relays publish their batches."""

    url: RelayEndpoint = Field(description="mqtt://host:port or mqtts://host:port")
    credentials: Credentials | None = None
    keepalive_s: int = Field(default=30, ge=5, le=65535)


class RegionSettings(_Frozen):
    """One region: its relay (whose batches the hub accepts) and where its agents
    connect."""

    relay_id: MqttId
    relay_public_key: PublicKeyB64
    relays: tuple[RelayEndpoint, ...] = Field(
        min_length=1, max_length=32, description="broker URLs given to enrolling agents"
    )


class AccountsSettings(_Frozen):
    """Mosquitto password and ACL files the hub provisions device accounts in.

    The broker must load both files (``password_file`` and ``acl_file`` in its
    config); the hub reloads it with SIGHUP to the pid in ``pid_file``.
    """

    passwd_file: Path
    acl_file: Path
    pid_file: Path | None = None
    static_acl_file: Path | None = Field(
        default=None, description="ACL lines kept at the top (the relays' own accounts)"
    )


class HubConfig(_Frozen):
    """Everything the hub needs to know at start."""

    listen: Annotated[str, AfterValidator(_check_listen)] = DEFAULT_LISTEN
    data_dir: Path = DEFAULT_HUB_DATA_DIR
    store: str | None = Field(
        default=None, description="store URL; default sqlite in <data_dir>/hub.db"
    )
    key_path: Path | None = None
    broker: HubBroker | None = None
    regions: dict[MqttId, RegionSettings] = Field(default_factory=dict)
    accounts: AccountsSettings | None = None
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    lost_after_s: float = Field(default=300.0, gt=0, le=30 * 86_400)
    tick_interval_s: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: object, info: ValidationInfo) -> object:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        base = _base_dir(info)
        for key in ("data_dir", "key_path"):
            if data.get(key) is not None:
                data[key] = _resolve_path(data[key], base)
        accounts = data.get("accounts")
        if isinstance(accounts, Mapping):
            accounts = dict(accounts)
            for key in ("passwd_file", "acl_file", "pid_file", "static_acl_file"):
                if accounts.get(key) is not None:
                    accounts[key] = _resolve_path(accounts[key], base)
            data["accounts"] = accounts
        if isinstance(data.get("broker"), str):
            data["broker"] = {"url": data["broker"]}
        return data

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` as (host, port)."""
        return parse_listen(self.listen)

    @property
    def store_url(self) -> str:
        """The store URL (``store``, or the SQLite file in the data directory)."""
        return self.store or str(self.data_dir / "hub.db")

    @property
    def signing_key_path(self) -> Path:
        """The hub key file (``key_path``, or ``<data_dir>/hub.key``)."""
        return self.key_path or self.data_dir / "hub.key"


def load_hub_config(
    path: str | os.PathLike[str] | None = None,
    *,
    listen: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> HubConfig:
    """Read the hub config (or the defaults), then apply command-line overrides.

    Args:
        path: the YAML file, or None for the defaults.
        listen: ``--listen HOST:PORT``, overriding the file.
        data_dir: ``--data-dir``, overriding the file.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML or fails validation
            (the message names the file and the field), or an override is invalid
            (named as ``<argv>`` and the flag).
    """
    data: dict[str, object] = {}
    context: dict[str, object] = {}
    source = "<defaults>"
    if path is not None:
        file = Path(path)
        source = str(file)
        data = dict(read_yaml_mapping(file))
        context["base_dir"] = file.resolve().parent
    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(str(exc), source="<argv>", field="--listen") from exc
        data["listen"] = listen
    if data_dir is not None:
        data["data_dir"] = str(Path(data_dir).resolve())
    try:
        return HubConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise validation_error(exc, source=source) from exc
