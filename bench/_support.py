"""Support for the idle-agent figures of ``agent_bench.py``.

A private Mosquitto on a free loopback port, a generated agent config and data
directory (enrolled with a generated hub key, desired workloads seeded in the
journal), the agent itself as a separate ``python -m novacron agent run``
process, and a hub-side sync peer that acknowledges and counts what the agent
publishes. Ideas copied from ``tests/agent/agent_harness.py`` and
``tests/fixtures_mqtt.py``: the bench must not import from ``tests/``.

Every process started here is stopped by the context manager that started it,
on errors too: the agent with SIGTERM (it stops its workloads), then SIGKILL,
then whatever workload process groups its pid files still name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiomqtt

from edge_agent._runtime import unit_environment
from edge_agent.agent import relay_peer_id
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.control import ControlError, request
from edge_agent.identity import load_or_create_device_key
from edge_agent.install import fill_bytecode_cache
from edge_agent.journal import Journal
from edge_agent.state import DeviceState, desired_scope, device_scope
from sync.hlc import HybridLogicalClock, SystemClock
from sync.keys import KeyRing, Signer
from sync.models import WorkloadSpec
from sync.protocol import Replica, SyncSession
from sync.signed import signed_write
from sync.topics import device_topic

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
REPO = Path(__file__).resolve().parents[1]
REGION = "bench"
DEVICE_ID = "gw-bench"
PROFILE = "generic-x86_64"


class BenchError(RuntimeError):
    """A bench fixture did not come up (the message says which and why)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_available() -> bool:
    """Whether a Mosquitto binary is installed."""
    return Path(MOSQUITTO).exists()


