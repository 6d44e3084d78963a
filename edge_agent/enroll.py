"""Enrollment: register this device with the hub and keep what the hub answers.

``novacron agent enroll --hub URL --token T`` makes (or loads) the device key,
gathers :class:`~sync.models.DeviceFacts`, and POSTs to ``{hub}/api/v1/enroll``::

    {"token": T, "public_key": <base64 of the 32 raw bytes>, "facts": {...},
     "profile": "raspberry-pi-4"}

The hub answers 200/201 with :class:`EnrollResponse` (device id, region, relay
brokers, broker account, hub public key) or an RFC 7807 problem document with a
4xx status (spent, expired or unknown token; key already enrolled) or 5xx.

What the hub answered is stored in the data directory, each file written
atomically:

- ``enrollment.json`` (mode 0600): :class:`Enrollment`, read back by
  :func:`load_enrollment`;
- ``hub.pub``: the hub's Ed25519 public key as one base64 line
  (:func:`load_hub_public_key`);
- ``mqtt.password`` (mode 0600): the broker password, referenced by the config's
  ``credentials.password_file``.

With a config file, its ``device_id``, ``region``, ``data_dir``, ``profile``,
``relays`` and ``credentials`` are set (the file is created if missing; other
settings are kept, YAML comments are not).

Every local check (hub URL, profile, config, already enrolled) runs before the
request, because a token is spent by the first request that the hub accepts.

Errors::

    AgentError (edge_agent._exceptions)
    └── EnrollError                    enrollment failed
        ├── AlreadyEnrolledError       data dir holds an enrollment; --force to redo
        ├── NotEnrolledError           no enrollment.json in the data dir
        ├── EnrollmentCorruptError     enrollment.json / hub.pub unreadable or invalid
        ├── UnsupportedDeviceError     the machine's architecture is not supported
        ├── HubUnreachableError        connection refused, DNS, TLS, timeout
        ├── MalformedResponseError     a success status with an invalid body
        └── HubResponseError           an error status (5xx, unexpected 3xx/2xx)
            └── HubRejectedError       a 4xx: the hub refused the request

Bad command-line input and config files raise :class:`~sync._exceptions.ConfigError`.
The wire models, errors and answer parsing are pure and live in
:mod:`edge_agent._enroll_wire`; this module adds the network and the files.
Reading ``hub.pub`` and ``relays.pub`` (and the errors that can raise) lives in
:mod:`edge_agent.identity` and :mod:`edge_agent._exceptions`, re-exported here, so
the running agent never imports the enrollment code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import yaml
from pydantic import SecretStr, ValidationError

from edge_agent._enroll_wire import (
    ENROLL_PATH,
    AlreadyEnrolledError,
    Enrollment,
    EnrollRequest,
    EnrollResponse,
    HubRejectedError,
    HubResponseError,
    HubUnreachableError,
    MalformedResponseError,
    MqttAccount,
    UnsupportedDeviceError,
    enroll_url,
    parse_answer,
)
from edge_agent._exceptions import EnrollError, EnrollmentCorruptError, NotEnrolledError
from edge_agent.config import DEFAULT_DATA_DIR, AgentConfig
from edge_agent.identity import (
    DEVICE_KEY_NAME,
    HUB_KEY_FILE,
    RELAY_KEYS_FILE,
    decode_public_key,
    load_hub_public_key,
    load_or_create_device_key,
    load_relay_public_keys,
)
from firmware_profiles import load_profile
from firmware_profiles._yamlio import read_yaml_mapping, validation_error
from sync._exceptions import ConfigError
from sync.models import DeviceFacts

if TYPE_CHECKING:
    import aiohttp

    from firmware_profiles import Arch, FirmwareProfile
    from sync.keys import Signer

__all__ = [
    "AlreadyEnrolledError",
    "ENROLLMENT_FILE",
    "ENROLL_PATH",
    "EnrollError",
    "EnrollOptions",
    "EnrollRequest",
    "EnrollResponse",
    "Enrollment",
    "EnrollmentCorruptError",
    "HUB_KEY_FILE",
    "RELAY_KEYS_FILE",
    "HubRejectedError",
    "HubResponseError",
    "HubUnreachableError",
    "MalformedResponseError",
    "MqttAccount",
    "NotEnrolledError",
    "PASSWORD_FILE",
    "UnsupportedDeviceError",
    "decode_public_key",
    "enroll",
    "enroll_url",
    "enrolled_config",
    "gather_facts",
    "load_enrollment",
    "load_hub_public_key",
    "load_relay_public_keys",
    "map_arch",
    "parse_answer",
    "post_enrollment",
    "save_enrollment",
]

logger = logging.getLogger(__name__)

ENROLLMENT_FILE: Final = "enrollment.json"
PASSWORD_FILE: Final = "mqtt.password"

_MAX_ANSWER_BYTES: Final = 64 * 1024
_MAX_ENROLLMENT_BYTES: Final = 256 * 1024
_CONNECT_TIMEOUT_S: Final = 10.0

_ARCH_ALIASES: Final[dict[str, Arch]] = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv7l": "armv7l",
    "armv7": "armv7l",
    "armv8l": "armv7l",  # 32-bit userland on a 64-bit core runs armv7 binaries
    "armhf": "armv7l",
    "riscv64": "riscv64",
    "mips": "mips",
    "mipsel": "mips",
    "mips64": "mips",
    "mips64el": "mips",
}


# --------------------------------------------------------------------------- facts


def map_arch(machine: str) -> Arch:
    """Map a :func:`platform.machine` value to a supported architecture name.

    Raises:
        UnsupportedDeviceError: the machine is none of the supported families.
    """
    arch = _ARCH_ALIASES.get(machine.strip().lower())
    if arch is None:
        raise UnsupportedDeviceError(machine)
    return arch


def _memory_total_mb(meminfo: Path) -> int | None:
    try:
        text = meminfo.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "MemTotal":
            parts = value.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) // 1024
    return None


def _storage_total_mb(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize // (1024 * 1024)


def _agent_version() -> str:
    try:
        return importlib.metadata.version("novacron-edge")[:64]
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def gather_facts(
    profile: FirmwareProfile,
    data_dir: Path,
    *,
    meminfo: Path = Path("/proc/meminfo"),
    machine: str | None = None,
    hostname: str | None = None,
) -> DeviceFacts:
    """Describe this device for the hub. Blocking (reads ``/proc``).

    Figures the host does not expose fall back to the profile's nominal ones
    (memory), or to zero (storage), with a warning.

    Args:
        profile: the device's firmware profile; gives the drivers and GPU flag.
        data_dir: the agent's data directory; its filesystem size is the storage.
        meminfo: where to read ``MemTotal``.
        machine: override of :func:`platform.machine` (tests).
        hostname: override of :func:`socket.gethostname` (tests).

    Returns:
        The facts.

    Raises:
        UnsupportedDeviceError: the architecture is not supported.
    """
    arch = map_arch(platform.machine() if machine is None else machine)
    memory_mb = _memory_total_mb(meminfo)
    if memory_mb is None or memory_mb < 1:
        logger.warning(
            "cannot read MemTotal from %s; reporting the profile's %s MB",
            meminfo,
            profile.memory_mb,
        )
        memory_mb = profile.memory_mb
    storage_mb = _storage_total_mb(data_dir)
    if storage_mb is None:
        logger.warning("cannot stat %s; reporting 0 MB of storage", data_dir)
        storage_mb = 0
    name = (socket.gethostname() if hostname is None else hostname)[:253] or "localhost"
    return DeviceFacts(
        hostname=name,
        arch=arch,
        cpu_cores=min(max(os.cpu_count() or 1, 1), 1024),
        memory_mb=memory_mb,
        storage_mb=storage_mb,
        os=(platform.system().lower() or "linux")[:128],
        agent_version=_agent_version(),
        drivers=profile.drivers,
        gpu=profile.gpu,
    )


# --------------------------------------------------------------------------- HTTP


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout_s:g} s"
    return str(exc) or type(exc).__name__


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """Read the body, or return None once it grows past ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def post_enrollment(
    hub_url: str, request: EnrollRequest, *, timeout_s: float = 30.0
) -> EnrollResponse:
    """POST ``request`` to the hub's enrollment endpoint and parse the answer.

    Redirects are not followed: the body carries a secret token.

    Args:
        hub_url: the hub's base URL.
        request: what to send.
        timeout_s: deadline for the whole exchange; connecting gets at most 10 s.

    Returns:
        The validated answer.

    Raises:
        ConfigError: ``hub_url`` is not a valid hub URL.
        HubUnreachableError: connection, DNS, TLS failure or timeout.
        HubRejectedError: the hub refused the enrollment (4xx).
        HubResponseError: another error status (5xx, 3xx).
        MalformedResponseError: a success status with an invalid body.
    """
    url = enroll_url(hub_url)
    parts = urlsplit(url)
    if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        logger.warning(
            "enrolling over plain http: the token and broker password are not "
            "encrypted on the way to %s",
            parts.hostname,
        )
    import aiohttp  # noqa: PLC0415 - keep the agent's import cost down

    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S))
    headers = {"Accept": "application/json, application/problem+json"}
    logger.debug("POST %s", url)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                url, json=request.to_json(), headers=headers, allow_redirects=False
            ) as resp,
        ):
            body = await _read_capped(resp, _MAX_ANSWER_BYTES)
            status, reason = resp.status, resp.reason or ""
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise HubUnreachableError(url, _describe(exc, timeout_s)) from exc
    logger.debug("hub answered %s %s", status, reason)
    return parse_answer(url, status, reason, body)


