"""The podman driver against a real, private Podman API service (see fixtures_runtime)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from edge_agent.drivers import (
    LIMITS_LABEL,
    OWNER_LABEL,
    VERSION_LABEL,
    WORKLOAD_LABEL,
    DriverUnavailableError,
    ImageNotFoundError,
    PodmanDriver,
    WorkloadConflictError,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from sync.models import WorkloadSpec
from tests.fixtures_runtime import PodmanService

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def spec(
    name: str, image: str, script: str = "sleep 300", version: str = "1", **kw: object
) -> WorkloadSpec:
    fields: dict[str, object] = {
        "name": name,
        "driver": "podman",
        "version": version,
        "image": image,
        "command": ["sh", "-c", script],
    }
    return WorkloadSpec.model_validate(fields | kw)


async def wait_until(check: Callable[[], Awaitable[bool]], within_s: float = 60.0) -> None:
    """Poll ``check`` until true; the deadline only bounds a hang, it asserts nothing."""
    async with asyncio.timeout(within_s):
        while not await check():  # noqa: ASYNC110 - polling a real runtime
            await asyncio.sleep(0.05)


async def cli_inspect(service: PodmanService, name: str) -> dict[str, object] | None:
    result = await asyncio.to_thread(
        service.cli, "inspect", "--type", "container", name, check=False
    )
    if result.returncode != 0:
        return None
    data: list[dict[str, object]] = json.loads(result.stdout)
    return data[0]


@pytest_asyncio.fixture
async def driver(podman_service: PodmanService, podman_owner: str) -> AsyncIterator[PodmanDriver]:
    async with PodmanDriver(podman_owner, url=podman_service.url, stop_timeout_s=1) as drv:
        yield drv


async def test_probe(driver: PodmanDriver) -> None:
    capability = await driver.probe()
    assert capability.available, capability.reason
    assert "podman" in capability.reason


async def test_probe_unreachable_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    sock = tmp_path_factory.mktemp("nosock") / "none.sock"
    async with PodmanDriver("a1", url=f"unix://{sock}") as drv:
        capability = await drv.probe()
        assert not capability.available
        assert "unreachable" in capability.reason
        with pytest.raises(DriverUnavailableError):
            await drv.inspect("x")


async def test_start_is_idempotent_with_labels_and_limits(
    driver: PodmanDriver, podman_service: PodmanService, podman_owner: str
) -> None:
    name = unique("web")
    workload = spec(
        name, podman_service.image, resources={"cpu_millis": 500, "memory_mb": 64}, version="4"
    )
    handle = await driver.apply(workload)
    assert handle.created
    again = await driver.apply(workload)
    assert not again.created
    assert again.runtime_id == handle.runtime_id

    state = await driver.inspect(name)
    assert (state.phase, state.version, state.runtime_id) == ("running", "4", handle.runtime_id)
    assert state.started_at is not None
    assert "not enforced" not in state.reason

    attrs = await cli_inspect(podman_service, name)
    assert attrs is not None
    labels = attrs["Config"]["Labels"]  # type: ignore[index]
    assert labels[OWNER_LABEL] == podman_owner
    assert labels[WORKLOAD_LABEL] == name
    assert labels[VERSION_LABEL] == "4"
    assert labels[LIMITS_LABEL] == "applied"
    host = attrs["HostConfig"]
    assert host["Memory"] == 64 * 1024 * 1024  # type: ignore[index]
    assert host["CpuQuota"] == 50_000  # type: ignore[index]
    assert host["CpuPeriod"] == 100_000  # type: ignore[index]


async def test_limits_refused_by_runtime_fall_back_with_warning(
    driver: PodmanDriver, podman_service: PodmanService, caplog: pytest.LogCaptureFixture
) -> None:
    # runc cannot set a 1 MiB memory limit below the container's own usage at init
    name = unique("tiny")
    await driver.apply(spec(name, podman_service.image, resources={"memory_mb": 1}))
    state = await driver.inspect(name)
    assert state.phase == "running"
    assert "resource limits not enforced" in state.reason
    assert any("refused resource limits" in r.getMessage() for r in caplog.records)
    attrs = await cli_inspect(podman_service, name)
    assert attrs is not None
    assert attrs["Config"]["Labels"][LIMITS_LABEL] == "skipped"  # type: ignore[index]


async def test_limits_enforced_mode_fails_instead(
    podman_service: PodmanService, podman_owner: str
) -> None:
    name = unique("tiny")
    async with PodmanDriver(podman_owner, url=podman_service.url, limits="enforce") as drv:
        with pytest.raises(WorkloadStartError, match="start failed"):
            await drv.apply(spec(name, podman_service.image, resources={"memory_mb": 1}))
        state = await drv.inspect(name)
        assert state.phase == "failed"
        assert "memory" in state.reason


async def test_update_replaces_container(
    driver: PodmanDriver, podman_service: PodmanService
) -> None:
    name = unique("svc")
    first = await driver.apply(spec(name, podman_service.image, version="1"))
    second = await driver.apply(spec(name, podman_service.image, version="2"))
    assert second.created
    assert second.runtime_id != first.runtime_id
    state = await driver.inspect(name)
    assert (state.phase, state.version) == ("running", "2")
    assert await cli_inspect(podman_service, first.runtime_id) is None


async def test_crash_detection_exit_code(
    driver: PodmanDriver, podman_service: PodmanService
) -> None:
    name = unique("crashy")
    await driver.apply(spec(name, podman_service.image, script="exit 7"))

    async def exited() -> bool:
        return (await driver.inspect(name)).phase == "exited"

    await wait_until(exited)
    state = await driver.inspect(name)
    assert state.exit_code == 7
    assert state.finished_at is not None
    assert state.to_status().phase == "exited"


async def test_env_and_working_dir(driver: PodmanDriver, podman_service: PodmanService) -> None:
    name = unique("envy")
    script = '[ "$FOO" = bar ] && [ "$(pwd)" = /tmp ] && exit 0; exit 9'
    await driver.apply(
        spec(name, podman_service.image, script=script, env={"FOO": "bar"}, working_dir="/tmp")
    )

    async def exited() -> bool:
        return (await driver.inspect(name)).phase == "exited"

    await wait_until(exited)
    assert (await driver.inspect(name)).exit_code == 0


async def test_stop_start_remove(driver: PodmanDriver, podman_service: PodmanService) -> None:
    name = unique("svc")
    await driver.apply(spec(name, podman_service.image))
    await driver.stop(name)
    state = await driver.inspect(name)
    assert state.phase == "exited"
    assert state.exit_code is not None
    await driver.stop(name)  # no-op when stopped
    await driver.start(name)
    assert (await driver.inspect(name)).phase == "running"
    await driver.remove(name)
    assert (await driver.inspect(name)).phase == "missing"
    assert await cli_inspect(podman_service, name) is None
    await driver.remove(name)  # no-op when missing
    with pytest.raises(WorkloadNotFoundError):
        await driver.stop(name)
    with pytest.raises(WorkloadNotFoundError):
        await driver.start(name)


async def test_list_only_owned(
    driver: PodmanDriver, podman_service: PodmanService, podman_owner: str
) -> None:
    names = sorted(unique(p) for p in ("b", "a"))
    for name in names:
        await driver.apply(spec(name, podman_service.image))
    other_owner = unique("other")
    try:
        async with PodmanDriver(other_owner, url=podman_service.url, stop_timeout_s=1) as other:
            await other.apply(spec(unique("theirs"), podman_service.image))
            assert [s.name for s in await driver.list()] == names
            assert all(s.phase == "running" for s in await driver.list())
            assert [s.name for s in await other.list()] != names
    finally:
        await asyncio.to_thread(podman_service.remove_owned, other_owner)


@pytest.mark.parametrize("foreign_labels", [(), ("--label", f"{OWNER_LABEL}=someone-else")])
async def test_foreign_container_is_left_alone(
    driver: PodmanDriver, podman_service: PodmanService, foreign_labels: tuple[str, ...]
) -> None:
    name = unique("taken")
    await asyncio.to_thread(
        podman_service.cli,
        "run",
        "-d",
        "--name",
        name,
        *foreign_labels,
        podman_service.image,
        "sleep",
        "300",
    )
    try:
        before = await cli_inspect(podman_service, name)
        assert before is not None
        state = await driver.inspect(name)
        assert state.phase == "conflict"
        assert "not owned" in state.reason
        assert state.to_status().phase == "failed"
        with pytest.raises(WorkloadConflictError):
            await driver.apply(spec(name, podman_service.image))
        with pytest.raises(WorkloadConflictError):
            await driver.stop(name)
        with pytest.raises(WorkloadConflictError):
            await driver.start(name)
        with pytest.raises(WorkloadConflictError):
            await driver.remove(name)
        assert name not in [s.name for s in await driver.list()]
        after = await cli_inspect(podman_service, name)
        assert after is not None
        assert after["Id"] == before["Id"]
        assert after["State"]["Status"] == "running"  # type: ignore[index]
    finally:
        await asyncio.to_thread(podman_service.cli, "rm", "-f", "-t", "0", name, check=False)


async def test_missing_image_fails_clearly(driver: PodmanDriver) -> None:
    name = unique("ghost")
    image = "localhost/nc-does-not-exist:1"
    with pytest.raises(ImageNotFoundError) as caught:
        await driver.apply(spec(name, image))
    assert caught.value.image == image
    state = await driver.inspect(name)
    assert state.phase == "failed"
    assert state.reason == f"image not found: {image}"
    assert [s.name for s in await driver.list()] == [name]
    await driver.remove(name)
    assert (await driver.inspect(name)).phase == "missing"
