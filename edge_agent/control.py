"""Local control of a running agent over a unix socket (mode 0600).

Works with no network at all: ``novacron agent status | workloads | logs |
stop | start | clear`` talk to the agent through this socket. The wire format
is one JSON object per line each way::

    -> {"cmd": "stop", "name": "web"}
    <- {"ok": true, "result": {...}}      or   {"ok": false, "error": "..."}

Requests are capped at :data:`MAX_REQUEST_BYTES`; connections at
:data:`MAX_CONNECTIONS` (more wait in the kernel's backlog).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Literal, Protocol, Self

from edge_agent._exceptions import AgentError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
MAX_CONNECTIONS = 8
COMMANDS = ("status", "workloads", "logs", "stop", "start", "clear")


class ControlError(AgentError):
    """The control socket could not be reached or answered with an error."""


class AgentControl(Protocol):
    """What the control socket can ask of the agent."""

    def status(self) -> dict[str, Any]:
        """Agent-wide status: device, link, journal, counters."""
        ...

    def workloads(self) -> list[dict[str, Any]]:
        """Every workload's status."""
        ...

    async def logs(self, name: str, tail: int) -> str:
        """The last ``tail`` lines of a workload's log."""
        ...

    async def set_override(self, name: str, action: Literal["stop", "start"] | None) -> None:
        """Set (or with ``None`` clear) a local override; journaled as a delta."""
        ...


class ControlServer:
    """Serves :class:`AgentControl` on a unix socket; an async context manager."""

    def __init__(self, path: Path, control: AgentControl) -> None:
        self.path = path
        self._control = control
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a previous run
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old_umask)
        self.path.chmod(0o600)
        log.info("control socket listening on %s", self.path)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop serving and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._slots:
            try:
                line = await reader.readline()
                reply = await self._dispatch(line)
            except (ValueError, asyncio.LimitOverrunError):
                reply = {"ok": False, "error": "request too large or malformed"}
            try:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict) or req.get("cmd") not in COMMANDS:
            return {"ok": False, "error": f"unknown command; expected one of {COMMANDS}"}
        cmd = req["cmd"]
        raw_name = req.get("name")
        if cmd in ("logs", "stop", "start", "clear") and not isinstance(raw_name, str):
            return {"ok": False, "error": f"{cmd} needs a workload name"}
        name = str(raw_name)
        try:
            result: Any
            match cmd:
                case "status":
                    result = self._control.status()
                case "workloads":
                    result = self._control.workloads()
                case "logs":
                    tail = req.get("tail", 100)
                    if not isinstance(tail, int) or not 1 <= tail <= 100_000:
                        return {"ok": False, "error": "tail must be an integer 1..100000"}
                    result = await self._control.logs(name, tail)
                case "stop" | "start":
                    await self._control.set_override(name, cmd)
                    result = {"name": name, "override": cmd}
                case "clear":
                    await self._control.set_override(name, None)
                    result = {"name": name, "override": None}
        except AgentError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "result": result}


def request(path: Path, payload: dict[str, Any], *, timeout: float = 10.0) -> Any:
    """Send one request to the agent's control socket and return its result.

    Raises:
        ControlError: the agent is not running, or it answered with an error.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except FileNotFoundError as exc:
        raise ControlError(f"no agent control socket at {path} (is the agent running?)") from exc
    except OSError as exc:
        raise ControlError(f"cannot talk to the agent at {path}: {exc}") from exc
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlError("the agent sent a malformed reply") from exc
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else reply
        raise ControlError(f"agent refused: {error}")
    return reply.get("result")
