"""The in-memory sim driver follows the same contract as the real drivers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from edge_agent.drivers import (
    DriverUnavailableError,
    SimDriver,
    WorkloadConflictError,
    WorkloadDriver,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from sync.models import WorkloadSpec

pytestmark = pytest.mark.asyncio


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def spec(name: str, version: str = "1") -> WorkloadSpec:
    return WorkloadSpec(name=name, driver="sim", version=version)


async def test_lifecycle() -> None:
    clock = FakeClock()
    async with SimDriver("a1", now=clock) as driver:
        assert isinstance(driver, WorkloadDriver)
        first = await driver.apply(spec("w"))
        assert first.created
        assert not (await driver.apply(spec("w"))).created
        state = await driver.inspect("w")
        assert (state.phase, state.started_at) == (
            "running",
            datetime(2030, 1, 1, 0, 0, 1, tzinfo=UTC),
        )
        second = await driver.apply(spec("w", "2"))
        assert second.created and second.runtime_id != first.runtime_id
        driver.crash("w", exit_code=3)
        state = await driver.inspect("w")
        assert (state.phase, state.exit_code, state.version) == ("exited", 3, "2")
        await driver.start("w")
        await driver.stop("w")
        assert (await driver.inspect("w")).exit_code == 143
        assert [s.name for s in await driver.list()] == ["w"]
        await driver.remove("w")
        assert (await driver.inspect("w")).phase == "missing"
        with pytest.raises(WorkloadNotFoundError):
            await driver.stop("w")


async def test_faults() -> None:
    driver = SimDriver("a1")
    driver.occupy("taken")
    assert (await driver.inspect("taken")).phase == "conflict"
    with pytest.raises(WorkloadConflictError):
        await driver.apply(spec("taken"))
    driver.fail_starts("w", "image not found: x")
    with pytest.raises(WorkloadStartError):
        await driver.apply(spec("w"))
    state = await driver.inspect("w")
    assert (state.phase, state.reason) == ("failed", "image not found: x")
    driver.fail_starts("w", None)
    await driver.apply(spec("w"))
    assert (await driver.inspect("w")).phase == "running"
    driver.available = False
    assert not (await driver.probe()).available
    with pytest.raises(DriverUnavailableError):
        await driver.list()
