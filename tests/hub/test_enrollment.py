"""Enrollment through ``POST /api/v1/enroll`` on the real app and store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from cloud_hub.enrollment import (
    Enrollment,
    RegionInfo,
    device_id_for,
    mint_enroll_token,
    parse_enroll_token,
)
from cloud_hub.store import DeviceQuery
from edge_agent._enroll_wire import EnrollRequest, parse_answer
from sync._exceptions import ConfigError
from sync.keys import Signer
from tests.hub.api_harness import (
    PROFILE,
    REGION,
    Hub,
    RecordingBroker,
    enroll_body,
    running_hub,
)
from tests.hub.test_api import manifest


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with running_hub(tmp_path) as served:
        yield served


async def token_record(hub: Hub, token: str) -> Any:
    parsed = parse_enroll_token(token)
    assert parsed is not None
    return await hub.ctx.store.get_enroll_token(parsed[0])


async def test_enroll_returns_region_relays_keys_and_credentials(hub: Hub) -> None:
    token = await hub.enrollment_token(labels={"site": "plant-1"})
    key = Signer.generate()
    resp = await hub.client.post("/api/v1/enroll", json=enroll_body(token, key.public_key_bytes))
    assert resp.status == 201
    raw = await resp.read()
    answer = parse_answer("http://hub/api/v1/enroll", resp.status, "Created", raw)  # agent's parser

    expected_id = "dev-" + hashlib.sha256(key.public_key_bytes).hexdigest()[:16]
    assert (
        answer.device_id
        == expected_id
        == device_id_for(base64.b64encode(key.public_key_bytes).decode())
    )
    assert answer.region == REGION
    assert answer.relays == ("mqtt://127.0.0.1:1884", "mqtts://relay-2.example.net:8883")
    assert answer.relay_public_keys == hub.services.relay_keys
    assert answer.hub_public_key_bytes == hub.services.hub_key.public_key_bytes
    assert answer.mqtt.username == expected_id
    password = answer.mqtt.password.get_secret_value()
    assert len(password) >= 24

    device = await hub.ctx.store.get_device(expected_id)
    assert device.labels == {"site": "plant-1"}
    assert device.profile == PROFILE
    assert device.arch == "x86_64"
    assert device.facts["hostname"] == "gw-test"
    assert (await token_record(hub, token)).uses == 1

    entries = await asyncio.to_thread(hub.ctx.audit.entries)
    enrolled = [e for e in entries if e.action == "POST /api/v1/enroll"]
    assert len(enrolled) == 1
    parsed = parse_enroll_token(token)
    assert parsed is not None
    assert enrolled[0].actor == f"enroll:{parsed[0]}"
    assert enrolled[0].target == f"device/{expected_id}"
    assert enrolled[0].outcome == 201
    assert password not in enrolled[0].detail
    assert token.split("_", 2)[2] not in json.dumps([e.detail for e in entries])


async def test_single_use_token_is_spent(hub: Hub) -> None:
    token = await hub.enrollment_token()
    assert (await hub.enroll(token))[0] == 201
    status, body = await hub.enroll(token)
    assert status == 403
    assert body["reason"] == "spent"
    assert body["type"].endswith("/enroll-spent")
    assert len((await hub.ctx.store.list_devices(DeviceQuery())).items) == 1


async def test_token_with_n_uses(hub: Hub) -> None:
    token = await hub.enrollment_token(max_uses=3)
    for _ in range(3):
        assert (await hub.enroll(token))[0] == 201
    status, body = await hub.enroll(token)
    assert (status, body["reason"]) == (403, "spent")
    assert (await token_record(hub, token)).uses == 3


async def test_expired_token_is_refused(hub: Hub) -> None:
    token = await hub.enrollment_token(ttl_s=60)
    hub.services.clock.offset_ms = 61_000
    status, body = await hub.enroll(token)
    assert (status, body["reason"]) == (403, "expired")
    assert (await token_record(hub, token)).uses == 0


async def test_revoked_token_is_refused(hub: Hub) -> None:
    token = await hub.enrollment_token(max_uses=5)
    record = await token_record(hub, token)
    await hub.ok("DELETE", f"/api/v1/enrollment-tokens/{record.id}", "operator")
    status, body = await hub.enroll(token)
    assert (status, body["reason"]) == (403, "revoked")


async def test_unknown_or_wrong_secret_is_refused_alike(hub: Hub) -> None:
    token = await hub.enrollment_token()
    token_id = token.split("_")[1]
    _, unknown_raw, _ = mint_enroll_token()
    for bad in (unknown_raw, f"nce_{token_id}_{'A' * 43}", "not-a-token"):
        status, body = await hub.enroll(bad)
        assert (status, body["reason"]) == (403, "unknown"), bad
    assert (await token_record(hub, token)).uses == 0


async def test_duplicate_key_is_refused_and_token_not_spent(hub: Hub, tmp_path: Path) -> None:
    first = await hub.enrollment_token()
    assert (await hub.enroll(first, tmp_path / "gw"))[0] == 201
    second = await hub.enrollment_token()
    status, body = await hub.enroll(second, tmp_path / "gw")  # the same device key
    assert (status, body["reason"]) == (403, "duplicate_key")
    assert (await token_record(hub, second)).uses == 0
    # after decommissioning, the same key enrolls again as the same id
    (device,) = (await hub.ctx.store.list_devices(DeviceQuery())).items
    await hub.ok("DELETE", f"/api/v1/devices/{device.id}")
    status, again = await hub.enroll(second, tmp_path / "gw")
    assert (status, again["device_id"]) == (201, device.id)


async def test_unknown_profile_is_422_and_token_not_spent(hub: Hub) -> None:
    token = await hub.enrollment_token()
    status, body = await hub.enroll(token, profile="no-such-board")
    assert status == 422
    assert body["errors"] == [
        {"loc": ["profile"], "msg": "unknown firmware profile 'no-such-board'"}
    ]
    assert (await token_record(hub, token)).uses == 0


async def test_invalid_request_is_422(hub: Hub) -> None:
    token = await hub.enrollment_token()
    body = enroll_body(token, Signer.generate().public_key_bytes)
    for bad in (
        body | {"public_key": "AAAA"},
        body | {"extra": 1},
        body | {"facts": body["facts"] | {"arch": "sparc"}},
        {k: v for k, v in body.items() if k != "token"},
    ):
        resp = await hub.client.post("/api/v1/enroll", json=bad)
        assert resp.status == 422, await resp.text()
    assert (await token_record(hub, token)).uses == 0


async def test_new_device_gets_existing_deployments(hub: Hub) -> None:
    await hub.ok("POST", "/api/v1/deployments", "operator", json=manifest())
    status, body = await hub.enroll(await hub.enrollment_token())
    assert status == 201
    assignments = await hub.ctx.store.list_assignments(deployment="web")
    assert [a.device_id for a in assignments] == [body["device_id"]]


async def test_broker_account_provisioned_and_revoked(hub: Hub) -> None:
    broker = RecordingBroker()
    hub.ctx.enrollment.broker = broker
    token = await hub.enrollment_token(max_uses=2)
    status, body = await hub.enroll(token)
    assert status == 201
    device_id = body["device_id"]
    assert broker.accounts[device_id] == (body["mqtt"]["password"], device_id, REGION)
    await hub.ok("DELETE", f"/api/v1/devices/{device_id}")
    assert broker.accounts == {}

    broker.fail = True
    status, problem = await hub.enroll(token)
    assert status == 503
    assert "try again" in problem["detail"]
    assert (await hub.ctx.store.list_devices(DeviceQuery())).items == ()


def test_bad_region_config_is_refused(tmp_path: Path) -> None:
    key = base64.b64encode(Signer.generate().public_key_bytes).decode()
    with pytest.raises(ConfigError, match="relays"):
        Enrollment(
            None,  # type: ignore[arg-type]  # never reached
            None,  # type: ignore[arg-type]
            regions={"eu": RegionInfo(("http://not-mqtt",))},
            hub_public_key=key,
            clock=lambda: 0,
        )


def test_token_format() -> None:
    token_id, raw, secret_hash = mint_enroll_token()
    assert raw.startswith(f"nce_{token_id}_")
    assert parse_enroll_token(raw) == (token_id, secret_hash)
    assert parse_enroll_token(raw + "!") is None
    request = EnrollRequest(
        token=SecretStr(raw),
        public_key=base64.b64encode(Signer.generate().public_key_bytes).decode(),
        facts={"hostname": "h", "arch": "x86_64", "cpu_cores": 1, "memory_mb": 1, "storage_mb": 0},
        profile=PROFILE,
    )
    assert raw not in repr(request)
