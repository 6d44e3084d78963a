"""Health checks of running workloads: exec, tcp and http.

Each check is bounded by the spec's ``timeout_s`` and returns a verdict; it
never raises for an unhealthy workload. ``exec`` runs its command on the
gateway host (for container workloads, point it at ``podman exec`` if the
check must run inside).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sync.models import HealthCheck

log = logging.getLogger(__name__)


async def run_health_check(check: HealthCheck) -> tuple[bool, str]:
    """Run one check; return ``(healthy, detail)``."""
    try:
        async with asyncio.timeout(check.timeout_s):
            match check.kind:
                case "exec":
                    return await _exec(check)
                case "tcp":
                    return await _tcp(check)
                case "http":
                    return await _http(check)
    except TimeoutError:
        return False, f"{check.kind} check timed out after {check.timeout_s}s"
    except OSError as exc:
        return False, f"{check.kind} check failed: {exc}"


async def _exec(check: HealthCheck) -> tuple[bool, str]:
    proc = await asyncio.create_subprocess_exec(
        *check.command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        code = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return code == 0, f"exec exited with {code}"


async def _tcp(check: HealthCheck) -> tuple[bool, str]:
    assert check.port is not None  # guaranteed by the model
    _reader, writer = await asyncio.open_connection(check.host, check.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, "tcp connect ok"


async def _http(check: HealthCheck) -> tuple[bool, str]:
    # A bare HTTP/1.0 GET: the agent stays free of an HTTP client import.
    assert check.port is not None
    reader, writer = await asyncio.open_connection(check.host, check.port)
    try:
        writer.write(
            f"GET {check.path} HTTP/1.0\r\nHost: {check.host}\r\nConnection: close\r\n\r\n".encode(
                "latin-1"
            )
        )
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = status_line.decode("latin-1", "replace").split()
    if len(parts) < 2 or not parts[1].isdigit():
        return False, f"bad HTTP status line {status_line[:80]!r}"
    status = int(parts[1])
    return 200 <= status < 400, f"http status {status}"
