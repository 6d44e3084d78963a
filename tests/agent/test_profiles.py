"""Firmware profiles: built-ins, the loader's errors, and ``novacron profiles``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import firmware_profiles
from firmware_profiles import (
    FirmwareProfile,
    UnknownProfileError,
    builtin_profile_dir,
    list_profiles,
    load_profile,
    profile_names,
)
from novacron.cli import main
from sync._exceptions import ConfigError

REQUIRED = {
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "simatic-iot2050",
    "x86-industrial-gateway",
    "openwrt-router",
    "generic-x86_64",
}

BUILTIN_FILES = sorted(builtin_profile_dir().glob("*.yaml"))


def _write_profile(directory: Path, name: str, **changes: object) -> Path:
    data = yaml.safe_load((builtin_profile_dir() / "generic-x86_64.yaml").read_text())
    data["name"] = name
    data.update(changes)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_public_names_sorted_and_importable() -> None:
    assert firmware_profiles.__all__ == sorted(firmware_profiles.__all__)
    for name in firmware_profiles.__all__:
        assert getattr(firmware_profiles, name) is not None
    with pytest.raises(AttributeError):
        _ = firmware_profiles.no_such_name


def test_required_profiles_exist() -> None:
    assert set(profile_names()) >= REQUIRED


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=lambda p: p.stem)
def test_every_builtin_profile_loads(path: Path) -> None:
    profile = load_profile(path.stem)
    assert profile.name == path.stem
    assert profile.journal_quota_mb < profile.storage_mb
    assert load_profile(path) == profile


def test_specific_device_classes() -> None:
    assert load_profile("jetson-orin-nano").gpu is True
    router = load_profile("openwrt-router")
    assert router.drivers == ("process",)
    assert router.memory_mb <= 512
    assert router.storage_mb <= 128
    assert all(not p.gpu for p in list_profiles() if p.name != "jetson-orin-nano")
    assert [p.name for p in list_profiles()] == profile_names()


def test_profile_is_frozen() -> None:
    profile = load_profile("raspberry-pi-4")
    with pytest.raises(ValueError, match="frozen"):
        profile.cpu_cores = 8  # type: ignore[misc]


def test_extra_dir_adds_and_overrides(tmp_path: Path) -> None:
    _write_profile(tmp_path, "site-box", cpu_cores=16)
    _write_profile(tmp_path, "generic-x86_64", cpu_cores=64)
    assert load_profile("site-box", [tmp_path]).cpu_cores == 16
    assert load_profile("generic-x86_64", [tmp_path]).cpu_cores == 64
    assert load_profile("generic-x86_64").cpu_cores != 64
    assert "site-box" in profile_names([tmp_path])
    assert "site-box" not in profile_names()


def test_missing_extra_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile directory not found"):
        list_profiles([tmp_path / "nope"])


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(UnknownProfileError) as info:
        load_profile("no-such-device")
    assert "raspberry-pi-4" in str(info.value)
    assert set(info.value.known) >= REQUIRED
    with pytest.raises(UnknownProfileError):
        load_profile("Not A Name")


def test_wrong_type_names_file_and_field(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, "bad", cpu_cores="four")
    with pytest.raises(ConfigError) as info:
        load_profile("bad", [tmp_path])
    assert info.value.source == str(path)
    assert info.value.field == "cpu_cores"
    assert str(path) in str(info.value)
    assert "'four'" in str(info.value)


def test_nested_field_path(tmp_path: Path) -> None:
    data = yaml.safe_load((builtin_profile_dir() / "simatic-iot2050.yaml").read_text())
    data["name"] = "bad"
    data["link"]["outages"]["scheduled"][0]["duration_s"] = -1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_profile(tmp_path / "bad.yaml")
    assert info.value.field == "link.outages.scheduled[0].duration_s"


def test_unknown_field_named(tmp_path: Path) -> None:
    _write_profile(tmp_path, "bad", cpu_corez=4)
    with pytest.raises(ConfigError) as info:
        load_profile("bad", [tmp_path])
    assert info.value.field == "cpu_corez"
    assert "Extra inputs are not permitted" in str(info.value)


def test_driver_outside_the_set(tmp_path: Path) -> None:
    _write_profile(tmp_path, "bad", drivers=["process", "docker"])
    with pytest.raises(ConfigError) as info:
        load_profile("bad", [tmp_path])
    assert info.value.field == "drivers[1]"


def test_several_errors_all_reported(tmp_path: Path) -> None:
    _write_profile(tmp_path, "bad", cpu_cores=0, memory_mb="lots")
    with pytest.raises(ConfigError) as info:
        load_profile("bad", [tmp_path])
    assert info.value.field == "cpu_cores"
    assert "memory_mb" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"journal_quota_mb": 70000}, "must be below storage_mb"),
        ({"drivers": ["process", "process"]}, "must not repeat"),
        ({"drivers": []}, "at least 1"),
        (
            {
                "link": {
                    "kind": "wifi",
                    "bandwidth_kbps": 1,
                    "latency_ms": 1,
                    "outages": {"mean_up_s": 5},
                }
            },
            "given together",
        ),
        (
            {
                "link": {
                    "kind": "lte",
                    "bandwidth_kbps": 1,
                    "latency_ms": 1,
                    "outages": {
                        "scheduled": [
                            {"start_s": 10, "duration_s": 10},
                            {"start_s": 15, "duration_s": 1},
                        ]
                    },
                }
            },
            "must not overlap",
        ),
        (
            {
                "link": {
                    "kind": "lte",
                    "bandwidth_kbps": 1,
                    "latency_ms": 1,
                    "outages": {"scheduled": [{"start_s": 10, "duration_s": 10}], "period_s": 15},
                }
            },
            "fit within period_s",
        ),
        ({"link": {"kind": "carrier-pigeon", "bandwidth_kbps": 1, "latency_ms": 1}}, "link.kind"),
    ],
)
def test_semantic_checks(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    _write_profile(tmp_path, "bad", **changes)
    with pytest.raises(ConfigError, match=message):
        load_profile("bad", [tmp_path])


def test_name_must_match_file_stem(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, "box")
    path.rename(tmp_path / "other.yaml")
    with pytest.raises(ConfigError) as info:
        load_profile("other", [tmp_path])
    assert info.value.field == "name"
    assert "other.yaml" in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\narch: x86_64\ndrivers: [process\ncpu_cores: 2\n")
    with pytest.raises(ConfigError) as info:
        load_profile("broken", [tmp_path])
    assert info.value.source == str(path)
    assert "line 4" in str(info.value)
    assert "invalid YAML" in str(info.value)


def test_duplicate_keys_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\ncpu_cores: 2\ncpu_cores: 4\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'cpu_cores'"):
        load_profile(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "got empty"), ("- a\n- b\n", "got a list"), ("just text\n", "got a str")],
)
def test_top_level_must_be_mapping(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_profile(path)


def test_unsafe_yaml_tags_rejected(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_profile(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_profile(tmp_path / "absent.yaml")


# --- CLI ---------------------------------------------------------------------------


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "CORES", "MEMORY", "DRIVERS", "LINK"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == profile_names()
    router = next(line for line in lines if line.startswith("openwrt-router"))
    assert "mips" in router
    assert "256 MB" in router
    assert "wifi" in router


def test_cli_list_json_with_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_profile(tmp_path, "site-box")
    assert main(["profiles", "list", "--json", "--dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "site-box" in [p["name"] for p in data]
    assert all(FirmwareProfile.model_validate(p) for p in data)


def test_cli_show_yaml_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "show", "raspberry-pi-5"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert FirmwareProfile.model_validate(data) == load_profile("raspberry-pi-5")


def test_cli_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "show", "jetson-orin-nano", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"] is True
    assert data["link"]["kind"] == "lte"


def test_cli_show_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "openwrt-router.yaml"
    shutil.copy(builtin_profile_dir() / "openwrt-router.yaml", copy)
    assert main(["profiles", "show", str(copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["drivers"] == ["process"]


def test_cli_unknown_profile_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "show", "toaster"]) == 2
    err = capsys.readouterr().err
    assert "unknown firmware profile 'toaster'" in err
    assert "raspberry-pi-4" in err
    assert "openwrt-router" in err


def test_cli_bad_profile_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_profile(tmp_path, "bad", memory_mb=[1])
    assert main(["profiles", "list", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "memory_mb" in err
    assert main(["profiles", "show", "bad", "--dir", str(tmp_path)]) == 2


def test_cli_bad_yaml_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\n  arch: x86_64\n")
    assert main(["profiles", "show", "bad", "--dir", str(tmp_path)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_cli_profiles_needs_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["profiles"])
    assert info.value.code == 2
    assert "PROFILES_COMMAND" in capsys.readouterr().err
