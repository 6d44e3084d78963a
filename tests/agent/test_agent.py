"""The agent as a whole: offline autonomy, corrupt journal, local control, and sync
with a hub peer over a real Mosquitto that is killed and restarted."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from edge_agent.agent import EVENTS_STREAM, Agent
from edge_agent.state import device_scope
from novacron.cli import main
from sync.envelope import unpackb_strict
from sync.keys import Signer
from sync.models import RestartPolicy, WorkloadSpec
from tests.agent.agent_harness import (
    RelayPeer,
    enroll_offline,
    make_config,
    seed_desired,
)
from tests.fixtures_mqtt import MosquittoBroker
from tests.fixtures_runtime import PodmanService
from tests.helpers import running, wait_until, wait_until_async

SLEEPER = (sys.executable, "-c", "import time; time.sleep(3600)")


def process_spec(name: str, version: str = "1") -> WorkloadSpec:
    return WorkloadSpec(name=name, driver="process", version=version, command=SLEEPER)


def phase_of(agent: Agent, name: str) -> str:
    """The supervisor's phase of a workload (``none`` before it is known)."""
    record = agent.supervisor.record(name)
    return "none" if record is None else record.phase


def _phase_is(agent: Agent, name: str, phase: str) -> bool:
    return phase_of(agent, name) == phase


async def _phase(agent: Agent, name: str) -> str:
    driver = agent.drivers[agent.state.desired()[name].driver]  # type: ignore[union-attr]
    return (await driver.inspect(name)).phase


async def test_restart_without_network_brings_workloads_back(
    tmp_path: Path, podman_service: PodmanService, podman_owner: str
) -> None:
    """Restarted with no broker reachable, process and Podman workloads run within 5 s."""
    config, profile = make_config(
        tmp_path / "agent",
        device_id=podman_owner,
        drivers=("process", "podman"),
        podman_url=podman_service.url,
    )
    hub = Signer.generate()
    enroll_offline(config, hub)  # enrolled, but the relay port is closed
    container = WorkloadSpec(
        name="sensor",
        driver="podman",
        image=podman_service.image,
        command=("sleep", "3600"),
        restart=RestartPolicy(mode="always"),
    )
    await seed_desired(config, [process_spec("collector"), container], hub)

    async with Agent(config, profile) as agent:
        await wait_until(lambda: agent.supervisor.passes > 0)
        for name in ("collector", "sensor"):
            await wait_until(functools.partial(_phase_is, agent, name, "running"))
    # The agent is gone (a reboot, a crash): start it again, still with no network.
    started = time.monotonic()
    async with Agent(config, profile) as agent:
        for name in ("collector", "sensor"):
            await wait_until(
                functools.partial(_phase_is, agent, name, "running"),
                within=5.0,
            )
            assert await _phase(agent, name) == "running"
        elapsed = time.monotonic() - started
        assert agent.link is not None and not agent.link.connected.is_set()
    print(f"workloads running again {elapsed:.2f}s after an offline restart")


async def test_corrupt_journal_is_quarantined_and_agent_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, profile = make_config(tmp_path / "agent")
    config.data_dir.mkdir(parents=True)
    (config.data_dir / "journal.db").write_bytes(b"this is not a database" * 500)
    async with Agent(config, profile) as agent:
        quarantined = agent.journal.quarantined_path
        assert quarantined is not None and quarantined.exists()
        assert agent.journal.needs_snapshot
        assert agent.status()["journal"]["quarantined"] == str(quarantined)
    assert any("corrupt" in r.getMessage() for r in caplog.records)


async def test_local_control_offline(tmp_path: Path) -> None:
    config, profile = make_config(tmp_path / "agent")
    hub = Signer.generate()
    enroll_offline(config, hub)  # relay unreachable: offline
    await seed_desired(config, [process_spec("web")], hub)
    sock = str(config.control_socket)
    async with Agent(config, profile) as agent:
        await wait_until(lambda: phase_of(agent, "web") == "running")
        assert config.control_socket.stat().st_mode & 0o777 == 0o600
        assert await asyncio.to_thread(main, ["agent", "status", "--socket", sock]) == 0
        assert await asyncio.to_thread(main, ["agent", "stop", "web", "--socket", sock]) == 0
        await wait_until(lambda: phase_of(agent, "web") == "stopped")
        assert await _phase(agent, "web") == "exited"
        # The override is state: journaled, and it survives a restart.
        assert agent.state.overrides() == {"web": "stop"}
    async with Agent(config, profile) as agent:
        assert agent.state.overrides() == {"web": "stop"}
        await wait_until(lambda: phase_of(agent, "web") == "stopped")
        assert await asyncio.to_thread(main, ["agent", "clear", "web", "--socket", sock]) == 0
        await wait_until(lambda: phase_of(agent, "web") == "running")
        assert await asyncio.to_thread(main, ["agent", "workloads", "--socket", sock]) == 0
        assert await asyncio.to_thread(main, ["agent", "stop", "nope", "--socket", sock]) == 1


