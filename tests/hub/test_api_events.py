"""Server-sent events, the event bus and /metrics."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientResponse

from cloud_hub.events import DROPPED, EventBus
from tests.hub.api_harness import Hub, running_hub
from tests.hub.test_api import enroll_devices, manifest


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with running_hub(tmp_path) as served:
        yield served


async def read_event(resp: ClientResponse, kind: str) -> dict[str, object]:
    """Read SSE lines until an event of ``kind``; return its data."""
    async with asyncio.timeout(5):
        current = ""
        while True:
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("event: "):
                current = line.removeprefix("event: ").strip()
            elif line.startswith("data: ") and current == kind:
                data: dict[str, object] = json.loads(line.removeprefix("data: "))
                return data


# -- SSE -------------------------------------------------------------------------------------


async def test_stream_receives_enrollment_and_ends_on_shutdown(hub: Hub) -> None:
    resp = await hub.call("GET", "/api/v1/events/stream", "viewer")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert (await resp.content.readline()) == b": connected\n"
    assert hub.ctx.events.subscribers == 1

    (device_id,) = await enroll_devices(hub, 1)
    data = await read_event(resp, "device.enrolled")
    assert data["id"] == device_id
    await hub.ok("POST", "/api/v1/deployments", "operator", json=manifest())
    applied = await read_event(resp, "deployment.applied")
    assert applied == {"name": "web", "version": 1}

    app = hub.client.app
    assert app is not None
    await app.shutdown()
    async with asyncio.timeout(5):
        rest = await resp.content.read()
    assert resp.content.at_eof()
    assert b"event:" not in rest or rest.endswith(b"\n\n")
    assert hub.ctx.events.subscribers == 0


async def test_stream_needs_a_fleet_reader(hub: Hub) -> None:
    await hub.problem(401, "GET", "/api/v1/events/stream", None)
    await hub.problem(403, "GET", "/api/v1/events/stream", "device")


async def test_stream_heartbeat(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_hub import _api_system

    monkeypatch.setattr(_api_system, "HEARTBEAT_S", 0.05)
    resp = await hub.call("GET", "/api/v1/events/stream", "viewer")
    await resp.content.readline()
    await resp.content.readline()
    async with asyncio.timeout(5):
        assert (await resp.content.readline()) == b": heartbeat\n"
    resp.close()


# -- the bus ---------------------------------------------------------------------------------


async def test_bus_drops_oldest_and_tells_the_subscriber() -> None:
    bus = EventBus(queue_size=2)
    with bus.subscribe() as slow, bus.subscribe() as fast:
        bus.publish("a", {"n": 1})
        got = await fast.get(timeout=0)
        assert got is not None
        assert got.kind == "a"
        for n in range(2, 6):
            bus.publish("a", {"n": n})  # never blocks
        notice = await slow.get(timeout=0)
        assert notice is not None
        assert (notice.kind, notice.data) == (DROPPED, {"count": 3})
        survivors = [await slow.get(timeout=0) for _ in range(2)]
        assert [e.data["n"] for e in survivors if e is not None] == [4, 5]
        assert await slow.get(timeout=0.01) is None
        assert slow.dropped == 3
        assert bus.dropped_total == 3 + fast.dropped
        assert bus.published_total == 5


async def test_bus_close_ends_waiting_subscribers() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    bus.close()
    assert await asyncio.wait_for(waiter, 1) is None
    assert sub.closed
    bus.publish("late", {})
    assert bus.published_total == 0
    late = bus.subscribe()
    assert await late.get(timeout=1) is None


async def test_bus_bounds_subscribers() -> None:
    bus = EventBus(max_subscribers=1)
    with bus.subscribe(), pytest.raises(OverflowError):
        bus.subscribe()
    bus.subscribe().close()


# -- metrics ---------------------------------------------------------------------------------

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict parser of the text format: every sample's family is typed first."""
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            assert name not in typed, f"{name} typed twice"
            typed[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        assert name in typed, f"{name} has no TYPE line"
        labels_text = match["labels"] or ""
        labels = frozenset(_LABEL.findall(labels_text))
        assert ",".join(f'{k}="{v}"' for k, v in _LABEL.findall(labels_text)) == labels_text
        key = (name, labels)
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(match["value"])
    return samples


async def test_metrics_exposition(hub: Hub) -> None:
    await enroll_devices(hub, 2)
    await hub.ok("POST", "/api/v1/deployments", "operator", json=manifest())
    await hub.problem(401, "GET", "/api/v1/devices", None)
    resp = await hub.call("GET", "/metrics", None)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(await resp.text())

    def value(name: str, **labels: str) -> float:
        return samples[(f"novacron_hub_{name}", frozenset(labels.items()))]

    assert value("devices", status="unknown") == 2
    assert value("devices", status="online") == 0
    assert value("ingest_batches_total") == 3
    assert value("ingest_events_total") == 7
    assert value("ingest_rejected_total", reason="bad_signature") == 2
    assert value("rollout_phase", deployment="web", phase="progressing") == 1
    assert value("rollout_targets", deployment="web") == 2
    assert value("rollout_succeeded", deployment="web") == 0
    assert value("api_requests_total", method="POST", route="/api/v1/enroll", status="201") == 2
    assert value("api_requests_total", method="GET", route="/api/v1/devices", status="401") == 1
    assert value("events_published_total") >= 3

    hub.services.stats.values = {
        "batches": 4,
        "rejected": {'we"ird\\': 1},
        "queue_depth": 3,
        "connected": True,
        "devices": 5,  # not the fleet gauge: stats entries are prefixed
        "relay_counters": {"relay-1": {"acks": 2}},
        "controller": {"applies": 1},
        "note": "text is skipped",
    }
    samples = parse_prometheus(await (await hub.call("GET", "/metrics", None)).text())
    assert value("ingest_batches_total") == 4
    assert value("ingest_queue_depth") == 3
    assert value("ingest_connected") == 1
    assert value("ingest_devices") == 5
    assert value("ingest_relay_counters_total", key="relay-1", counter="acks") == 2
    assert value("ingest_controller_total", key="applies") == 1
    assert not any("note" in name for name, _ in samples)
    assert value("ingest_rejected_total", reason='we\\"ird\\\\') == 1
