"""Deployment manifests: YAML and JSON, good and bad, errors naming file and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_hub.manifests import Deployment, RolloutSpec, load_manifest, parse_manifest
from sync._exceptions import ConfigError
from sync.models import Resources

GOOD = """\
kind: Deployment
apiVersion: novacron.io/v1
metadata:
  name: camera-ingest
  labels: {team: vision}
spec:
  workload:
    name: ingest
    driver: podman
    image: registry.local/ingest:2
    resources: {cpu_millis: 200, memory_mb: 64}
  selector:
    labels: {site: plant-1}
    profiles: [raspberry-pi-4, raspberry-pi-5]
    regions: [eu-west]
    arch: [aarch64]
    drivers: [podman]
    gpu: false
  mode: replicas
  replicas: 3
  resources: {cpu_millis: 500, memory_mb: 256}
  rollout:
    waves: [{percent: 10}, {count: 50}, {percent: 100}]
    success_threshold: 0.95
    wave_timeout_s: 300
    offline_deadline_s: 1800
    failure_budget: 2
    on_failure: rollback
"""


def _doc() -> dict[str, Any]:
    data = yaml.safe_load(GOOD)
    assert isinstance(data, dict)
    return data


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = doc
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


def test_good_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(GOOD, encoding="utf-8")
    dep = load_manifest(path)
    assert dep.name == "camera-ingest"
    assert dep.metadata.labels == {"team": "vision"}
    spec = dep.spec
    assert spec.mode == "replicas"
    assert spec.replicas == 3
    assert spec.selector.regions == ("eu-west",)
    assert spec.selector.gpu is False
    assert spec.effective_resources == Resources(cpu_millis=500, memory_mb=256)
    assert dep.desired_workload().resources == Resources(cpu_millis=500, memory_mb=256)
    assert spec.required_drivers == frozenset({"podman"})
    assert spec.rollout.on_failure == "rollback"
    assert spec.rollout.failure_budget == 2
    # The same path given as a string is a file too.
    assert load_manifest(str(path)) == dep


def test_good_json_file_and_text(tmp_path: Path) -> None:
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps(_doc(), indent=2), encoding="utf-8")
    from_json = load_manifest(path)
    assert from_json == load_manifest(GOOD)
    assert parse_manifest(json.dumps(_doc())) == from_json


def test_round_trip_through_document() -> None:
    dep = load_manifest(GOOD)
    assert parse_manifest(json.dumps(dep.to_document())) == dep
    assert dep.to_document()["apiVersion"] == "novacron.io/v1"


def test_minimal_manifest_defaults() -> None:
    dep = parse_manifest(
        "kind: Deployment\napiVersion: novacron.io/v1\nmetadata: {name: m}\n"
        "spec: {workload: {name: w, driver: process, command: [sleep, '1']}}\n"
    )
    spec = dep.spec
    assert spec.mode == "each"
    assert spec.replicas is None
    assert spec.effective_resources == spec.workload.resources
    assert dep.desired_workload() is spec.workload
    assert spec.rollout.waves[-1].percent == 100
    assert spec.rollout.success_threshold == 0.9
    assert spec.rollout.on_failure == "pause"
    assert spec.required_drivers == frozenset({"process"})


def test_replicas_alone_implies_replicas_mode() -> None:
    doc = _set(_doc(), "spec.mode", _DELETE)
    assert parse_manifest(json.dumps(doc)).spec.mode == "replicas"


def test_wave_targets_are_cumulative_and_reach_all() -> None:
    rollout = RolloutSpec.model_validate(
        {"waves": [{"percent": 10}, {"count": 150}, {"percent": 100}]}
    )
    assert rollout.wave_targets(1000) == (100, 150, 1000)
    assert rollout.wave_targets(7) == (1, 7, 7)  # 10 % of 7 rounds up to one device
    assert rollout.wave_targets(0) == (0, 0, 0)
    # A count below an earlier percentage does not shrink the rollout.
    assert rollout.wave_targets(2000) == (200, 200, 2000)


def test_failure_budget_count_or_fraction() -> None:
    assert RolloutSpec(failure_budget=3).failure_budget_count(100) == 3
    assert RolloutSpec(failure_budget=0.05).failure_budget_count(100) == 5
    assert RolloutSpec(failure_budget=0.05).failure_budget_count(39) == 1
    assert RolloutSpec.model_validate({"failure_budget": 4.0}).failure_budget == 4


BAD: list[tuple[str, Any, str, str]] = [
    ("kind", "Pod", "kind", "Deployment"),
    ("apiVersion", "novacron.io/v2", "apiVersion", "novacron.io/v1"),
    ("metadata.name", "Bad_Name", "metadata.name", "pattern"),
    # pydantic locates a bad dict key as "<key>.[key]" (the shared formatter's spelling).
    ("metadata.labels", {"bad key": "x"}, "metadata.labels.bad key.[key]", "pattern"),
    ("spec.workload.driver", "docker", "spec.workload.driver", "docker"),
    ("spec.workload.image", _DELETE, "spec.workload", "podman workloads need an image"),
    ("spec.selector.drivers", ["process"], "spec.selector", "workload's driver 'podman'"),
    ("spec.selector.arch", ["sparc"], "spec.selector.arch[0]", "sparc"),
    ("spec.selector.regions", ["eu/west"], "spec.selector.regions[0]", "pattern"),
    ("spec.selector.profiles", ["a", "a"], "spec.selector.profiles", "must not repeat"),
    ("spec.selector.zone", "x", "spec.selector.zone", "Extra inputs"),
    ("spec.mode", "some", "spec.mode", "each"),
    ("spec.replicas", 0, "spec.replicas", "greater than or equal to 1"),
    ("spec.replicas", _DELETE, "spec.replicas", "needs replicas: N"),
    ("spec.resources.cpu_millis", 0, "spec.resources.cpu_millis", "greater than"),
    ("spec.rollout.waves", [], "spec.rollout.waves", "at least one wave"),
    ("spec.rollout.waves", [{"percent": 50}], "spec.rollout.waves", "last wave"),
    (
        "spec.rollout.waves",
        [{"percent": 50}, {"percent": 20}, {"percent": 100}],
        "spec.rollout.waves",
        "must increase",
    ),
    (
        "spec.rollout.waves",
        [{"percent": 10, "count": 3}, {"percent": 100}],
        "spec.rollout.waves[0]",
        "exactly one of percent or count",
    ),
    ("spec.rollout.waves", [{"percent": 150}], "spec.rollout.waves[0].percent", "100"),
    ("spec.rollout.success_threshold", 1.5, "spec.rollout.success_threshold", "1.5"),
    ("spec.rollout.failure_budget", 1.5, "spec.rollout.failure_budget", "fraction"),
    ("spec.rollout.failure_budget", True, "spec.rollout.failure_budget", "boolean"),
    ("spec.rollout.on_failure", "explode", "spec.rollout.on_failure", "pause"),
]


@pytest.mark.parametrize(("where", "value", "field", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_names_file_and_field(
    tmp_path: Path, where: str, value: Any, field: str, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_set(_doc(), where, value)), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    err = info.value
    assert err.source == str(path)
    assert err.field == field
    assert fragment in str(err)
    assert str(err).startswith(f"{path}: {field}: ")


def test_mode_each_rejects_replicas() -> None:
    doc = _set(_doc(), "spec.mode", "each")
    with pytest.raises(ConfigError) as info:
        parse_manifest(json.dumps(doc), source="req-1")
    assert info.value.source == "req-1"
    assert info.value.field == "spec.replicas"
    assert "only allowed with mode: replicas" in str(info.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kind: Deployment\nmetadata: {name: [x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    assert info.value.source == str(path)
    assert "invalid YAML" in str(info.value)
    assert "line " in str(info.value)


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "kind": "Deployment",\n  oops\n}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    assert info.value.source == str(path)
    assert "line 3" in str(info.value)
    assert "invalid JSON" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        GOOD.replace("kind: Deployment\n", "kind: Deployment\nkind: Deployment\n"),
        '{"kind": "Deployment", "kind": "Deployment"}',
    ],
    ids=["yaml", "json"],
)
def test_duplicate_keys_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match="duplicate key"):
        parse_manifest(text)


@pytest.mark.parametrize("text", ["- a\n- b\n", "\n", "[1, 2]\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError, match="mapping at the top level"):
        parse_manifest(text)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_manifest(tmp_path / "nope.yaml")
    assert info.value.source == str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="directory"):
        load_manifest(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: D\xe9ployment\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_manifest(path)


def test_models_are_frozen() -> None:
    dep = load_manifest(GOOD)
    with pytest.raises(ValueError, match="frozen"):
        dep.spec.replicas = 5  # type: ignore[misc]
    assert isinstance(dep, Deployment)
