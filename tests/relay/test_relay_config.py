"""Relay configuration: defaults, trust files, and errors that name file and field."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from novacron import cli
from regional_relay.config import (
    RelayConfig,
    example_relay_config,
    load_relay_config,
    load_relay_key,
    read_device_keys,
    read_hub_key,
)
from sync._exceptions import ConfigError
from sync.keys import Signer

MINIMAL: dict[str, Any] = {
    "relay_id": "relay-eu-1",
    "region": "eu-west",
    "data_dir": "data",
    "downstream": {"url": "mqtt://10.0.0.2:1884"},
}


def _pub_b64() -> str:
    raw = Signer.generate().private_key.public_key().public_bytes_raw()
    return base64.b64encode(raw).decode()


def _write(tmp_path: Path, data: object, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(tmp_path: Path, **changes: object) -> ConfigError:
    data = {k: v for k, v in {**MINIMAL, **changes}.items() if v is not None}
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_relay_config(path)
    assert info.value.source == str(path)
    return info.value


def test_minimal_config_fills_defaults(tmp_path: Path) -> None:
    config = load_relay_config(_write(tmp_path, MINIMAL))
    assert config.data_dir == tmp_path / "data"
    assert config.key_path == tmp_path / "data" / "relay.key"
    assert config.hub_key_path == tmp_path / "data" / "hub.pub"
    assert config.outbox_path == tmp_path / "data" / "outbox.db"
    assert config.downstream.url.url == "mqtt://10.0.0.2:1884"
    assert config.upstream == config.downstream and config.same_broker
    assert (config.batch.max_items, config.batch.max_bytes, config.batch.max_delay_ms) == (
        500,
        200 * 1024,
        200,
    )
    assert config.outbox.quota_bytes == 512 << 20
    assert config.outbox.overflow == "refuse-metrics"
    assert config.downsample is None
    assert config.devices_file is None


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    devices = _write(tmp_path, {"gw-1": _pub_b64(), "gw-2": _pub_b64()}, "devices.yaml")
    data = {
        **MINIMAL,
        "downstream": {
            "url": "mqtts://broker.local",
            "credentials": {"username": "relay", "password_file": "pw"},
        },
        "upstream": "mqtts://hub.example.net:8884",
        "devices_file": "devices.yaml",
        "downsample": {"interval_s": 60, "streams": ["metrics"]},
        "outbox": {"quota_mb": 64, "overflow": "deltas-only"},
    }
    config = load_relay_config(_write(tmp_path, data))
    assert config.downstream.url.port == 8883 and config.downstream.url.tls
    assert config.downstream.credentials is not None
    assert config.downstream.credentials.read_password() == "secret"
    assert config.upstream.url.url == "mqtts://hub.example.net:8884"
    assert not config.same_broker
    assert config.devices_file == devices
    assert set(read_device_keys(devices)) == {"gw-1", "gw-2"}
    assert config.downsample is not None and config.downsample.streams == ("metrics",)
    assert config.outbox.quota_bytes == 64 << 20


def test_example_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(example_relay_config(data_dir=tmp_path / "d", region="north"))
    config = load_relay_config(path)
    assert config.region == "north"
    assert config == RelayConfig.model_validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"relay_id": "relay/1"}, "relay_id"),
        ({"region": None}, "region"),
        ({"downstream": {"url": "http://x:1"}}, "downstream.url"),
        (
            {"downstream": {"url": "mqtt://x:1", "credentials": {"username": "u"}}},
            "downstream.credentials",
        ),
        ({"batch": {"max_items": 0}}, "batch.max_items"),
        ({"batch": {"max_bytes": 255 * 1024}}, "batch"),
        ({"outbox": {"overflow": "drop-oldest"}}, "outbox.overflow"),
        ({"downsample": {"interval_s": 0}}, "downsample.interval_s"),
        ({"resend": {"backoff_initial_s": 5, "backoff_max_s": 1}}, "resend"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, changes: dict[str, Any], field: str) -> None:
    assert _error(tmp_path, **changes).field == field


def test_bad_device_registry_names_file_and_device(tmp_path: Path) -> None:
    _write(tmp_path, {"gw-1": _pub_b64(), "gw-2": "bm90IGEga2V5"}, "devices.yaml")
    path = _write(tmp_path, {**MINIMAL, "devices_file": "devices.yaml"})
    with pytest.raises(ConfigError) as info:
        load_relay_config(path)
    assert info.value.source == str(tmp_path / "devices.yaml")
    assert info.value.field == "gw-2"


def test_hub_key_missing_is_none_and_bad_is_an_error(tmp_path: Path) -> None:
    assert read_hub_key(tmp_path / "hub.pub") is None
    (tmp_path / "hub.pub").write_text(_pub_b64() + "\n")
    key = read_hub_key(tmp_path / "hub.pub")
    assert key is not None and len(key) == 32
    (tmp_path / "hub.pub").write_text("garbage\n")
    with pytest.raises(ConfigError, match=r"hub\.pub"):
        read_hub_key(tmp_path / "hub.pub")


def test_relay_key_made_once(tmp_path: Path) -> None:
    config = load_relay_config(_write(tmp_path, MINIMAL))
    first = load_relay_key(config)
    assert config.key_path.stat().st_mode & 0o777 == 0o600
    assert load_relay_key(config).key_id == first.key_id


def test_cli_bad_config_exits_2_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, {**MINIMAL, "batch": {"max_items": -1}})
    assert cli.main(["relay", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "batch.max_items" in err


def test_cli_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert cli.main(["relay", "run", "--config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_relay_command_registered() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["relay", "run", "--config", "x.yaml"])
    assert callable(args.func)