# --------------------------------------------------------------------------- storage


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left over by a crash of an earlier run with the same pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_enrollment(data_dir: Path, enrollment: Enrollment) -> Path:
    """Store ``enrollment`` in ``data_dir``: enrollment.json, hub.pub, mqtt.password.

    Blocking. ``enrollment.json`` is written last, so its presence means the
    other files are in place.

    Args:
        data_dir: the agent's data directory (must exist).
        enrollment: what to store.

    Returns:
        The path of ``enrollment.json``.

    Raises:
        EnrollError: a file cannot be written.
    """
    path = data_dir / ENROLLMENT_FILE
    document = enrollment.to_json()
    try:
        _write_atomic(data_dir / HUB_KEY_FILE, f"{enrollment.hub_public_key}\n".encode(), 0o644)
        relay_keys = "".join(f"{k}\n" for k in enrollment.relay_public_keys)
        _write_atomic(data_dir / RELAY_KEYS_FILE, relay_keys.encode(), 0o644)
        password = enrollment.mqtt.password.get_secret_value()
        _write_atomic(data_dir / PASSWORD_FILE, f"{password}\n".encode())
        _write_atomic(path, json.dumps(document, indent=2).encode() + b"\n")
    except OSError as exc:
        raise EnrollError(f"cannot store the enrollment in {data_dir}: {exc}") from exc
    return path


