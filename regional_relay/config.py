"""Configuration of one regional relay, loaded once from YAML at start.

A minimal config names the relay, its region, its data directory and the broker
its agents use::

    relay_id: relay-eu-west-1
    region: eu-west
    data_dir: /var/lib/novacron-relay
    downstream:
      url: mqtt://localhost:1883
      credentials: {username: relay, password_file: /etc/novacron/relay.password}

``upstream`` (the hub's broker) defaults to the downstream broker: one broker can
carry both the region's topics and the hub topics. Everything else has a default;
:func:`example_relay_config` writes them all out with comments. Relative paths in a
config file are relative to the file's directory.

Trust material lives in files next to the data (see DESIGN.md, "Trust"):

* ``key_path`` (default ``<data_dir>/relay.key``): the relay's own Ed25519 key,
  made at first start (:func:`load_relay_key`); it signs the hub batches.
* ``hub_key_path`` (default ``<data_dir>/hub.pub``): the hub's public key, base64
  of its 32 raw bytes on one line (:func:`read_hub_key`); the relay forwards no
  desired-state delta that this key did not sign.
* ``devices_file`` (optional): a YAML mapping of device id to base64 Ed25519
  public key (:func:`read_device_keys`), the static device registry until the hub
  syncs it.

Batch size is bounded so that a hub batch always fits the 256 KiB envelope cap of
the wire format: ``batch.max_bytes`` counts the devices' envelope bytes and
``batch.max_items`` times :data:`BATCH_ITEM_OVERHEAD` bounds the framing around
them, plus :data:`BATCH_ENVELOPE_OVERHEAD` for the relay's own envelope.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal, Self

from pydantic import (
    AfterValidator,
    Field,
    RootModel,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Shared with the agent: the same URL and credential rules for every broker, the
# same relative-path resolution and backoff model. (Private names: see the report
# to the lead about moving them to a shared module.)
from edge_agent._enroll_wire import PublicKeyB64
from edge_agent.config import (
    Credentials,
    RelayEndpoint,
    _Backoff,
    _base_dir,
    _Frozen,
    _resolve_path,
    validate_mqtt_id,
)
from edge_agent.identity import decode_public_key
from firmware_profiles._yamlio import read_yaml_mapping, validation_error
from sync._exceptions import ConfigError
from sync._msgpack_strict import DEFAULT_LIMITS
from sync.keys import Signer

__all__ = [
    "BATCH_ENVELOPE_OVERHEAD",
    "BATCH_ITEM_OVERHEAD",
    "BatchSettings",
    "BrokerSettings",
    "DEFAULT_RELAY_CONFIG_PATH",
    "DEFAULT_RELAY_DATA_DIR",
    "DownsampleSettings",
    "OUTBOX_FILE",
    "OverflowPolicy",
    "OutboxSettings",
    "PresenceSettings",
    "ReconnectSettings",
    "RelayConfig",
    "ResendSettings",
    "example_relay_config",
    "load_relay_config",
    "load_relay_key",
    "read_device_keys",
    "read_hub_key",
]

DEFAULT_RELAY_CONFIG_PATH: Final = Path("/etc/novacron/relay.yaml")
DEFAULT_RELAY_DATA_DIR: Final = Path("/var/lib/novacron-relay")
OUTBOX_FILE: Final = "outbox.db"
"""File name of the outbox inside the data directory."""

MAX_ENVELOPE_BYTES: Final = DEFAULT_LIMITS.max_size
"""The wire format's envelope size cap (256 KiB), which a hub batch must fit."""
BATCH_ITEM_OVERHEAD: Final = 96
"""Bytes of batch framing allowed per item (device id up to 64, kind, headers)."""
BATCH_ENVELOPE_OVERHEAD: Final = 1024
"""Bytes allowed for the relay envelope around a batch (keys, ids, signature)."""

OverflowPolicy = Literal["refuse-metrics", "deltas-only"]
"""What the outbox does at its quota; see :class:`OutboxSettings`."""

MqttId = Annotated[str, AfterValidator(validate_mqtt_id)]


class BrokerSettings(_Frozen):
    """One MQTT broker the relay connects to."""

    url: RelayEndpoint = Field(description="mqtt://host:port or mqtts://host:port")
    credentials: Credentials | None = None
    keepalive_s: int = Field(default=30, ge=5, le=65535)


class BatchSettings(_Frozen):
    """Bounds of one hub batch; a batch is sent when any bound is reached."""

    max_items: int = Field(default=500, ge=1, le=10_000)
    max_bytes: int = Field(
        default=200 * 1024, ge=1024, description="device envelope bytes per batch"
    )
    max_delay_ms: int = Field(
        default=200, ge=0, le=60_000, description="longest wait to fill a batch"
    )

    @model_validator(mode="after")
    def _fits_envelope(self) -> Self:
        worst = self.max_bytes + self.max_items * BATCH_ITEM_OVERHEAD + BATCH_ENVELOPE_OVERHEAD
        if worst > MAX_ENVELOPE_BYTES:
            room = MAX_ENVELOPE_BYTES - self.max_items * BATCH_ITEM_OVERHEAD
            raise ValueError(
                f"a batch of max_items={self.max_items} and max_bytes={self.max_bytes} "
                f"could exceed the {MAX_ENVELOPE_BYTES}-byte envelope cap; with "
                f"{self.max_items} items max_bytes must be at most "
                f"{room - BATCH_ENVELOPE_OVERHEAD}"
            )
        return self


