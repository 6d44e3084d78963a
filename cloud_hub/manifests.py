"""Deployment manifests: what an operator applies with ``novacron apply -f FILE``.

A manifest is YAML or JSON::

    kind: Deployment
    apiVersion: novacron.io/v1
    metadata: {name: camera-ingest, labels: {team: vision}}
    spec:
      workload: {name: ingest, driver: podman, image: "registry.local/ingest:2"}
      selector:
        labels: {site: plant-1}
        regions: [eu-west]
        drivers: [podman]
      mode: replicas          # or "each" (every matching device, the default)
      replicas: 3
      resources: {cpu_millis: 500, memory_mb: 256}   # default: the workload's
      rollout:
        waves: [{percent: 10}, {count: 50}, {percent: 100}]
        success_threshold: 0.9
        wave_timeout_s: 600
        offline_deadline_s: 3600
        failure_budget: 0.05   # a fraction of the targets, or a whole count
        on_failure: rollback   # or pause

Every model is frozen and rejects unknown fields. :func:`load_manifest` reads a
file or a text and turns every problem into a
:class:`~sync._exceptions.ConfigError` naming the file and the dotted field
(``spec.rollout.waves[1].percent``), the same way firmware profiles and agent
configs report theirs.

Rollout waves are cumulative targets: ``[{percent: 10}, {percent: 50}, {percent:
100}]`` means "10 % of the targets, then 50 % in total, then all". A ``count``
wave is an absolute number of devices. The last wave must be ``{percent: 100}``,
the only entry that reaches every target whatever the fleet size;
:meth:`RolloutSpec.wave_targets` turns the list into device counts for a given
number of targets.
"""

from __future__ import annotations

import itertools
import json
import math
from os import PathLike, fspath
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from firmware_profiles._schema import PROFILE_NAME_PATTERN, Arch, DriverName
from firmware_profiles._yamlio import (
    MAX_FILE_BYTES,
    _StrictSafeLoader,  # the same duplicate-key-rejecting loader as every config file
    _yaml_error,
    read_text_file,
    validation_error,
)
from sync._exceptions import ConfigError
from sync.models import Name, Resources, WorkloadSpec

__all__ = [
    "API_VERSION",
    "Deployment",
    "DeploymentSpec",
    "FailureAction",
    "LabelKey",
    "LabelValue",
    "Metadata",
    "PlacementMode",
    "RegionName",
    "RolloutSpec",
    "Selector",
    "Wave",
    "load_manifest",
    "parse_manifest",
]

API_VERSION = "novacron.io/v1"
"""The only manifest ``apiVersion`` this hub understands."""

LabelKey = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$",
        description="label key: letters, digits, '.', '_', '-'; 1-63 characters",
    ),
]
LabelValue = Annotated[
    str,
    Field(
        pattern=r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$",
        description="label value: like a key, or empty",
    ),
]
RegionName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9._:@-]{1,64}$",
        description="region id as it appears in MQTT topics",
    ),
]
ProfileRef = Annotated[str, Field(pattern=PROFILE_NAME_PATTERN, description="profile name")]

PlacementMode = Literal["each", "replicas"]
"""``each``: every matching device; ``replicas``: N devices chosen by score and spread."""

FailureAction = Literal["pause", "rollback"]
"""What a rollout does when its failure budget is spent."""

MAX_REPLICAS = 1_000_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _unique(values: tuple[str, ...], what: str) -> tuple[str, ...]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat")
    return values


class Metadata(_Frozen):
    """Name and labels of a deployment."""

    name: Name
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)


