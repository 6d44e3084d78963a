"""A worker process of ``novacron sim run``: its share of the fleet in one event loop.

The main process (:mod:`simulator.realrun`) starts ``W`` of these with the
``spawn`` start method and talks to each over a :func:`multiprocessing.Pipe`,
one request, one answer, in order:

``("sample",)``
    per device: the digests of its ``desired/<id>`` and ``device/<id>`` scopes
    (``None`` while its agent is stopped) and what its runtime runs;
``("stop", [ids])`` / ``("start", [ids])``
    stop or start some agents (how ``flap_devices`` takes a device off the
    network: its agent stops as on a power or link loss, its journal stays, and it
    starts again from it; a port per device for a proxy would not scale to
    thousands of devices);
``("skew", [ids], offset_ms)``
    set some devices' clock offsets (``clock_skew``; ``0`` ends it);
``("garbage", [ids])``
    have some devices publish random bytes upstream (``garbage``);
``("disk", [ids], full)``
    start or end a full disk on some devices (``fill_disk``);
``("final",)``
    per device: the event sequence numbers its relay acknowledged per stream,
    and the desired entries it holds (the main process checks their
    signatures);
``("exit",)``
    stop every agent and end.

At start the worker enrolls its devices through the hub's API (its share of
the enrollment load) and answers ``("ready", [(index, device_id, region,
profile), ...])`` once every agent runs, or ``("error", text)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from simulator.composition import SimDevice, Tuning, enroll_devices
from simulator.invariants import scope_digest

__all__ = ["WorkerInit", "worker_main"]

log = logging.getLogger(__name__)

START_BATCH = 50
"""Agents started at once (a worker with a thousand agents starts them in waves)."""
STOP_TIMEOUT_S = 60.0
"""Graceful stop of every agent; past it the process ends anyway."""


@dataclass(frozen=True, slots=True)
class WorkerInit:
    """What a worker is given at start (pickled to the spawned process)."""

    index: int
    root: str
    hub_url: str
    plan: tuple[tuple[int, str, str], ...]
    tokens: dict[tuple[str, str], str]
    tuning: Tuning
    log_level: int = logging.WARNING


def worker_main(conn: Connection, init: WorkerInit) -> None:
    """Entry point of the worker process."""
    logging.basicConfig(
        level=init.log_level,
        format=f"%(asctime)s w{init.index} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    try:
        asyncio.run(_Worker(conn, init).run())
    except KeyboardInterrupt:  # the main process handles Ctrl-C and tells us to exit
        pass
    finally:
        conn.close()


class _Worker:
    def __init__(self, conn: Connection, init: WorkerInit) -> None:
        self.conn = conn
        self.init = init
        self.devices: dict[str, SimDevice] = {}
        self.requests: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._start()
        except Exception:
            self.conn.send(("error", traceback.format_exc()))
            await self._stop_all()
            return
        self.conn.send(
            (
                "ready",
                [
                    (d.setup.index, d.device_id, d.setup.region, d.setup.profile)
                    for d in self.devices.values()
                ],
            )
        )
        loop.add_reader(self.conn.fileno(), self._readable)
        parent = os.getppid()
        watchdog = asyncio.create_task(self._orphan_watch(parent), name="orphan-watch")
        try:
            while True:
                request = await self.requests.get()
                if request is None or request[0] == "exit":
                    await self._stop_all()
                    with contextlib.suppress(OSError):
                        self.conn.send(("ok", None))
                    return
                try:
                    answer = await self._handle(request)
                except Exception:
                    self.conn.send(("error", traceback.format_exc()))
                else:
                    self.conn.send(("ok", answer))
        finally:
            watchdog.cancel()
            loop.remove_reader(self.conn.fileno())
            await self._stop_all()

    async def _orphan_watch(self, parent: int) -> None:
        """The main process died without a word (SIGKILL): stop, do not linger."""
        while os.getppid() == parent:  # noqa: ASYNC110 - no event for a dead parent
            await asyncio.sleep(2.0)
        log.warning("worker %s: the main process is gone; stopping", self.init.index)
        with contextlib.suppress(asyncio.QueueFull):
            self.requests.put_nowait(None)
        # A graceful stop that does not end in time must not leave an orphan behind.
        await asyncio.sleep(STOP_TIMEOUT_S + 10.0)
        log.error("worker %s: still stopping after %s s; exiting", self.init.index, STOP_TIMEOUT_S)
        os._exit(1)

    def _readable(self) -> None:
        try:
            request = self.conn.recv()
        except (EOFError, OSError):
            request = None  # the main process is gone: stop
        try:
            self.requests.put_nowait(request)
        except asyncio.QueueFull:  # one request at a time by protocol; this is a bug
            log.error(  # noqa: TRY400 - no traceback to show
                "worker %s: request queue full, dropping %r", self.init.index, request
            )

    async def _start(self) -> None:
        init = self.init
        setups = await enroll_devices(
            init.hub_url, Path(init.root), init.plan, init.tokens, tuning=init.tuning
        )
        for setup in setups:
            self.devices[setup.device_id] = await SimDevice.load(setup)
        devices = list(self.devices.values())
        for i in range(0, len(devices), START_BATCH):
            await asyncio.gather(*(d.start() for d in devices[i : i + START_BATCH]))

    async def _stop_all(self) -> None:
        devices = list(self.devices.values())
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                for i in range(0, len(devices), START_BATCH * 4):
                    await asyncio.gather(
                        *(d.stop() for d in devices[i : i + START_BATCH * 4]),
                        return_exceptions=True,
                    )
        except TimeoutError:
            log.warning(
                "worker %s: agents did not stop within %s s", self.init.index, STOP_TIMEOUT_S
            )

    async def _handle(self, request: tuple[Any, ...]) -> Any:
        match request[0]:
            case "sample":
                return await self._sample()
            case "stop":
                await asyncio.gather(*(self.devices[i].stop() for i in request[1]))
                return None
            case "start":
                await asyncio.gather(*(self.devices[i].start() for i in request[1]))
                return None
            case "skew":
                for i in request[1]:
                    self.devices[i].clock.offset_ms = int(request[2])
                return None
            case "disk":
                await asyncio.gather(
                    *(self.devices[i].set_disk_full(request[2]) for i in request[1])
                )
                return None
            case "garbage":
                await asyncio.gather(
                    *(self.devices[i].send_garbage(random.randrange(1, 200)) for i in request[1])
                )
                return None
            case "final":
                return await self._final()
        raise ValueError(f"unknown request {request[0]!r}")

    async def _sample(self) -> dict[str, tuple[str | None, str | None, dict[str, str]]]:
        out: dict[str, tuple[str | None, str | None, dict[str, str]]] = {}
        for did, dev in self.devices.items():
            desired = dev.scope(f"desired/{did}")
            own = dev.scope(f"device/{did}")
            out[did] = (
                None if desired is None else scope_digest(desired),
                None if own is None else scope_digest(own),
                await dev.running_workloads() if dev.running else {},
            )
        return out

    async def _final(self) -> dict[str, dict[str, Any]]:
        """Each agent's acknowledged stream cursors and desired entries.

        Read :data:`START_BATCH` agents at a time: one journal read after the
        other took over two minutes for 1,000 agents on a busy 2-core machine
        (the main process then gave up on the worker and lost the run).
        """
        from edge_agent.agent import EVENTS_STREAM, METRICS_STREAM  # noqa: PLC0415

        async def one(did: str, dev: SimDevice) -> tuple[str, dict[str, Any]] | None:
            agent = dev.agent
            if agent is None:
                return None
            cursors = await asyncio.gather(
                *(agent.journal.acked_seq(name) for name in (EVENTS_STREAM, METRICS_STREAM))
            )
            desired = dev.scope(f"desired/{did}")
            return did, {
                "acked": dict(zip((EVENTS_STREAM, METRICS_STREAM), cursors, strict=True)),
                "desired": [] if desired is None else desired.entries_wire(),
            }

        out: dict[str, dict[str, Any]] = {}
        items = list(self.devices.items())
        for i in range(0, len(items), START_BATCH):
            for found in await asyncio.gather(
                *(one(d, dev) for d, dev in items[i : i + START_BATCH])
            ):
                if found is not None:
                    out[found[0]] = found[1]
        return out