def test_agent_run_with_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("device_id: gw-1\nregion: r\nprofile: generic-x86_64\nrelays: []\n")
    assert main(["agent", "run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "relays" in err or "data_dir" in err


async def test_sync_with_hub_over_mosquitto_survives_broker_restart(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """HELLO, batched deltas, ACK-driven deletion, reconnect after the broker is
    killed and restarted — with nothing lost."""
    config, profile = make_config(tmp_path / "agent", relays=(mosquitto.url,))
    hub_key, relay_key = Signer.generate(), Signer.generate()
    device_key = enroll_offline(config, hub_key, relay_key)
    hub = RelayPeer(
        mosquitto.port, config.device_id, device_key.public_key_bytes, relay_key, hub_key
    )
    scope = device_scope(config.device_id)
    async with running(hub.run()), Agent(config, profile) as agent:
        await wait_until(lambda: agent.link.connected.is_set() and hub.connected.is_set())
        hub.set_desired(process_spec("web"))
        # Desired state arrives, the workload runs, the report comes back.
        await wait_until(
            lambda: (hub.map.get("reported/web") or {}).get("phase") == "running", within=30
        )

        # Upstream acknowledged: the agent deleted its outbound deltas and events.
        async def acked_upstream() -> bool:
            pending = await agent.journal.pending_deltas(scope=scope)
            return not pending and await agent.journal.acked_seq(EVENTS_STREAM) >= 1

        await wait_until_async(acked_upstream)

        # The broker dies. Meanwhile the device keeps working and changing state.
        mosquitto.kill()
        await wait_until(lambda: not agent.link.connected.is_set())
        await agent.set_override("web", "stop")
        await wait_until(lambda: phase_of(agent, "web") == "stopped")
        assert await agent.journal.pending_deltas(scope=scope) != []
        produced = await agent.journal.event_count(EVENTS_STREAM)
        assert produced >= 1

        mosquitto.start()
        await wait_until(
            lambda: (
                (hub.map.get("override/web") or {}).get("action") == "stop"
                and (hub.map.get("reported/web") or {}).get("phase") == "stopped"
            ),
            within=30,
        )
        # Every workload event reached the hub exactly once, in order, no gaps.
        last = agent.replica.stream(EVENTS_STREAM).next_seq - 1
        await wait_until(lambda: len(hub.events(EVENTS_STREAM)) == last, within=30)

        async def all_acked() -> bool:
            return (
                await agent.journal.pending_deltas(scope=scope) == []
                and await agent.journal.event_count(EVENTS_STREAM) == 0
            )

        await wait_until_async(all_acked)
        seen = hub.events(EVENTS_STREAM)
        assert len(seen) == last
        phases = [unpackb_strict(item[2])["phase"] for item in seen]  # type: ignore[index]
        assert phases[-1] == "stopped"


async def test_link_fails_over_along_the_relay_list(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """The first relay is down: the agent connects to the next one, with a Will."""
    dead = MosquittoBroker(tmp_path / "dead")  # configured, never started
    config, profile = make_config(tmp_path / "agent", relays=(dead.url, mosquitto.url))
    enroll_offline(config, Signer.generate())
    async with Agent(config, profile) as agent:
        await wait_until(agent.link.connected.is_set)
        assert agent.link.stats.connect_failures >= 1
        assert agent.link.stats.connected_to == f"127.0.0.1:{mosquitto.port}"


async def test_a_crashed_process_is_restarted_without_waiting_for_the_timer(
    tmp_path: Path,
) -> None:
    """The process driver tells the supervisor of an exit at once (the reconcile
    timer here is an hour)."""
    config, profile = make_config(tmp_path / "agent", reconcile_interval_s=3600)
    hub = Signer.generate()
    enroll_offline(config, hub)
    await seed_desired(config, [process_spec("web")], hub)
    async with Agent(config, profile) as agent:
        await wait_until(lambda: phase_of(agent, "web") == "running")
        pid = int((await agent.drivers["process"].inspect("web")).runtime_id)
        os.kill(pid, signal.SIGKILL)
        await wait_until(
            lambda: (
                getattr(agent.supervisor.record("web"), "restarts", 0) >= 1
                and phase_of(agent, "web") == "running"
            ),
            within=30,
        )
