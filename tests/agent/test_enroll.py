"""`novacron agent enroll` against the real hub app served over real HTTP on loopback.

The hub is :func:`cloud_hub.app.make_app` with its real SQLite store, token store,
audit log and enrollment service (:class:`tests.hub.api_harness.HubThread`).
A small stand-in hub remains only for what the real hub never does: answer
slowly (the client's timeout) and answer 200/201 with a malformed body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from pydantic import SecretStr, ValidationError

from edge_agent.config import load_agent_config
from edge_agent.enroll import (
    ENROLLMENT_FILE,
    HUB_KEY_FILE,
    PASSWORD_FILE,
    EnrollmentCorruptError,
    EnrollOptions,
    EnrollRequest,
    EnrollResponse,
    HubRejectedError,
    HubResponseError,
    HubUnreachableError,
    MalformedResponseError,
    NotEnrolledError,
    UnsupportedDeviceError,
    enroll,
    enroll_url,
    gather_facts,
    load_enrollment,
    load_hub_public_key,
    map_arch,
    parse_answer,
)
from edge_agent.identity import DEVICE_KEY_NAME, load_or_create_device_key
from firmware_profiles import load_profile
from novacron.cli import main
from sync._exceptions import ConfigError
from sync.keys import Signer
from tests.hub.api_harness import REGION, RecordingBroker
from tests.hub.api_harness import HubThread as RealHub

PROFILE = "generic-x86_64"
PROBLEM = "application/problem+json"


class StandInHub:
    """Failure modes the real hub never produces: a slow answer, a malformed success."""

    def __init__(self) -> None:
        self.answer: tuple[int, bytes] = (201, b"{}")
        self.delay_s = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status, body = self.answer
        return web.Response(status=status, body=body, content_type="application/json")


class StandInThread:
    """Serves a :class:`StandInHub` on 127.0.0.1:0 from a thread with its own loop.

    ``main()`` runs its own event loop (``asyncio.run``), so the server cannot
    share the test's loop.
    """

    def __init__(self, hub: StandInHub) -> None:
        self.hub = hub
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="stand-in-hub", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/api/v1/enroll", self.hub.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def __enter__(self) -> StandInThread:
        self._thread.start()
        assert self._ready.wait(10), "stand-in hub did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RealHub]:
    with RealHub(tmp_path / "hub", broker=RecordingBroker()) as server:
        yield server


@pytest.fixture
def stand_in() -> Iterator[StandInThread]:
    with StandInThread(StandInHub()) as server:
        yield server


def _device_id(public_key: bytes) -> str:
    return "dev-" + hashlib.sha256(public_key).hexdigest()[:16]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _enroll_cli(
    server: RealHub | StandInThread,
    token: str,
    data_dir: Path,
    *extra: str,
    profile: str | None = PROFILE,
) -> int:
    argv = ["agent", "enroll", "--hub", server.url, "--token", token, "--data-dir", str(data_dir)]
    if profile is not None:
        argv += ["--profile", profile]
    return main([*argv, *extra])


ENROLL = ("POST", "/api/v1/enroll")


# --------------------------------------------------------------------------- end to end


def test_enroll_end_to_end(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = hub.enrollment_token(labels={"site": "plant-1"})
    data_dir = tmp_path / "data"
    config_path = tmp_path / "etc" / "agent.yaml"

    assert _enroll_cli(hub, token, data_dir, "--config", str(config_path)) == 0
    device_key = Signer.from_file(data_dir / DEVICE_KEY_NAME)
    device_id = _device_id(device_key.public_key_bytes)
    assert device_id in capsys.readouterr().out

    for name in (ENROLLMENT_FILE, PASSWORD_FILE, DEVICE_KEY_NAME, "../etc/agent.yaml"):
        assert _mode(data_dir / name) == 0o600, name
    assert _mode(data_dir) == 0o700
    assert hub.services is not None
    assert load_hub_public_key(data_dir) == hub.services.hub_key.public_key_bytes

    # what the hub stored from the request
    (device,) = hub.devices()
    assert device.id == device_id
    assert base64.b64decode(device.public_key) == device_key.public_key_bytes
    assert device.profile == PROFILE
    assert device.labels == {"site": "plant-1"}
    assert tuple(device.facts["drivers"]) == load_profile(PROFILE).drivers
    assert device.facts["memory_mb"] > 0
    assert device.facts["cpu_cores"] >= 1
    assert hub.token_uses(token) == 1

    enrollment = load_enrollment(data_dir)
    password = enrollment.mqtt.password.get_secret_value()
    broker = hub.services.ctx.enrollment.broker
    assert isinstance(broker, RecordingBroker)
    assert broker.accounts[device_id] == (password, device_id, REGION)
    assert enrollment.device_id == device_id
    assert enrollment.region == REGION
    assert enrollment.relays == ("mqtt://127.0.0.1:1884", "mqtts://relay-2.example.net:8883")
    assert enrollment.relay_public_keys == hub.services.relay_keys
    assert enrollment.device_key_id == device_key.key_id
    assert enrollment.hub_url == hub.url

    config = load_agent_config(config_path)
    assert config.device_id == device_id
    assert config.region == REGION
    assert config.profile == PROFILE
    assert config.data_dir == data_dir
    assert [r.url for r in config.relays] == list(enrollment.relays)
    assert config.credentials is not None
    assert config.credentials.username == device_id
    assert config.credentials.password_file == data_dir / PASSWORD_FILE
    assert config.credentials.read_password() == password


def test_enroll_updates_installed_config(hub: RealHub, tmp_path: Path) -> None:
    """Data dir and profile come from the config; its other settings are kept."""
    prefix = tmp_path / "root"
    assert main(["agent", "install", "--prefix", str(prefix), "--profile", "raspberry-pi-4"]) == 0
    config_path = prefix / "etc" / "novacron" / "agent.yaml"
    before = load_agent_config(config_path)
    token = hub.enrollment_token()

    argv = ["agent", "enroll", "--hub", hub.url, "--token", token, "--config", str(config_path)]
    assert main(argv) == 0

    (device,) = hub.devices()
    after = load_agent_config(config_path)
    assert after.device_id == device.id
    assert after.profile == "raspberry-pi-4"
    assert after.data_dir == before.data_dir
    assert after.quotas == before.quotas
    assert after.podman_url == before.podman_url
    assert device.profile == "raspberry-pi-4"
    assert load_enrollment(before.data_dir).device_id == device.id


def test_secrets_hidden_from_repr_and_default_dumps() -> None:
    request = EnrollRequest(
        token=SecretStr("s3cret-token"),
        public_key=base64.b64encode(Signer.generate().public_key_bytes).decode(),
        facts=gather_facts(load_profile(PROFILE), Path("/"), machine="x86_64"),
        profile=PROFILE,
    )
    assert "s3cret-token" not in repr(request)
    assert "s3cret-token" not in request.model_dump_json()
    assert request.to_json()["token"] == "s3cret-token"


# --------------------------------------------------------------------------- hub refuses


def test_token_reuse_exits_2_with_hub_detail(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = hub.enrollment_token()
    assert _enroll_cli(hub, token, tmp_path / "first") == 0
    capsys.readouterr()

    assert _enroll_cli(hub, token, tmp_path / "second") == 2
    err = capsys.readouterr().err
    assert "hub refused enrollment (403): Enrollment token refused: spent" in err
    assert not (tmp_path / "second" / ENROLLMENT_FILE).exists()
    assert len(hub.devices()) == 1


@pytest.mark.parametrize("reason", ["expired", "unknown", "revoked"])
def test_expired_unknown_or_revoked_token_exits_2(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], reason: str
) -> None:
    assert hub.services is not None
    token = hub.enrollment_token(ttl_s=60)
    if reason == "expired":
        hub.services.clock.offset_ms = 61_000
    elif reason == "unknown":
        token = "nce_000000000000_" + "A" * 43
    else:
        hub.run(hub.services.ctx.enrollment.revoke_token(token.split("_")[1]))
    assert _enroll_cli(hub, token, tmp_path / "data") == 2
    assert f"Enrollment token refused: {reason}" in capsys.readouterr().err
    assert hub.devices() == []


async def test_rejection_carries_problem_fields(hub: RealHub, tmp_path: Path) -> None:
    assert hub.services is not None
    token = hub.enrollment_token(ttl_s=1)
    hub.services.clock.offset_ms = 5_000
    options = EnrollOptions(hub_url=hub.url, token=token, profile=PROFILE, data_dir=tmp_path / "d")
    with pytest.raises(HubRejectedError) as info:
        await enroll(options)
    assert info.value.status == 403
    assert info.value.title == "Enrollment token refused: expired"
    assert info.value.problem_type.endswith("/enroll-expired")


def test_duplicate_key_exits_2(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    assert _enroll_cli(hub, hub.enrollment_token(), data_dir) == 0
    first = load_enrollment(data_dir).device_id
    capsys.readouterr()

    second = hub.enrollment_token()
    assert _enroll_cli(hub, second, data_dir, "--force") == 2
    assert "Enrollment token refused: duplicate_key" in capsys.readouterr().err
    assert load_enrollment(data_dir).device_id == first  # left as it was
    assert hub.token_uses(second) == 0


# --------------------------------------------------------------------------- re-enrolling


def test_reenroll_refused_without_force(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    assert _enroll_cli(hub, hub.enrollment_token(), data_dir) == 0
    device_id = load_enrollment(data_dir).device_id
    capsys.readouterr()

    second = hub.enrollment_token()
    assert _enroll_cli(hub, second, data_dir) == 2
    err = capsys.readouterr().err
    assert f"already enrolled as {device_id!r}" in err
    assert "--force" in err
    assert hub.requests_to(*ENROLL) == 1  # the hub was not asked: the token is not spent
    assert hub.token_uses(second) == 0


def test_force_reenrolls_with_the_same_key(hub: RealHub, tmp_path: Path) -> None:
    assert hub.services is not None
    data_dir = tmp_path / "data"
    assert _enroll_cli(hub, hub.enrollment_token(), data_dir) == 0
    first = load_enrollment(data_dir)
    hub.run(hub.services.ctx.enrollment.decommission(first.device_id))  # as an operator does

    assert _enroll_cli(hub, hub.enrollment_token(), data_dir, "--force") == 0

    second = load_enrollment(data_dir)
    assert second.device_id == first.device_id  # the id follows from the key
    assert second.device_public_key == first.device_public_key
    assert second.mqtt.password != first.mqtt.password
    (device,) = hub.devices()
    assert device.public_key == first.device_public_key


def test_device_key_made_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / DEVICE_KEY_NAME
    first = load_or_create_device_key(path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    second = load_or_create_device_key(path)
    assert second.public_key_bytes == first.public_key_bytes
    assert second.key_id == first.key_id


def test_unreadable_device_key_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / DEVICE_KEY_NAME
    path.write_bytes(b"not a key")
    with pytest.raises(ConfigError):
        load_or_create_device_key(path)
    assert path.read_bytes() == b"not a key"


# --------------------------------------------------------------------------- hub failures


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_hub_unreachable_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    argv = ["agent", "enroll", "--hub", url, "--token", "t", "--profile", PROFILE]
    assert main([*argv, "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the hub at {url}/api/v1/enroll" in err
    assert not (tmp_path / "data" / ENROLLMENT_FILE).exists()


async def test_hub_timeout_is_unreachable(stand_in: StandInThread, tmp_path: Path) -> None:
    stand_in.hub.delay_s = 1.5
    options = EnrollOptions(
        hub_url=stand_in.url, token="t", profile=PROFILE, data_dir=tmp_path / "data", timeout_s=0.3
    )
    with pytest.raises(HubUnreachableError, match=r"no answer within 0\.3 s"):
        await enroll(options)


def test_hub_server_error_exits_1(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hub.services is not None
    broker = hub.services.ctx.enrollment.broker
    assert isinstance(broker, RecordingBroker)
    broker.fail = True
    assert _enroll_cli(hub, hub.enrollment_token(), tmp_path / "data") == 1
    err = capsys.readouterr().err
    assert "503" in err
    assert "could not be provisioned; try again later" in err
    assert not (tmp_path / "data" / ENROLLMENT_FILE).exists()
    assert hub.devices() == []


def _answer(**changes: Any) -> bytes:
    answer = {
        "device_id": "gw-1",
        "region": "eu",
        "relays": ["mqtt://relay:1883"],
        "mqtt": {"username": "gw-1", "password": "pw"},
        "hub_public_key": base64.b64encode(Signer.generate().public_key_bytes).decode(),
    }
    return json.dumps(answer | changes).encode()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>hello</html>", "not JSON"),
        (_answer(device_id="gw/1"), "device_id"),
        (_answer(relays=["http://relay:80"]), "relays.0"),
        (_answer(relays=[]), "relays"),
        (_answer(relays=["mqtt://a:1883", "mqtt://a"]), "must not repeat"),
        (_answer(hub_public_key="AAAA"), "hub_public_key"),
        (_answer(surprise=1), "surprise"),
        (_answer(mqtt={"username": "gw-1"}), "mqtt.password"),
    ],
)
async def test_malformed_answer_raises_typed_error(
    stand_in: StandInThread, tmp_path: Path, body: bytes, match: str
) -> None:
    stand_in.hub.answer = (200, body)
    data_dir = tmp_path / "data"
    options = EnrollOptions(hub_url=stand_in.url, token="t", profile=PROFILE, data_dir=data_dir)
    with pytest.raises(MalformedResponseError, match=match) as info:
        await enroll(options)
    assert info.value.status == 200
    assert not (data_dir / ENROLLMENT_FILE).exists()


def test_malformed_answer_exits_1(
    stand_in: StandInThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stand_in.hub.answer = (201, b"[]")
    assert _enroll_cli(stand_in, "t", tmp_path / "data") == 1
    assert "invalid answer from the hub" in capsys.readouterr().err


def test_parse_answer_without_problem_json() -> None:
    with pytest.raises(HubRejectedError) as info:
        parse_answer("http://hub/api/v1/enroll", 403, "Forbidden", b"go   away\n")
    assert (info.value.title, info.value.detail) == ("Forbidden", "go away")
    with pytest.raises(HubResponseError) as server:
        parse_answer("http://hub/api/v1/enroll", 302, "Found", b"")
    assert not isinstance(server.value, HubRejectedError)


# --------------------------------------------------------------------------- local input


@pytest.mark.parametrize(
    "url", ["ftp://hub", "hub.example.net", "https://user:pw@hub", "https://hub/?x=1"]
)
def test_bad_hub_url_exits_2_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    data_dir = tmp_path / "data"
    argv = ["agent", "enroll", "--hub", url, "--token", "t", "--profile", PROFILE]
    assert main([*argv, "--data-dir", str(data_dir)]) == 2
    assert "--hub" in capsys.readouterr().err
    assert not data_dir.exists()


def test_missing_profile_exits_2(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _enroll_cli(hub, "t", tmp_path / "data", profile=None) == 2
    assert "--profile" in capsys.readouterr().err
    assert hub.requests_to(*ENROLL) == 0


def test_invalid_config_is_refused_before_the_token_is_spent(hub: RealHub, tmp_path: Path) -> None:
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump({"drivers": ["libvirt"], "profile": "raspberry-pi-4"}))
    token = hub.enrollment_token()
    argv = ["agent", "enroll", "--hub", hub.url, "--token", token, "--config", str(config_path)]
    assert main([*argv, "--data-dir", str(tmp_path / "data")]) == 2
    assert hub.requests_to(*ENROLL) == 0
    assert hub.token_uses(token) == 0


def test_enroll_url() -> None:
    assert enroll_url("https://hub.example.net") == "https://hub.example.net/api/v1/enroll"
    assert enroll_url("http://h:8080/nc/") == "http://h:8080/nc/api/v1/enroll"


# --------------------------------------------------------------------------- facts, storage


@pytest.mark.parametrize(
    ("machine", "arch"),
    [
        ("x86_64", "x86_64"),
        ("AMD64", "x86_64"),
        ("arm64", "aarch64"),
        ("armv7l", "armv7l"),
        ("armv8l", "armv7l"),
        ("riscv64", "riscv64"),
        ("mipsel", "mips"),
    ],
)
def test_map_arch(machine: str, arch: str) -> None:
    assert map_arch(machine) == arch


def test_unsupported_arch() -> None:
    with pytest.raises(UnsupportedDeviceError, match="s390x"):
        map_arch("s390x")


def test_gather_facts_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        3906252 kB\nMemFree:          123456 kB\n")
    profile = load_profile("raspberry-pi-4")
    facts = gather_facts(profile, tmp_path, meminfo=meminfo, machine="aarch64", hostname="gw")
    assert (facts.hostname, facts.arch, facts.memory_mb) == ("gw", "aarch64", 3814)
    assert facts.drivers == profile.drivers
    assert facts.storage_mb > 0


def test_gather_facts_without_meminfo_uses_profile(tmp_path: Path) -> None:
    profile = load_profile(PROFILE)
    facts = gather_facts(profile, tmp_path, meminfo=tmp_path / "missing", machine="x86_64")
    assert facts.memory_mb == profile.memory_mb


def test_load_enrollment_missing(tmp_path: Path) -> None:
    with pytest.raises(NotEnrolledError):
        load_enrollment(tmp_path)
    with pytest.raises(NotEnrolledError):
        load_hub_public_key(tmp_path)


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"device_id": "gw-1"}', b"[]"])
def test_load_enrollment_corrupt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / ENROLLMENT_FILE).write_bytes(content)
    with pytest.raises(EnrollmentCorruptError) as info:
        load_enrollment(tmp_path)
    assert info.value.path == tmp_path / ENROLLMENT_FILE


def test_corrupt_hub_key(tmp_path: Path) -> None:
    (tmp_path / HUB_KEY_FILE).write_text("AAAA\n")
    with pytest.raises(EnrollmentCorruptError):
        load_hub_public_key(tmp_path)


def test_corrupt_enrollment_still_counts_as_enrolled(
    hub: RealHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / ENROLLMENT_FILE).write_text("{")
    assert _enroll_cli(hub, "t", data_dir) == 2
    assert "already enrolled (" in capsys.readouterr().err


def test_response_model_is_frozen() -> None:
    response = EnrollResponse.model_validate_json(_answer())
    with pytest.raises(ValidationError):
        response.device_id = "other"  # type: ignore[misc]
    assert response.relay_endpoints[0].port == 1883
    assert len(response.hub_public_key_bytes) == 32
