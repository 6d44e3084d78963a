"""A region's relay as its own process, and what the simulator reads of it.

``novacron sim run`` runs each relay as an installation does: ``novacron relay
run --config FILE``, a process of its own. With every relay in the simulator's
main process (beside the hub, the proxies and the sampler, on one event loop),
that loop was the first thing to fall behind past 2,000 devices; as processes
the relays spread over the cores and ``kill_relay`` is a real ``kill -9``.

The sampler reads a running relay the way an operator could: its outbox file,
read-only (SQLite in WAL mode lets a reader in beside the writer). The
``replica`` table is the relay's durable copy of the desired state it fans out
(the relay writes it before acknowledging the hub), ``items`` its outbox. Its
counters reach the hub in every presence report (``relay_counters`` in the
hub reconciler's stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from regional_relay.config import RelayConfig
from simulator.invariants import scope_digest
from sync._msgpack_strict import unpackb_strict

__all__ = ["RelayProcess", "RelayView", "read_relay_view"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
"""A graceful stop (SIGTERM) waits this long before SIGKILL."""


@dataclass(frozen=True, slots=True)
class RelayView:
    """What a relay holds at one moment.

    Attributes:
        digests: scope -> :func:`~simulator.invariants.scope_digest` of the
            relay's copy (an empty scope's digest when it holds none).
        outbox_depth: items in its outbox (not yet acknowledged by the hub).
    """

    digests: dict[str, str]
    outbox_depth: int


def read_relay_view(outbox_path: Path, scopes: Sequence[str]) -> RelayView | None:
    """Read ``scopes`` and the outbox depth from a relay's outbox file (blocking).

    Returns:
        The view, or ``None`` when the file is not there yet or cannot be read
        now (the relay is creating or migrating it).
    """
    if not outbox_path.exists():
        return None
    wanted = set(scopes)
    visible: dict[str, dict[str, Any]] = {name: {} for name in scopes}
    try:
        conn = sqlite3.connect(f"{outbox_path.as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return None
    try:
        rows = conn.execute("SELECT scope, key, value FROM replica WHERE deleted = 0")
        for scope, key, value in rows:
            if scope in wanted:
                visible[scope][key] = unpackb_strict(bytes(value))
        (depth,) = conn.execute("SELECT count(*) FROM items").fetchone()
    except sqlite3.Error as exc:
        log.debug("cannot read %s now: %s", outbox_path, exc)
        return None
    finally:
        conn.close()
    return RelayView({name: scope_digest(v) for name, v in visible.items()}, int(depth))


class RelayProcess:
    """``novacron relay run --config FILE`` for one region.

    Args:
        config: the relay's config (written next to its data as ``relay.yaml``).
        log_path: where its log goes (appended across restarts).
        log_level: its ``--log-level``.
    """

    def __init__(self, config: RelayConfig, log_path: Path, log_level: str = "WARNING") -> None:
        self.config = config
        self.log_path = log_path
        self.log_level = log_level
        self.config_path = config.data_dir / "relay.yaml"
        self.config_path.write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process (a no-op while it runs)."""
        if self.running:
            return
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "novacron",
                    "--log-level",
                    self.log_level,
                    "relay",
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def stop(self, *, kill: bool = False) -> None:
        """End the process: ``kill`` is SIGKILL (a crash), otherwise SIGTERM and,
        past :data:`STOP_GRACE_S`, SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if not kill:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, STOP_GRACE_S)
                return
            log.warning(
                "relay %s did not stop within %g s: killed", self.config.region, STOP_GRACE_S
            )
        proc.kill()
        await asyncio.to_thread(proc.wait)

    async def view(self, scopes: Sequence[str]) -> RelayView | None:
        """What the relay holds now (``None`` while it is not running)."""
        if not self.running:
            return None
        return await asyncio.to_thread(read_relay_view, self.config.outbox_path, scopes)