class OutboxSettings(_Frozen):
    """The durable outbox's size quota and what happens when it is reached.

    Overflow policies (items over quota are never evicted: what is stored stays
    until the hub acknowledges it; refused items are not acknowledged to the
    agent, which keeps them in its journal and sends them again later):

    * ``refuse-metrics`` (default): at quota, ``metric`` and ``agg`` items are
      refused (counted in ``refused_metrics``); deltas, events and presence are
      still stored (counted in ``over_quota_deltas`` / ``over_quota_other``).
    * ``deltas-only``: at quota, everything but state deltas is refused
      (``refused_metrics`` / ``refused_other``); for small disks.
    """

    quota_mb: int = Field(default=512, ge=1, le=1 << 20)
    overflow: OverflowPolicy = "refuse-metrics"
    integrity_check: Literal["integrity", "quick", "none"] = Field(
        default="integrity", description="SQLite check at open; see the journal"
    )

    @property
    def quota_bytes(self) -> int:
        """The quota in bytes."""
        return self.quota_mb << 20


class ResendSettings(_Backoff):
    """How hub batches that got no application-level ACK are sent again."""

    ack_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    max_in_flight: int = Field(default=8, ge=1, le=1024, description="unacked batches")
    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=60.0, gt=0, le=86_400)


class ReconnectSettings(_Backoff):
    """Reconnect backoff towards either broker (jittered, so a healed region does
    not reconnect in a storm)."""

    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=60.0, gt=0, le=86_400)


class PresenceSettings(_Frozen):
    """Region presence summaries sent to the hub."""

    summary_interval_s: float = Field(default=30.0, gt=0, le=86_400)


class DownsampleSettings(_Frozen):
    """Optional downsampling of metric streams into per-interval min/max/mean/count."""

    interval_s: int = Field(default=60, ge=1, le=86_400)
    streams: tuple[MqttId, ...] = Field(default=("metrics",), min_length=1)


class RelayConfig(_Frozen):
    """Everything one regional relay needs to know at start."""

    relay_id: MqttId
    region: MqttId
    data_dir: Path
    downstream: BrokerSettings
    upstream: BrokerSettings
    key_path: Path
    hub_key_path: Path
    devices_file: Path | None = None
    batch: BatchSettings = Field(default_factory=BatchSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    resend: ResendSettings = Field(default_factory=ResendSettings)
    presence: PresenceSettings = Field(default_factory=PresenceSettings)
    downsample: DownsampleSettings | None = None
    reconnect: ReconnectSettings = Field(default_factory=ReconnectSettings)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: object, info: ValidationInfo) -> object:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        base = _base_dir(info)
        for key in ("data_dir", "key_path", "hub_key_path", "devices_file"):
            if data.get(key) is not None:
                data[key] = _resolve_path(data[key], base)
        data_dir = data.get("data_dir")
        if isinstance(data_dir, str | os.PathLike):
            data.setdefault("key_path", Path(data_dir) / "relay.key")
            data.setdefault("hub_key_path", Path(data_dir) / "hub.pub")
        if "downstream" in data and data.get("upstream") is None:
            data["upstream"] = data["downstream"]
        return data

    @field_validator("downstream", "upstream", mode="before")
    @classmethod
    def _url_shorthand(cls, value: object) -> object:
        # ``downstream: mqtt://host:1883`` is accepted for a broker without account.
        return {"url": value} if isinstance(value, str) else value

    @property
    def outbox_path(self) -> Path:
        """The outbox SQLite file, ``<data_dir>/outbox.db``."""
        return self.data_dir / OUTBOX_FILE

    @property
    def same_broker(self) -> bool:
        """Whether the hub topics travel on the downstream broker itself."""
        down, up = self.downstream.url, self.upstream.url
        return (down.host.lower(), down.port) == (up.host.lower(), up.port)


class _DeviceKeys(RootModel[dict[MqttId, PublicKeyB64]]):
    pass