class Selector(_Frozen):
    """Which devices a deployment may land on; every given criterion must hold.

    Empty lists and ``gpu: null`` match anything. ``labels`` must all be present
    with equal values; ``profiles``, ``regions`` and ``arch`` are sets the device's
    value must belong to; ``drivers`` is a capability list the device must offer in
    full.
    """

    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    profiles: tuple[ProfileRef, ...] = ()
    regions: tuple[RegionName, ...] = ()
    arch: tuple[Arch, ...] = ()
    drivers: tuple[DriverName, ...] = ()
    gpu: bool | None = None

    @field_validator("profiles", "regions", "arch", "drivers")
    @classmethod
    def _no_repeats(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return _unique(value, info.field_name or "entries")


class Wave(_Frozen):
    """One rollout wave: a cumulative ``percent`` of the targets, or a ``count``."""

    percent: float | None = Field(default=None, gt=0, le=100)
    count: StrictInt | None = Field(default=None, ge=1, le=MAX_REPLICAS)

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave needs exactly one of percent or count")
        return self

    def target(self, total: int) -> int:
        """Devices this wave reaches (cumulatively) out of ``total`` targets."""
        if self.percent is not None:
            # Rounded up: 10 % of 5 devices is one device, never zero.
            return min(total, math.ceil(total * self.percent / 100 - 1e-9))
        assert self.count is not None
        return min(total, self.count)


def _default_waves() -> tuple[Wave, ...]:
    return (Wave(percent=100),)


class RolloutSpec(_Frozen):
    """How a new version of a deployment reaches its targets, wave by wave.

    Attributes:
        waves: cumulative wave targets; the last one must be ``{percent: 100}``.
        success_threshold: fraction of a wave's devices that must report the new
            version healthy before the next wave starts.
        wave_timeout_s: how long a wave may take before it counts as failed.
        offline_deadline_s: how long an offline target stays pending before the
            wave goes on without it (it catches up when it returns).
        failure_budget: failed devices tolerated over the whole rollout: a whole
            number is a count, a number with a fraction part between 0 and 1 is a
            fraction of the targets.
        on_failure: what happens when the budget is spent or a wave times out.
    """

    waves: tuple[Wave, ...] = Field(default_factory=_default_waves)
    success_threshold: float = Field(default=0.9, gt=0, le=1)
    wave_timeout_s: float = Field(default=600.0, gt=0, le=7 * 86_400)
    offline_deadline_s: float = Field(default=3600.0, gt=0, le=30 * 86_400)
    failure_budget: StrictInt | float = Field(default=0.1, ge=0)
    on_failure: FailureAction = "pause"

    @field_validator("waves")
    @classmethod
    def _check_waves(cls, waves: tuple[Wave, ...]) -> tuple[Wave, ...]:
        if not waves:
            raise ValueError("at least one wave is needed (e.g. [{percent: 100}])")
        last = waves[-1]
        if last.percent != 100:
            raise ValueError("the last wave must be {percent: 100} so every target is reached")
        percents = [w.percent for w in waves if w.percent is not None]
        counts = [w.count for w in waves if w.count is not None]
        for what, seq in (("percent", percents), ("count", counts)):
            if any(b <= a for a, b in itertools.pairwise(seq)):
                raise ValueError(f"wave {what} entries must increase (waves are cumulative)")
        return waves

    @field_validator("failure_budget", mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            # pydantic reports ValueError as a validation error; TypeError would escape.
            raise ValueError(  # noqa: TRY004
                "failure_budget must be a count or a fraction, not a boolean"
            )
        return value

    @field_validator("failure_budget")
    @classmethod
    def _check_budget(cls, value: int | float) -> int | float:
        if isinstance(value, float) and value > 1:
            if value.is_integer():
                return int(value)
            raise ValueError("failure_budget must be a whole count or a fraction between 0 and 1")
        return value

    def wave_targets(self, total: int) -> tuple[int, ...]:
        """Cumulative device counts of each wave for ``total`` targets.

        Non-decreasing, and the last one equals ``total`` (a ``count`` wave larger
        than an earlier ``percent`` wave does not shrink the rollout).

        Args:
            total: number of devices the deployment is placed on.
        """
        out: list[int] = []
        reached = 0
        for wave in self.waves:
            reached = max(reached, wave.target(total))
            out.append(reached)
        return tuple(out)

    def failure_budget_count(self, total: int) -> int:
        """Failed devices tolerated for ``total`` targets (a fraction rounds down)."""
        if isinstance(self.failure_budget, int):
            return self.failure_budget
        return math.floor(total * self.failure_budget + 1e-9)


class DeploymentSpec(_Frozen):
    """What runs, where, how many, and how a new version rolls out.

    ``mode`` may be left out: it is ``replicas`` when ``replicas`` is given and
    ``each`` otherwise.
    """

    workload: WorkloadSpec
    selector: Selector = Field(default_factory=Selector)
    mode: PlacementMode = "each"
    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS, validate_default=True)
    resources: Resources | None = None
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)

    @model_validator(mode="before")
    @classmethod
    def _infer_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mode" not in data and data.get("replicas") is not None:
            return {**data, "mode": "replicas"}
        return data

    @field_validator("selector")
    @classmethod
    def _driver_selected(cls, selector: Selector, info: ValidationInfo) -> Selector:
        workload = info.data.get("workload")
        if (
            isinstance(workload, WorkloadSpec)
            and selector.drivers
            and workload.driver not in selector.drivers
        ):
            raise ValueError(
                f"drivers {list(selector.drivers)} do not include the workload's "
                f"driver {workload.driver!r}"
            )
        return selector

    @field_validator("replicas")
    @classmethod
    def _replicas_for_mode(cls, replicas: int | None, info: ValidationInfo) -> int | None:
        mode = info.data.get("mode")
        if mode == "replicas" and replicas is None:
            raise ValueError("mode: replicas needs replicas: N")
        if mode == "each" and replicas is not None:
            raise ValueError("replicas is only allowed with mode: replicas")
        return replicas

    @property
    def effective_resources(self) -> Resources:
        """The resources placement reserves: ``resources``, else the workload's."""
        return self.resources if self.resources is not None else self.workload.resources

    @property
    def required_drivers(self) -> frozenset[str]:
        """Drivers a device must offer: the selector's and the workload's own."""
        return frozenset((*self.selector.drivers, self.workload.driver))