def load_enrollment(data_dir: str | os.PathLike[str]) -> Enrollment:
    """Read the enrollment stored by :func:`save_enrollment`. Blocking.

    Args:
        data_dir: the agent's data directory.

    Returns:
        The stored enrollment.

    Raises:
        NotEnrolledError: there is no ``enrollment.json``.
        EnrollmentCorruptError: the file is unreadable, too large, not JSON or invalid.
    """
    path = Path(data_dir) / ENROLLMENT_FILE
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_ENROLLMENT_BYTES + 1)
    except FileNotFoundError as exc:
        raise NotEnrolledError(path) from exc
    except OSError as exc:
        raise EnrollmentCorruptError(path, f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_ENROLLMENT_BYTES:
        raise EnrollmentCorruptError(path, f"larger than {_MAX_ENROLLMENT_BYTES} bytes")
    try:
        return Enrollment.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<file>'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        raise EnrollmentCorruptError(path, problems) from exc


# --------------------------------------------------------------------------- config


def enrolled_config(
    existing: Mapping[str, Any], answer: EnrollResponse, *, data_dir: Path, profile: str
) -> dict[str, Any]:
    """Return the agent config ``existing`` updated with an enrollment. Pure.

    Sets ``device_id``, ``region``, ``data_dir``, ``profile``, ``relays`` and
    ``credentials`` (with ``password_file`` ``<data_dir>/mqtt.password``); keeps
    every other key.
    """
    data = dict(existing)
    data.update(
        device_id=answer.device_id,
        region=answer.region,
        data_dir=str(data_dir),
        profile=profile,
        relays=list(answer.relays),
        credentials={
            "username": answer.mqtt.username,
            "password_file": str(data_dir / PASSWORD_FILE),
        },
    )
    return data


def _check_config(data: Mapping[str, Any], profile: FirmwareProfile, path: Path) -> None:
    try:
        AgentConfig.for_profile(data, profile, base_dir=path.resolve().parent, source=str(path))
    except ValidationError as exc:
        raise validation_error(exc, source=str(path)) from exc


def _write_config(path: Path, data: Mapping[str, Any]) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    header = (
        f"# NovaCron Edge agent configuration, updated by `novacron agent enroll` at {stamp}.\n"
        "# See `novacron agent install` for a commented example of every setting.\n"
    )
    text = header + yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, text.encode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot write config: {exc}", source=str(path)) from exc


# --------------------------------------------------------------------------- enroll


@dataclass(frozen=True, slots=True)
class EnrollOptions:
    """What ``novacron agent enroll`` was asked to do.

    Attributes:
        hub_url: the hub's base URL.
        token: the one-time enrollment token.
        config_path: agent config to create or update; None to leave configs alone.
            An existing config also supplies defaults for the data dir, the profile
            and the key path.
        profile: firmware profile name; defaults to the config's.
        data_dir: data directory; defaults to the config's, then /var/lib/novacron.
        force: enroll even if the data directory already holds an enrollment.
        timeout_s: deadline of the request to the hub.
        profile_dirs: extra firmware profile directories.
    """

    hub_url: str
    token: str
    config_path: Path | None = None
    profile: str | None = None
    data_dir: Path | None = None
    force: bool = False
    timeout_s: float = 30.0
    profile_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class _Plan:
    hub_url: str
    request: EnrollRequest
    signer: Signer
    data_dir: Path
    profile: FirmwareProfile
    config_path: Path | None
    config: Mapping[str, Any]


# Stands in for the hub's answer when the config is checked before the request.
_PLACEHOLDER = EnrollResponse.model_construct(
    device_id="enrolling",
    region="enrolling",
    relays=("mqtt://localhost:1883",),
    mqtt=MqttAccount(username="enrolling", password=SecretStr("enrolling")),
    hub_public_key="",
)


def _config_path_value(config: Mapping[str, Any], key: str, base: Path) -> Path | None:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else base / path


def _prepare(options: EnrollOptions) -> _Plan:
    """Every local step before the request, so a bad input never spends a token."""
    enroll_url(options.hub_url)
    token = options.token.strip()
    if not token:
        raise ConfigError("must not be empty", source="<argv>", field="--token")
    config: dict[str, Any] = {}
    base = Path.cwd()
    if options.config_path is not None:
        base = options.config_path.absolute().parent
        if options.config_path.exists():
            config = read_yaml_mapping(options.config_path)
    data_dir = (
        options.data_dir or _config_path_value(config, "data_dir", base) or DEFAULT_DATA_DIR
    ).absolute()
    existing = data_dir / ENROLLMENT_FILE
    if existing.exists() and not options.force:
        try:
            device_id: str | None = load_enrollment(data_dir).device_id
        except EnrollError:
            device_id = None
        raise AlreadyEnrolledError(existing, device_id)
    name = options.profile or config.get("profile")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            "no firmware profile: pass --profile NAME (or --config with a profile)",
            source="<argv>",
            field="--profile",
        )
    profile = load_profile(name, options.profile_dirs)
    if options.config_path is not None:
        placeholder = enrolled_config(config, _PLACEHOLDER, data_dir=data_dir, profile=profile.name)
        _check_config(placeholder, profile, options.config_path)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data directory: {exc}", source=str(data_dir)) from exc
    key_path = _config_path_value(config, "key_path", base) or data_dir / DEVICE_KEY_NAME
    signer = load_or_create_device_key(key_path)
    request = EnrollRequest(
        token=SecretStr(token),
        public_key=base64.b64encode(signer.public_key_bytes).decode(),
        facts=gather_facts(profile, data_dir),
        profile=profile.name,
    )
    return _Plan(
        hub_url=options.hub_url.strip(),
        request=request,
        signer=signer,
        data_dir=data_dir,
        profile=profile,
        config_path=options.config_path,
        config=config,
    )