def read_rss_kb(pid: int) -> int:
    """``VmRSS`` of one process (not its children), in KiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid} (a zombie?)")


@dataclass(frozen=True, slots=True)
class MemorySample:
    """Memory of one process (not its children), in KiB, from ``/proc``.

    Attributes:
        rss_kb: ``VmRSS``: every resident page mapped, shared library pages
            included in full (what ``ps`` and ``top`` show).
        anon_kb: ``RssAnon``: the process's own heap, stacks and copied pages.
        file_kb: ``RssFile``: resident pages of mapped files (interpreter,
            extension modules, shared libraries), shared with other processes.
        pss_kb: ``Pss`` from ``smaps_rollup``: shared pages divided by the
            number of processes mapping them (0 where the kernel lacks it).
        threads: ``Threads``.
    """

    rss_kb: int
    anon_kb: int
    file_kb: int
    pss_kb: int
    threads: int


def read_memory(pid: int) -> MemorySample:
    """A :class:`MemorySample` of ``pid``."""
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            status[key] = int(value.split()[0])
    if "VmRSS" not in status:
        raise BenchError(f"no VmRSS for pid {pid} (a zombie?)")
    pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return MemorySample(
        status["VmRSS"],
        status.get("RssAnon", 0),
        status.get("RssFile", 0),
        pss,
        status.get("Threads", 0),
    )


def _stop_process(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def mosquitto(workdir: Path, extra_conf: str = "") -> Iterator[int]:
    """Run a private anonymous Mosquitto on 127.0.0.1 for the block; yield its port.

    Args:
        workdir: directory for its config and log.
        extra_conf: more config lines (limits for a load test).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf, log = workdir / "mosquitto.conf", workdir / "mosquitto.log"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        f"log_dest file {log}\n"
        "log_type error\nlog_type warning\n" + extra_conf,
        encoding="ascii",
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                text = log.read_text(errors="replace") if log.exists() else ""
                raise BenchError(f"mosquitto exited with {proc.returncode}: {text}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            if time.monotonic() > deadline:
                raise BenchError(f"mosquitto did not listen on {port} within 10 s")
            time.sleep(0.05)
        yield port
    finally:
        _stop_process(proc, 10)


def sleeper_specs(count: int) -> list[WorkloadSpec]:
    """``count`` process workloads that only sleep (``sleep 3600``)."""
    return [
        WorkloadSpec(name=f"idle-{i:02d}", driver="process", command=("sleep", "3600"))
        for i in range(count)
    ]


@dataclass(frozen=True, slots=True)
class AgentSetup:
    """An agent data directory ready to run: config file, keys, seeded journal."""

    config_path: Path
    config: AgentConfig
    hub_signer: Signer
    device_public_key: bytes


async def prepare_agent(workdir: Path, broker_port: int, specs: list[WorkloadSpec]) -> AgentSetup:
    """Write a config (process driver only, profile defaults otherwise), enroll
    offline with a generated hub key, seed ``specs`` as desired state and fill
    the bytecode cache as ``novacron agent install`` does.

    The seeded specs are hub-signed entries of the device's desired scope,
    written by a replica whose id is ``hub``, as an earlier sync would have left
    them in the journal.
    """
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "agent.yaml"
    data = {
        "device_id": DEVICE_ID,
        "region": REGION,
        "data_dir": str(data_dir),
        "profile": PROFILE,
        "relays": [f"mqtt://127.0.0.1:{broker_port}"],
        "drivers": ["process"],
    }
    config_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    config = load_agent_config(config_path)
    hub = Signer.generate()
    (config.data_dir / "hub.pub").write_text(
        base64.b64encode(hub.public_key_bytes).decode() + "\n", encoding="ascii"
    )
    device_key = load_or_create_device_key(config.key_path)
    async with Journal.open(config.data_dir / "journal.db", quota_bytes=1 << 24) as journal:
        hub_replica = Replica("hub", HybridLogicalClock(SystemClock()))
        state = DeviceState(hub_replica, journal, DEVICE_ID, None)
        for spec in specs:
            signed_write(
                hub_replica, state.desired_scope_name, spec.name, spec.model_dump(mode="json"), hub
            )
        await state.persist_remote(state.desired_scope_name, None)
    # The agent runs from REPO (AgentProcess), so its modules are compiled from there.
    if not await asyncio.to_thread(
        fill_bytecode_cache, unit_environment(config.data_dir), cwd=REPO
    ):
        raise BenchError("could not fill the agent's bytecode cache (see the log)")
    return AgentSetup(config_path, config, hub, device_key.public_key_bytes)


class AgentProcess:
    """``python -m novacron agent run --config FILE`` as a child process, with
    the environment the systemd unit gives it (``novacron agent install``; its
    bytecode cache in the data directory, filled by :func:`prepare_agent`).

    A context manager: leaving the block stops the agent (SIGTERM, a grace
    period, SIGKILL) and then kills any workload process group still named
    by the process driver's pid files, so nothing outlives the bench.
    """

    def __init__(self, setup: AgentSetup, log_path: Path) -> None:
        self.setup = setup
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def start(self) -> None:
        """Start the agent process (its stderr goes to ``log_path``)."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "novacron",
                    "agent",
                    "run",
                    "--config",
                    str(self.setup.config_path),
                ],
                cwd=REPO,
                # What the shipped systemd unit sets (Environment= lines), no more.
                env={**os.environ, **unit_environment(self.setup.config.data_dir)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The agent's pid."""
        assert self.proc is not None
        return self.proc.pid

    def control(self, cmd: str) -> Any:
        """One request to the agent's control socket (blocking)."""
        self._check_alive()
        return request(self.setup.config.control_socket, {"cmd": cmd}, timeout=5.0)

    def wait_running(self, count: int, timeout: float) -> None:
        """Block until ``count`` workloads report ``running``."""
        deadline = time.monotonic() + timeout
        phases: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(ControlError):
                phases = [w["phase"] for w in self.control("workloads")]
                if phases.count("running") >= count:
                    return
            time.sleep(0.2)
        raise BenchError(f"{count} workloads not running within {timeout} s: {phases}")

    def wait_link(self, timeout: float) -> None:
        """Block until the agent reports its upstream link connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ControlError):
                if self.control("status")["link"].get("connected"):
                    return
            time.sleep(0.2)
        raise BenchError(f"the agent's link was not up within {timeout} s")

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"agent exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """Stop the agent, then any workload it left behind."""
        if self.proc is not None:
            _stop_process(self.proc, 15)
        run_dir = self.setup.config.data_dir / "logs"
        for pidfile in run_dir.glob("*.pid") if run_dir.is_dir() else ():
            _kill_leftover(pidfile)


def _kill_leftover(pidfile: Path) -> None:
    """SIGKILL the workload group of a pid file, if the pid is still that process."""
    try:
        pid_text, start_text = pidfile.read_text().split()
        pid, start = int(pid_text), int(start_text)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return
    if start and int(stat[stat.rfind(")") + 2 :].split()[19]) == start:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def bare_python() -> Iterator[int]:
    """A ``python -c 'input()'`` that imports nothing and waits; yield its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc.pid
    finally:
        _stop_process(proc, 5)


def stable_rss_kb(pid: int, *, timeout: float = 10.0) -> int:
    """``VmRSS`` once three samples 0.2 s apart agree (start-up has finished)."""
    deadline = time.monotonic() + timeout
    samples = [read_rss_kb(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.2)
        samples.append(read_rss_kb(pid))
        if len(set(samples[-3:])) == 1 and len(samples) >= 3:
            break
    return samples[-1]


def publish_wire_bytes(topic: str, payload_len: int) -> int:
    """Size of an MQTT 3.1.1 QoS 1 PUBLISH packet carrying ``payload_len`` bytes.

    Fixed header (1 byte) + Remaining Length (1-4 bytes, a varint of what
    follows) + topic length (2) + topic + packet identifier (2) + payload.
    TCP/IP headers and the broker's PUBACK are not included.
    """
    remaining = 2 + len(topic.encode()) + 2 + payload_len
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


@dataclass(slots=True)
class UpstreamCounters:
    """What the hub peer saw on the device's ``up`` topic, and sent ``down``."""

    messages: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    down_messages: int = 0

    def snapshot(self) -> UpstreamCounters:
        """A copy, to subtract later."""
        return UpstreamCounters(
            self.messages, self.payload_bytes, self.wire_bytes, self.down_messages
        )


class HubPeer:
    """The upstream side of the device sync over the broker: acknowledges and counts.

    A :class:`SyncSession` with the id the agent expects of its region's relay
    (``relay.<region>``), signing with the hub's key (which the agent trusts
    for envelopes too), ticking every 0.25 s like the agent. Run :meth:`run`
    as a task; cancel it to stop.
    """

    def __init__(self, port: int, setup: AgentSetup) -> None:
        self.port = port
        self.scope = device_scope(DEVICE_ID)
        self.desired = desired_scope(DEVICE_ID)
        self.replica = Replica(relay_peer_id(REGION), HybridLogicalClock(SystemClock()))
        self.replica.scope(self.scope)
        self.replica.scope(self.desired)
        self.signer = setup.hub_signer
        self.keyring = KeyRing()
        self.keyring.add(setup.device_public_key)
        self.up = device_topic(REGION, DEVICE_ID, "up")
        self.down = device_topic(REGION, DEVICE_ID, "down")
        self.counters = UpstreamCounters()
        self.connected = asyncio.Event()
        self._received = asyncio.Event()

    def reported_phases(self) -> list[str]:
        """Phases of the workloads the device has reported to this hub."""
        return [
            str(value.get("phase"))
            for key, value in self.replica.scope(self.scope).items()
            if key.startswith("reported/") and isinstance(value, dict)
        ]

    async def wait_reported(self, phase: str, count: int) -> None:
        """Wait until ``count`` workloads were reported in ``phase`` (no deadline)."""
        while self.reported_phases().count(phase) < count:
            self._received.clear()
            await self._received.wait()

    async def run(self) -> None:
        """Connect, subscribe to ``up`` and sync until cancelled."""
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-hub") as client:
            await client.subscribe(self.up, qos=1)
            session = SyncSession(
                self.replica,
                DEVICE_ID,
                self.signer,
                self.keyring,
                SystemClock(),
                scopes=[self.scope, self.desired],
            )
            self.connected.set()

            async def send(out: list[bytes]) -> None:
                for data in out:
                    await client.publish(self.down, data, qos=1)
                    self.counters.down_messages += 1

            async def ticker() -> None:
                while True:
                    await asyncio.sleep(0.25)
                    await send(session.tick())

            async with asyncio.TaskGroup() as tg:
                tg.create_task(ticker(), name="bench-hub-ticker")
                await send(session.start())
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes):
                        raise BenchError(f"non-bytes payload on {message.topic}")
                    self.counters.messages += 1
                    self.counters.payload_bytes += len(payload)
                    self.counters.wire_bytes += publish_wire_bytes(self.up, len(payload))
                    await send(session.receive(payload))
                    self._received.set()
