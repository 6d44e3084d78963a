"""The fault injector against real TCP proxies in front of a real Mosquitto."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from simulator.faults import Action, DeviceRef, FaultSchedule, FaultTimeline
from simulator.injector import FaultInjector, ProxyNetwork
from simulator.netproxy import TcpProxy
from tests.fixtures_mqtt import MosquittoBroker

DEVICES = [
    DeviceRef("d0", "region-00", "raspberry-pi-4"),
    DeviceRef("d1", "region-01", "raspberry-pi-4"),
]


def _timeline(faults: list[dict[str, object]]) -> FaultTimeline:
    return FaultTimeline(FaultSchedule.model_validate({"faults": faults}), DEVICES, seed=0)


def _state(proxy: TcpProxy) -> str | None:
    return proxy.partitioned  # a call, so that mypy does not keep a narrowed value


async def _connected(port: int, ident: str) -> bool:
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier=ident, timeout=1) as c:
            await c.publish("t", b"x", qos=1)
            return True
    except aiomqtt.MqttError:
        return False


@pytest.mark.integration
async def test_region_partition_through_proxies(mosquitto: MosquittoBroker) -> None:
    timeline = _timeline(
        [{"kind": "partition_region", "at": 0.3, "duration": 1.0, "region": "region-00"}]
    )
    r0 = TcpProxy("127.0.0.1", mosquitto.port, name="region-00")
    r1 = TcpProxy("127.0.0.1", mosquitto.port, name="region-01")
    async with r0, r1:
        net = ProxyNetwork({"region-00": r0, "region-01": r1})
        assert all(net.handles(a) for a in timeline)
        injector = FaultInjector(timeline, net)
        task = asyncio.create_task(injector.run())
        try:
            async with aiomqtt.Client("127.0.0.1", r0.port, identifier="relay-0") as relay0:
                await relay0.subscribe("x", qos=1)
                with pytest.raises(aiomqtt.MqttError):
                    async with asyncio.timeout(5):
                        async for _ in relay0.messages:
                            pass
            assert _state(r0) == "cut"
            assert await _connected(r1.port, "relay-1")  # the other region is untouched
            assert not await _connected(r0.port, "relay-0b")
            await task
        finally:
            task.cancel()
        assert _state(r0) is None
        assert await _connected(r0.port, "relay-0c")
    [mark] = injector.heal_marks()
    assert mark.fault == 0 and mark.kind == "partition_region"
    assert mark.t == pytest.approx(1.3, abs=0.2)


class _Flaky:
    def __init__(self) -> None:
        self.seen: list[Action] = []

    async def apply(self, action: Action) -> None:
        self.seen.append(action)
        if action.kind == "start_relay":
            raise RuntimeError("relay would not start")


async def test_failures_are_recorded_and_times_scaled() -> None:
    now = [100.0]

    def clock() -> float:
        return now[0]

    timeline = _timeline([{"kind": "kill_relay", "at": 10, "duration": 20, "region": "region-01"}])
    target = _Flaky()
    injector = FaultInjector(timeline, target, clock=clock, speed=1000.0)
    await injector.run()
    assert [a.kind for a in target.seen] == ["kill_relay", "start_relay"]
    assert injector.failed == 1
    assert injector.applied[1].error == "RuntimeError: relay would not start"
    assert injector.heal_marks() == []  # a heal that failed did not heal
    with pytest.raises(ValueError):
        FaultInjector(timeline, target, speed=0)
    with pytest.raises(KeyError):
        await ProxyNetwork({}).apply(timeline.actions[0])
