"""The hub daemon: the composition root that wires store, reconciler, controller,
enrollment and the HTTP API together, and ``serve`` around it.

:class:`Hub` is an async context manager (the :class:`~edge_agent._service.Service`
shape shared with the agent and the relay). Entering it opens, in order:

1. the data directory (mode 0700), the hub's signing key (``hub.key``, made at
   first start) and its public key next to it (``hub.pub``, for relays and agents);
2. the fleet store (:func:`cloud_hub.store.open_store`), the API token store
   (``tokens.db``) and the audit log (``audit.db``);
3. the :class:`~cloud_hub.reconciler.Reconciler` on the hub broker (when one is
   configured; without one, desired state is still signed and stored, and goes
   out once a broker is configured and the relays say HELLO);
4. the :class:`~cloud_hub.controller.FleetController`, restored from the store;
5. enrollment (with Mosquitto account provisioning when ``accounts`` is set);
6. the aiohttp site, then a ticker task that drives rollout deadlines and the
   lost-device rebalancing.

Closing undoes it in reverse: the ticker is cancelled, the site stops taking
requests (open event streams are closed), the reconciler disconnects, and the
stores close last.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from cloud_hub.app import HubContext, make_app
from cloud_hub.audit import AuditLog
from cloud_hub.auth import SQLiteTokenStore
from cloud_hub.broker_accounts import MosquittoFileAccounts
from cloud_hub.config import HubConfig
from cloud_hub.controller import FleetController
from cloud_hub.enrollment import Enrollment, RegionInfo
from cloud_hub.events import EventBus
from cloud_hub.health import HealthTracker
from cloud_hub.reconciler import BrokerAddress, Reconciler
from cloud_hub.store import Store, open_store
from edge_agent._service import Service
from edge_agent.identity import decode_public_key, load_or_create_device_key
from sync.keys import KeyRing, Signer

__all__ = ["GRACEFUL_TIMEOUT_S", "Hub", "run_hub", "serve"]

log = logging.getLogger(__name__)

GRACEFUL_TIMEOUT_S: Final = 10.0
"""How long a graceful shutdown may take before the hub stops hard."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _prepare_data_dir(config: HubConfig) -> Signer:
    """Blocking: the data directory and the hub key (made at first start)."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    signer = load_or_create_device_key(config.signing_key_path)
    pub = config.data_dir / "hub.pub"
    text = _b64(signer.public_key_bytes) + "\n"
    if not pub.exists() or pub.read_text(encoding="ascii") != text:
        tmp = pub.with_suffix(".pub.tmp")
        tmp.write_text(text, encoding="ascii")
        tmp.replace(pub)
    return signer


def _broker_address(config: HubConfig) -> BrokerAddress | None:
    broker = config.broker
    if broker is None:
        return None
    username: str | None = None
    password: str | None = None
    if broker.credentials is not None:
        username = broker.credentials.username
        password = broker.credentials.read_password()
    return BrokerAddress(
        host=broker.url.host,
        port=broker.url.port,
        username=username,
        password=password,
        keepalive_s=broker.keepalive_s,
    )


class Hub(Service):
    """The running hub (see the module docstring for what it opens, in order).

    Attributes:
        config: the validated configuration.
        port: the TCP port the API listens on (the real one when 0 was asked for).
        store, tokens, audit, events, health, reconciler, controller, enrollment:
            the parts, available once entered.
    """

    def __init__(self, config: HubConfig, *, clock: Callable[[], int] = _now_ms) -> None:
        super().__init__()
        self.config = config
        self.clock = clock
        self.port = 0
        self.signer: Signer | None = None
        self.store: Store | None = None
        self.tokens: SQLiteTokenStore | None = None
        self.audit: AuditLog | None = None
        self.events = EventBus()
        self.health = HealthTracker()
        self.reconciler: Reconciler | None = None
        self.controller: FleetController | None = None
        self.enrollment: Enrollment | None = None

    @property
    def url(self) -> str:
        """The API's base URL."""
        host, _ = self.config.listen_address
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    async def _start(self) -> None:
        config = self.config
        signer = await asyncio.to_thread(_prepare_data_dir, config)
        self.signer = signer
        store = await asyncio.to_thread(open_store, config.store_url)  # opens and migrates
        self.store = store
        self._stack.push_async_callback(store.aclose)
        tokens = await asyncio.to_thread(SQLiteTokenStore.open, config.data_dir / "tokens.db")
        self.tokens = tokens
        self._stack.callback(tokens.close)
        audit = await asyncio.to_thread(AuditLog.open, config.data_dir / "audit.db")
        self.audit = audit
        self._stack.callback(audit.close)

        relays: dict[str, tuple[str, KeyRing]] = {}
        for name, region in config.regions.items():
            ring = KeyRing()
            ring.add(decode_public_key(region.relay_public_key))
            relays[region.relay_id] = (name, ring)
        broker = await asyncio.to_thread(_broker_address, config)  # reads a password file
        reconciler = Reconciler(
            store,
            signer,
            broker,
            relays,
            publish=self.events.publish,
            health=self.health,
        )
        self.reconciler = await self._stack.enter_async_context(reconciler)
        controller = FleetController(
            store,
            reconciler,
            self.health,
            clock=self.clock,
            publish=self.events.publish,
            lost_after_ms=int(config.lost_after_s * 1000),
        )
        reconciler.observer = controller
        await controller.start()
        self.controller = controller
        # Reports stored before a restart reach the restored rollouts.
        await reconciler.replay_reported()
        # Reports applied lazily are saved before the reconciler and the store close.
        self._stack.push_async_callback(controller.flush)

        accounts = None
        if config.accounts is not None:
            static = None
            if config.accounts.static_acl_file is not None:
                static = await asyncio.to_thread(
                    config.accounts.static_acl_file.read_text, encoding="utf-8"
                )
            accounts = MosquittoFileAccounts(
                config.accounts.passwd_file,
                config.accounts.acl_file,
                pid_file=config.accounts.pid_file,
                static_acl=static,
            )
        regions = {
            name: RegionInfo(
                relays=tuple(endpoint.url for endpoint in region.relays),
                relay_public_keys=(region.relay_public_key,),
            )
            for name, region in config.regions.items()
        }
        self.enrollment = Enrollment(
            store,
            audit,
            regions=regions,
            hub_public_key=_b64(signer.public_key_bytes),
            clock=self.clock,
            broker=accounts,
            on_enrolled=(reconciler.add_device, controller.device_enrolled),
            on_removed=(reconciler.remove_device,),
            publish=self.events.publish,
        )

        app = make_app(
            HubContext(
                store=store,
                tokens=tokens,
                audit=audit,
                controller=controller,
                enrollment=self.enrollment,
                events=self.events,
                health=self.health,
                stats=self._stats,
                clock=self.clock,
                max_body_bytes=config.max_body_bytes,
            )
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=GRACEFUL_TIMEOUT_S)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        host, port = config.listen_address
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self.port = _bound_port(runner, port)

        await self._open_task_group()
        self._spawn(self._ticker(), name="hub-ticker")
        log.info("hub serving %s (data in %s)", self.url, config.data_dir)

    def _stats(self) -> Mapping[str, Any]:
        stats: dict[str, Any] = {}
        if self.reconciler is not None:
            stats.update(self.reconciler.stats())
        if self.controller is not None:
            stats["controller"] = dataclasses.asdict(self.controller.stats)
        return stats

    async def _ticker(self) -> None:
        assert self.controller is not None
        interval = self.config.tick_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.controller.tick()
            except Exception:
                # A tick that fails (the store busy, a bad persisted rollout) must
                # not stop the next one: logged with its traceback, counted there.
                log.exception("controller tick failed")


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked


async def serve(
    config: HubConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    ready: Callable[[Hub], object] | None = None,
) -> int:
    """Run the hub until ``shutdown_trigger`` returns (or SIGINT/SIGTERM).

    Args:
        config: the hub configuration.
        shutdown_trigger: awaited; the hub stops when it returns. Default: a
            signal handler for SIGINT and SIGTERM.
        ready: called with the running :class:`Hub` once it serves.

    Returns:
        The exit code (0).
    """
    stop = asyncio.Event()
    if shutdown_trigger is None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

        async def _wait() -> object:
            return await stop.wait()

        shutdown_trigger = _wait
    async with Hub(config) as hub:
        if ready is not None:
            ready(hub)
        await shutdown_trigger()
        log.info("hub stopping")
    return 0


async def run_hub(config: HubConfig) -> int:
    """``novacron hub serve``: print where the API is, then :func:`serve`."""

    def _announce(hub: Hub) -> None:
        print(f"novacron hub: API on {hub.url}  (data: {Path(hub.config.data_dir)})", flush=True)

    return await serve(config, ready=_announce)
