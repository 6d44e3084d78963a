"""Agent configuration: defaults, profile checks, and errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from edge_agent import config as config_module
from edge_agent.config import (
    AgentConfig,
    RelayEndpoint,
    example_agent_config,
    load_agent_config,
    validate_mqtt_id,
)
from firmware_profiles import load_profile
from sync._exceptions import ConfigError

MINIMAL: dict[str, Any] = {
    "device_id": "gw-0042",
    "region": "eu-west",
    "data_dir": "/var/lib/novacron",
    "profile": "raspberry-pi-4",
    "relays": ["mqtts://relay-1.example.net:8883", "mqtt://10.0.0.5:1884"],
}


def _write(tmp_path: Path, data: object, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _load_with(tmp_path: Path, **changes: object) -> AgentConfig:
    data = {**MINIMAL, **changes}
    return load_agent_config(_write(tmp_path, {k: v for k, v in data.items() if v is not None}))


def _error_with(tmp_path: Path, **changes: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load_with(tmp_path, **changes)
    assert info.value.source == str(tmp_path / "agent.yaml")
    return info.value


def test_all_sorted() -> None:
    assert config_module.__all__ == sorted(config_module.__all__)


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = _load_with(tmp_path)
    profile = load_profile("raspberry-pi-4")
    assert cfg.device_id == "gw-0042"
    assert cfg.data_dir == Path("/var/lib/novacron")
    assert cfg.key_path == Path("/var/lib/novacron/device.key")
    assert cfg.control_socket == Path("/var/lib/novacron/agent.sock")
    assert cfg.relays == (
        RelayEndpoint(host="relay-1.example.net", port=8883, tls=True),
        RelayEndpoint(host="10.0.0.5", port=1884, tls=False),
    )
    assert cfg.drivers == profile.drivers
    assert cfg.quotas.journal_quota_mb == profile.journal_quota_mb
    assert cfg.link.batch_max == profile.sync_batch_size
    assert cfg.podman_url == "unix:///run/podman/podman.sock"
    assert cfg.libvirt_uri == "qemu:///system"
    assert cfg.credentials is None
    assert cfg.supervisor.max_restart_attempts == 5
    assert cfg.link.backoff_max_s >= cfg.link.backoff_initial_s


def test_overrides(tmp_path: Path) -> None:
    cfg = _load_with(
        tmp_path,
        profile="x86-industrial-gateway",
        drivers=["libvirt", "sim"],
        key_path="/etc/novacron/key",
        quotas={"journal_quota_mb": 100, "max_workloads": 4},
        link={"batch_max": 10, "ack_timeout_s": 5},
        supervisor={"reconcile_interval_s": 2, "backoff_max_s": 10},
        libvirt_uri="test:///default",
        podman_url="tcp://127.0.0.1:8888",
    )
    assert cfg.drivers == ("libvirt", "sim")
    assert cfg.key_path == Path("/etc/novacron/key")
    assert cfg.quotas.journal_quota_mb == 100
    assert cfg.quotas.max_workloads == 4
    assert cfg.link.batch_max == 10
    assert cfg.link.ack_timeout_s == 5
    assert cfg.supervisor.reconcile_interval_s == 2


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    cfg = _load_with(
        tmp_path,
        data_dir="state",
        credentials={"username": "gw-0042", "password_file": "secret"},
    )
    assert cfg.data_dir == tmp_path.resolve() / "state"
    assert cfg.key_path == tmp_path.resolve() / "state" / "device.key"
    assert cfg.credentials is not None
    assert cfg.credentials.password_file == tmp_path.resolve() / "secret"


def test_credentials(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = _load_with(tmp_path, credentials={"username": "u", "password_file": str(tmp_path / "pw")})
    assert cfg.credentials is not None
    assert cfg.credentials.read_password() == "s3cret"
    cfg = _load_with(tmp_path, credentials={"username": "u", "password": "inline"})
    assert cfg.credentials is not None
    assert cfg.credentials.read_password() == "inline"
    assert "inline" not in repr(cfg)
    (tmp_path / "pw").unlink()
    cfg = _load_with(tmp_path, credentials={"username": "u", "password_file": str(tmp_path / "pw")})
    assert cfg.credentials is not None
    with pytest.raises(ConfigError) as info:
        cfg.credentials.read_password()
    assert info.value.field == "credentials.password_file"


@pytest.mark.parametrize(
    "credentials",
    [{"username": "u"}, {"username": "u", "password": "p", "password_file": "/x"}],
)
def test_credentials_need_exactly_one_secret(tmp_path: Path, credentials: dict[str, str]) -> None:
    err = _error_with(tmp_path, credentials=credentials)
    assert err.field == "credentials"
    assert "exactly one of password or password_file" in str(err)


def test_relay_parsing() -> None:
    assert RelayEndpoint.model_validate("mqtt://broker").port == 1883
    assert RelayEndpoint.model_validate("mqtts://broker").port == 8883
    relay = RelayEndpoint.model_validate("mqtts://[fd00::1]:9000")
    assert relay.host == "fd00::1"
    assert relay.url == "mqtts://[fd00::1]:9000"
    assert RelayEndpoint.model_validate({"host": "h", "port": 1, "tls": False}).url == "mqtt://h:1"


@pytest.mark.parametrize(
    ("relay", "message"),
    [
        ("http://broker:80", "must start with mqtt:// or mqtts://"),
        ("broker:1883", "must start with mqtt:// or mqtts://"),
        ("mqtt://user:pw@broker:1883", "not in the relay URL"),
        ("mqtt://broker:1883/topic", "must not have a path"),
        ("mqtt://broker:99999", "invalid port"),
        ("mqtt://:1883", "has no host"),
    ],
)
def test_bad_relay(tmp_path: Path, relay: str, message: str) -> None:
    err = _error_with(tmp_path, relays=[relay])
    assert err.field == "relays[0]"
    assert message in str(err)


def test_relays_required_non_empty_unique(tmp_path: Path) -> None:
    assert _error_with(tmp_path, relays=[]).field == "relays"
    assert _error_with(tmp_path, relays=None).field == "relays"
    err = _error_with(tmp_path, relays=["mqtt://a:1", "mqtt://A:1"])
    assert "must not repeat" in str(err)


@pytest.mark.parametrize(
    "value", ["a/b", "a+b", "a#", "$SYS", "has space", "tab\t", "", "x" * 65, "nul\x00"]
)
def test_bad_device_id(tmp_path: Path, value: str) -> None:
    err = _error_with(tmp_path, device_id=value)
    assert err.field == "device_id"


def test_mqtt_id_accepts_ordinary_ids() -> None:
    for value in ["gw-1", "x" * 64, "plant_7.line-3", "gerät-ü"]:
        assert validate_mqtt_id(value) == value


def test_bad_region(tmp_path: Path) -> None:
    assert _error_with(tmp_path, region="eu/west").field == "region"


def test_driver_not_on_profile(tmp_path: Path) -> None:
    err = _error_with(tmp_path, profile="openwrt-router", drivers=["process", "podman"])
    assert err.field == "drivers[1]"
    assert "'podman' is not available on profile 'openwrt-router'" in str(err)
    assert "process" in str(err)


def test_sim_driver_always_allowed(tmp_path: Path) -> None:
    assert _load_with(tmp_path, profile="openwrt-router", drivers=["sim"]).drivers == ("sim",)


def test_unknown_driver(tmp_path: Path) -> None:
    assert _error_with(tmp_path, drivers=["docker"]).field == "drivers[0]"


def test_journal_quota_beyond_storage(tmp_path: Path) -> None:
    err = _error_with(tmp_path, profile="openwrt-router", quotas={"journal_quota_mb": 64})
    assert err.field == "quotas.journal_quota_mb"


def test_unknown_profile(tmp_path: Path) -> None:
    err = _error_with(tmp_path, profile="toaster")
    assert err.field == "profile"
    assert "raspberry-pi-4" in str(err)


@pytest.mark.parametrize("value", ["../etc/passwd.yaml", "/tmp/x.yaml", 7])
def test_profile_must_be_a_name(tmp_path: Path, value: object) -> None:
    assert _error_with(tmp_path, profile=value).field == "profile"


def test_missing_profile(tmp_path: Path) -> None:
    err = _error_with(tmp_path, profile=None)
    assert err.field == "profile"


def test_profile_from_extra_dir(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    data = load_profile("generic-x86_64").model_dump(mode="json")
    data["name"] = "site-box"
    data["drivers"] = ["process"]
    _write(profiles, data, "site-box.yaml")
    path = _write(tmp_path, {**MINIMAL, "profile": "site-box"})
    assert load_agent_config(path, profile_dirs=(profiles,)).drivers == ("process",)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"unknown_key": 1}, "unknown_key"),
        ({"quotas": {"max_workloads": 0}}, "quotas.max_workloads"),
        ({"quotas": {"max_wokloads": 3}}, "quotas.max_wokloads"),
        ({"link": {"ack_timeout_s": "soon"}}, "link.ack_timeout_s"),
        ({"link": {"backoff_initial_s": 10, "backoff_max_s": 1}}, "link"),
        ({"supervisor": {"max_restart_attempts": -1}}, "supervisor.max_restart_attempts"),
        ({"data_dir": 5}, "data_dir"),
        ({"podman_url": "/run/podman.sock"}, "podman_url"),
        ({"libvirt_uri": "system"}, "libvirt_uri"),
        ({"quotas": "big"}, "quotas"),
    ],
)
def test_validation_errors_name_field(
    tmp_path: Path, changes: dict[str, object], field: str
) -> None:
    assert _error_with(tmp_path, **changes).field == field


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_agent_config(tmp_path / "nope.yaml")
    assert info.value.source == str(tmp_path / "nope.yaml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_agent_config(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_agent_config(path)


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: gw\nrelays: [mqtt://a\n")
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert "line 3" in str(info.value)
    assert str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"device_id: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_agent_config(path)


@pytest.mark.parametrize("text", ["", "- a\n", "42\n"])
def test_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_agent_config(path)


def test_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "relays: [mqtt://other:1883]\n")
    with pytest.raises(ConfigError, match="duplicate key 'relays'"):
        load_agent_config(path)


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = _load_with(tmp_path)
    with pytest.raises(ValidationError):
        cfg.device_id = "other"  # type: ignore[misc]


def test_without_profile_context_needs_explicit_values() -> None:
    with pytest.raises(ValidationError) as info:
        AgentConfig.model_validate(MINIMAL)
    missing = {".".join(map(str, e["loc"])) for e in info.value.errors()}
    assert missing == {"drivers", "quotas", "link"}
    cfg = AgentConfig.model_validate(
        {**MINIMAL, "drivers": ["sim"], "quotas": {"journal_quota_mb": 8}, "link": {"batch_max": 5}}
    )
    assert cfg.drivers == ("sim",)


def test_for_profile_checks_drivers() -> None:
    profile = load_profile("openwrt-router")
    with pytest.raises(ConfigError) as info:
        AgentConfig.for_profile(
            {**MINIMAL, "profile": "openwrt-router", "drivers": ["libvirt"]}, profile
        )
    assert info.value.field == "drivers[0]"
    with pytest.raises(ConfigError) as info:
        AgentConfig.for_profile(MINIMAL, profile)
    assert info.value.field == "profile"


@pytest.mark.parametrize("profile", ["generic-x86_64", "openwrt-router", "jetson-orin-nano"])
def test_example_config_loads(tmp_path: Path, profile: str) -> None:
    text = example_agent_config(data_dir=tmp_path / "data", profile=profile, region="lab")
    assert "#" in text
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    cfg = load_agent_config(path)
    assert cfg.profile == profile
    assert cfg.region == "lab"
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.drivers == load_profile(profile).drivers
