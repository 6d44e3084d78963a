"""Driver value types, helpers and the rotating log writer (pure, no runtime)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent import drivers
from edge_agent.drivers import (
    ActualState,
    BlockingRunner,
    DriverError,
    ImageNotFoundError,
    LibvirtDriver,
    PodmanDriver,
    ProcessDriver,
    WorkloadDriver,
    WorkloadStartError,
)
from edge_agent.drivers._logs import RotatingLogWriter, log_files, read_tail
from edge_agent.drivers.base import vcpus_for
from sync import NovaCronError


def test_all_is_sorted_and_complete() -> None:
    assert drivers.__all__ == sorted(drivers.__all__)
    for name in drivers.__all__:
        assert hasattr(drivers, name)


def test_implementations_satisfy_the_protocol(tmp_path: Path) -> None:
    for driver in (
        ProcessDriver("a1", tmp_path),
        PodmanDriver("a1", url="unix:///nonexistent.sock"),
        LibvirtDriver("a1", uri="test:///default"),
    ):
        assert isinstance(driver, WorkloadDriver)


def test_error_tree() -> None:
    exc = ImageNotFoundError("localhost/x:1", driver="podman", workload="web")
    assert isinstance(exc, WorkloadStartError)
    assert isinstance(exc, DriverError)
    assert isinstance(exc, NovaCronError)
    assert exc.reason == "image not found: localhost/x:1"
    assert str(exc) == "podman/web: image not found: localhost/x:1"
    assert exc.image == "localhost/x:1"


@pytest.mark.parametrize(("millis", "vcpus"), [(1, 1), (999, 1), (1000, 1), (1001, 2), (2500, 3)])
def test_vcpus_round_up(millis: int, vcpus: int) -> None:
    assert vcpus_for(millis) == vcpus


def test_to_status_mapping() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    expected = {
        "running": "running",
        "exited": "exited",
        "missing": "pending",
        "failed": "failed",
        "conflict": "failed",
    }
    for phase, status_phase in expected.items():
        state = ActualState(
            name="w",
            driver="process",
            phase=phase,  # type: ignore[arg-type]
            version="3",
            reason="r" * 2000,
            started_at=at,
            finished_at=at,
        )
        status = state.to_status(restarts=4, healthy=True)
        assert status.phase == status_phase
        assert status.version == "3"
        assert status.restarts == 4
        assert status.healthy is True
        assert len(status.reason) == 1024
        assert status.since_ms == int(at.timestamp() * 1000)
    assert ActualState(name="w", driver="x", phase="missing").to_status().version == ""


async def _concurrency_seen(limit: int, calls: int) -> int:
    runner = BlockingRunner(limit)
    lock = threading.Lock()
    current = peak = 0
    gate = threading.Event()

    def work() -> None:
        nonlocal current, peak
        with lock:
            current += 1
            peak = max(peak, current)
        gate.wait(0.05)
        with lock:
            current -= 1

    await asyncio.gather(*(runner.run(work) for _ in range(calls)))
    return peak


def test_blocking_runner_bounds_threads() -> None:
    assert asyncio.run(_concurrency_seen(2, 8)) <= 2
    with pytest.raises(ValueError):
        BlockingRunner(0)


def test_rotating_writer_bounds(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    writer = RotatingLogWriter(path, max_bytes=100, backups=3)
    for i in range(500):
        writer.write(f"{i:04d}\n".encode())
    writer.write(b"x" * 1000 + b"\n")  # one write larger than a file
    writer.close()
    files = log_files(path)
    assert len(files) == 4
    assert sum(f.stat().st_size for f in files) <= 400
    # 3501 bytes written in 100-byte files: 3 full backups of x and "\n" in the live one
    assert read_tail(path, None) == "x" * 300 + "\n"
    assert read_tail(path, 0) == ""


def test_rotating_writer_without_backups(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    writer = RotatingLogWriter(path, max_bytes=10, backups=0)
    writer.write(b"0123456789abc\n")
    writer.close()
    assert log_files(path) == [path]
    assert path.read_bytes() == b"abc\n"
