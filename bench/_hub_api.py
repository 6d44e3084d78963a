"""API latency of the hub: ``api_p99_ms`` for device list and detail.

What runs (see :func:`measure_api`):

1. a hub data directory is seeded with ``devices`` devices (10,000) through the
   SQLite store itself (regions, profiles and labels spread over the fleet) and an
   admin API token;
2. the hub runs as its own process, ``novacron hub serve`` (API only, no broker),
   exactly as an operator starts it;
3. this process sends an open-loop load of ``rate`` requests per second (200):
   alternately a filtered device list (``?region=...&label=...&limit=50``) and a
   device detail of a random device. Each request starts at its scheduled time
   whether or not earlier ones have answered, and its latency is measured from
   that scheduled time (no coordinated omission);
4. the baseline: the same load against a bare aiohttp server in its own process
   answering a fixed JSON body of the same size as a list page, so the ratio shows
   what the hub adds to the library underneath.

Figures: ``api_p99_ms`` (both kinds together), ``api_p50_ms``,
``api_list_p99_ms``, ``api_detail_p99_ms``, ``api_baseline_p99_ms``,
``api_p99_ratio_vs_bare`` (hub / bare), ``api_requests`` and ``api_errors``
(non-200 answers or failures; a run with errors is not a valid figure).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from cloud_hub._sqlite_store import open_sqlite_store
from cloud_hub.auth import SQLiteTokenStore
from cloud_hub.store import DeviceRecord

_PROFILES = ("raspberry-pi-4", "raspberry-pi-5", "generic-x86_64", "x86-industrial-gateway")
_BARE_SERVER = """
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def handler(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/{tail:.*}", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed(data_dir: Path, devices: int, regions: int) -> tuple[str, list[str]]:
    rng = random.Random(7)
    store = open_sqlite_store(data_dir / "hub.db")
    records = [
        DeviceRecord(
            id=f"dev-{i:06d}",
            region=f"region-{i % regions}",
            profile=_PROFILES[i % len(_PROFILES)],
            public_key=f"key-{i:06d}",
            arch="x86_64",
            labels={"site": f"site-{rng.randrange(50)}", "tier": rng.choice(("a", "b"))},
            facts={"hostname": f"gw-{i}", "cpu_cores": 4, "memory_mb": 4096},
            enrolled_at_ms=1_700_000_000_000 + i,
            mqtt_username=f"dev-{i:06d}",
            status=rng.choice(("online", "online", "offline")),
            last_seen_ms=1_700_000_000_000 + i,
        )
        for i in range(devices)
    ]

    async def add() -> None:
        for start in range(0, len(records), 1000):
            await store.add_devices(records[start : start + 1000])
        await store.aclose()

    asyncio.run(add())
    tokens = SQLiteTokenStore.open(data_dir / "tokens.db")
    try:
        raw, _ = tokens.create("bench", "viewer")
    finally:
        tokens.close()
    return raw, [r.id for r in records]


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


async def _load(
    base: str, token: str, ids: list[str], *, regions: int, rate: float, duration_s: float
) -> tuple[dict[str, list[float]], int]:
    rng = random.Random(11)
    latencies: dict[str, list[float]] = {"list": [], "detail": []}
    errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

        async def one(kind: str, url: str, scheduled: float) -> None:
            nonlocal errors
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies[kind].append((time.perf_counter() - scheduled) * 1000)

        total = int(rate * duration_s)
        start = time.perf_counter() + 0.1
        tasks: list[asyncio.Task[None]] = []
        for n in range(total):
            scheduled = start + n / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if n % 2 == 0:
                url = (
                    f"{base}/api/v1/devices?region=region-{rng.randrange(regions)}"
                    f"&label=site%3Dsite-{rng.randrange(50)}&limit=50"
                )
                kind = "list"
            else:
                url = f"{base}/api/v1/devices/{rng.choice(ids)}"
                kind = "detail"
            tasks.append(asyncio.create_task(one(kind, url, scheduled)))
        await asyncio.gather(*tasks)
    return latencies, errors


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _run_server(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_api(
    devices: int = 10_000, regions: int = 10, rate: float = 200.0, duration_s: float = 15.0
) -> dict[str, Any]:
    """Seed a hub, serve it from its own process, load it; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="nc-hub-api-") as tmp:
        root = Path(tmp)
        data_dir = root / "hub"
        data_dir.mkdir()
        token, ids = _seed(data_dir, devices, regions)
        port = _free_port()
        hub = _run_server(
            [
                sys.executable,
                "-m",
                "novacron",
                "--log-level",
                "WARNING",
                "hub",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            port,
            root / "hub.log",
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(f"{base}/healthz", hub)
            sample = _sample_page(base, token, regions)
            hub_lat, hub_errors = asyncio.run(
                _load(base, token, ids, regions=regions, rate=rate, duration_s=duration_s)
            )
        finally:
            _stop(hub)
        body = root / "page.json"
        body.write_bytes(sample)
        bare_port = _free_port()
        bare = _run_server(
            [sys.executable, "-c", _BARE_SERVER, str(bare_port), str(body)],
            bare_port,
            root / "bare.log",
        )
        try:
            bare_base = f"http://127.0.0.1:{bare_port}"
            _wait_http(f"{bare_base}/healthz", bare)
            bare_lat, bare_errors = asyncio.run(
                _load(bare_base, token, ids, regions=regions, rate=rate, duration_s=duration_s)
            )
        finally:
            _stop(bare)
    both = hub_lat["list"] + hub_lat["detail"]
    bare_all = bare_lat["list"] + bare_lat["detail"]
    p99 = _p(both, 0.99)
    bare_p99 = _p(bare_all, 0.99)
    return {
        "api_p99_ms": round(p99, 2),
        "api_p50_ms": round(statistics.median(both), 2) if both else float("nan"),
        "api_list_p99_ms": round(_p(hub_lat["list"], 0.99), 2),
        "api_detail_p99_ms": round(_p(hub_lat["detail"], 0.99), 2),
        "api_baseline_p99_ms": round(bare_p99, 2),
        "api_p99_ratio_vs_bare": round(p99 / bare_p99, 2) if bare_p99 else float("nan"),
        "api_requests": len(both),
        "api_errors": hub_errors + bare_errors,
        "api_devices": devices,
        "api_rate_per_s": rate,
    }


def _sample_page(base: str, token: str, regions: int) -> bytes:
    import urllib.request

    request = urllib.request.Request(
        f"{base}/api/v1/devices?region=region-1&limit=50",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        data: bytes = response.read()
    json.loads(data)  # a real page, or fail loudly
    return data