def read_device_keys(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Read the static device registry: a YAML mapping of device id to public key.

    Blocking file I/O. Example file::

        gw-0001: 3q2+7w...base64 of the 32 raw key bytes...=
        gw-0002: ...

    Args:
        path: the ``devices_file``.

    Returns:
        Device id to the 32 raw bytes of its Ed25519 public key.

    Raises:
        ConfigError: the file is missing, not YAML, or holds a bad id or key; the
            error names the file and the device id.
    """
    file = Path(path)
    data = read_yaml_mapping(file)
    try:
        keys = _DeviceKeys.model_validate(data).root
    except ValidationError as exc:
        raise validation_error(exc, source=str(file)) from exc
    return {device: decode_public_key(value) for device, value in keys.items()}


def read_hub_key(path: str | os.PathLike[str]) -> bytes | None:
    """Read the hub's public key (base64 of 32 raw bytes on one line). Blocking.

    Args:
        path: the ``hub_key_path``.

    Returns:
        The 32 raw key bytes, or ``None`` if the file does not exist (yet).

    Raises:
        ConfigError: the file exists but is unreadable or not such a key.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read hub key: {exc}", source=str(file)) from exc
    try:
        return decode_public_key(text)
    except ValueError as exc:
        raise ConfigError(f"hub key {exc}", source=str(file)) from exc


def load_relay_key(config: RelayConfig) -> Signer:
    """Load the relay's Ed25519 key, making it at first start. Blocking file I/O.

    Raises:
        ConfigError: the key file exists but is not a readable Ed25519 key, or a
            new key cannot be written.
    """
    from edge_agent.identity import load_or_create_device_key  # noqa: PLC0415

    return load_or_create_device_key(config.key_path)


def load_relay_config(path: str | os.PathLike[str]) -> RelayConfig:
    """Read and validate a relay config file (and its device registry, if named).

    Args:
        path: the YAML config file.

    Returns:
        The validated config, defaults filled in, relative paths made absolute.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, not a mapping or
            fails validation (the error names the file and the dotted field), or
            the ``devices_file`` or an existing ``hub_key_path`` is invalid (the
            error names that file).
    """
    file = Path(path)
    source = str(file)
    data = read_yaml_mapping(file)
    try:
        config = RelayConfig.model_validate(data, context={"base_dir": file.resolve().parent})
    except ValidationError as exc:
        raise validation_error(exc, source=source) from exc
    if config.devices_file is not None:
        read_device_keys(config.devices_file)
    read_hub_key(config.hub_key_path)
    return config


_EXAMPLE = """\
# NovaCron Edge regional relay configuration.
# Only relay_id, region, data_dir and downstream are required; every other
# setting below shows its default. Relative paths are relative to this file.

# 1-64 characters, no '#', '+', '/', '$' or whitespace (MQTT topic levels).
relay_id: {relay_id}
region: {region}

# Outbox (outbox.db), relay key and hub key live here.
data_dir: {data_dir}

# The broker the region's agents use (see examples/mosquitto/relay.conf).
downstream:
  url: {downstream}
  # credentials:
  #   username: relay
  #   password_file: /etc/novacron/relay.password
  keepalive_s: 30

# The hub's broker; defaults to the downstream broker when omitted.
# upstream:
#   url: mqtts://hub.example.net:8883
#   credentials: {{username: {relay_id}, password_file: /etc/novacron/hub.password}}

# The relay's Ed25519 key, made at first start (default: <data_dir>/relay.key).
# key_path: {data_dir}/relay.key
# The hub's public key, base64 of 32 bytes on one line (default: <data_dir>/hub.pub).
# hub_key_path: {data_dir}/hub.pub
# Static device registry until the hub syncs it: YAML {{device id: base64 key}}.
# devices_file: devices.yaml

# Hub batches: sent when max_items or max_bytes is reached or after max_delay_ms.
# max_bytes + max_items * 96 + 1024 must fit the 256 KiB envelope cap.
batch:
  max_items: 500
  max_bytes: 204800
  max_delay_ms: 200

# Durable store-and-forward queue. At quota, 'refuse-metrics' refuses metric and
# aggregate items (agents keep and resend them) but stores deltas and events;
# 'deltas-only' refuses everything but state deltas.
outbox:
  quota_mb: 512
  overflow: refuse-metrics
  integrity_check: integrity

# Hub batches without an application-level ACK are sent again.
resend:
  ack_timeout_s: 10.0
  max_in_flight: 8
  backoff_initial_s: 1.0
  backoff_max_s: 60.0
  backoff_jitter: 0.2

presence:
  summary_interval_s: 30.0

# Optional downsampling of metric streams (min/max/mean/count per interval).
# Raw events are always forwarded. Default: off.
# downsample:
#   interval_s: 60
#   streams: [metrics]

reconnect:
  backoff_initial_s: 1.0
  backoff_max_s: 60.0
  backoff_jitter: 0.2
"""


def example_relay_config(
    *,
    relay_id: str = "relay-1",
    region: str = "default",
    data_dir: Path = DEFAULT_RELAY_DATA_DIR,
    downstream: str = "mqtt://localhost:1883",
) -> str:
    """A commented starting config.

    Args:
        relay_id: the relay id to write.
        region: the region to write.
        data_dir: the data directory to write.
        downstream: the downstream broker URL to write.

    Returns:
        YAML text that :func:`load_relay_config` accepts as it is.
    """
    return _EXAMPLE.format(
        relay_id=relay_id, region=region, data_dir=data_dir, downstream=downstream
    )