def _commit(plan: _Plan, answer: EnrollResponse) -> Enrollment:
    enrollment = Enrollment(
        **dict(answer),
        hub_url=plan.hub_url,
        profile=plan.profile.name,
        device_public_key=plan.request.public_key,
        device_key_id=plan.signer.key_id,
        enrolled_at=datetime.now(UTC),
    )
    path = save_enrollment(plan.data_dir, enrollment)
    logger.info(
        "enrolled as %s in region %s with key %s; stored in %s",
        enrollment.device_id,
        enrollment.region,
        enrollment.device_key_id,
        path,
    )
    if plan.config_path is not None:
        data = enrolled_config(
            plan.config, answer, data_dir=plan.data_dir, profile=plan.profile.name
        )
        _check_config(data, plan.profile, plan.config_path)
        _write_config(plan.config_path, data)
        logger.info("wrote agent config %s", plan.config_path)
    return enrollment


async def enroll(options: EnrollOptions) -> Enrollment:
    """Enroll this device with the hub and store the result.

    Checks the inputs, makes or loads the device key, gathers the facts, POSTs
    the request, stores the answer in the data directory and, with
    ``options.config_path``, writes the agent config. Blocking steps run in a
    worker thread.

    Args:
        options: what to do.

    Returns:
        The stored enrollment.

    Raises:
        ConfigError: bad hub URL, token, profile or config file.
        AlreadyEnrolledError: already enrolled and ``options.force`` is false.
        UnsupportedDeviceError: the CPU architecture is not supported.
        HubUnreachableError: the hub cannot be reached in time.
        HubRejectedError: the hub refused the enrollment (4xx).
        HubResponseError: the hub failed (5xx) or answered unexpectedly.
        MalformedResponseError: the hub's answer is invalid.
        EnrollError: the result cannot be stored.
    """
    plan = await asyncio.to_thread(_prepare, options)
    answer = await post_enrollment(plan.hub_url, plan.request, timeout_s=options.timeout_s)
    return await asyncio.to_thread(_commit, plan, answer)