class Deployment(_Frozen):
    """A ``kind: Deployment`` manifest."""

    kind: Literal["Deployment"]
    api_version: Literal["novacron.io/v1"] = Field(alias="apiVersion")
    metadata: Metadata
    spec: DeploymentSpec

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def name(self) -> str:
        """The deployment's name (``metadata.name``)."""
        return self.metadata.name

    def desired_workload(self) -> WorkloadSpec:
        """The workload as devices receive it, carrying the effective resources."""
        resources = self.spec.effective_resources
        if resources == self.spec.workload.resources:
            return self.spec.workload
        return self.spec.workload.model_copy(update={"resources": resources})

    def to_document(self) -> dict[str, Any]:
        """The manifest as a JSON-ready mapping that :func:`parse_manifest` reads back."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: a repeated key is a ValueError."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_document(text: str, *, source: str, as_json: bool) -> dict[str, Any]:
    if as_json:
        try:
            data = json.loads(text, object_pairs_hook=reject_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}", source=source
            ) from exc
        except ValueError as exc:  # a duplicate key, from the hook
            raise ConfigError(f"invalid JSON: {exc}", source=source) from exc
    else:
        try:
            data = yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, source) from exc
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"expected a mapping at the top level, got {kind}", source=source)
    return data


def parse_manifest(text: str, *, source: str = "<text>", as_json: bool | None = None) -> Deployment:
    """Parse and validate a manifest given as text.

    Args:
        text: the YAML or JSON document.
        source: what to name in errors (a file name, ``"<stdin>"``, a request id).
        as_json: parse as JSON (``True``) or YAML (``False``); by default JSON when
            the text starts with ``{``.

    Returns:
        The validated deployment.

    Raises:
        ConfigError: invalid syntax (naming the line) or an invalid manifest
            (naming the dotted field, e.g. ``spec.selector``).
    """
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"manifest larger than {MAX_FILE_BYTES} bytes", source=source)
    if as_json is None:
        as_json = text.lstrip().startswith("{")
    data = _parse_document(text, source=source, as_json=as_json)
    try:
        return Deployment.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, source=source) from exc


def _looks_like_text(value: str) -> bool:
    return "\n" in value or value.lstrip().startswith("{")


def load_manifest(path_or_text: str | PathLike[str]) -> Deployment:
    """Load a manifest from a file, or from text.

    A path-like object is always a file. A string holding a newline or starting
    with ``{`` is the manifest itself; any other string is a file name. Files
    ending in ``.json`` are parsed as JSON, others as YAML (JSON text starting
    with ``{`` is recognised either way).

    Args:
        path_or_text: a file path, or the manifest text.

    Returns:
        The validated deployment.

    Raises:
        ConfigError: the file is missing, unreadable, too large, not valid YAML or
            JSON, or not a valid manifest; the error names the file (``<text>``
            for text) and the line or the dotted field.
    """
    if isinstance(path_or_text, str) and _looks_like_text(path_or_text):
        return parse_manifest(path_or_text)
    path = Path(fspath(path_or_text))
    source = str(path)
    text = read_text_file(path)
    as_json = True if path.suffix.lower() == ".json" else None
    return parse_manifest(text, source=source, as_json=as_json)
