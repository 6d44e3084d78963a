"""An embedded MQTT broker (amqtt) for ``novacron demo`` and ``sim run`` without ``--broker``.

The broker runs in the caller's event loop on ``127.0.0.1``: a try-out needs no
Mosquitto. It is MQTT 3.1.1 only (amqtt's limit), which is what the agent, the
relay and the hub speak. It keeps nothing on disk: a restart forgets sessions and
retained messages, as a broker that lost its disk would, and the simulator's
``kill_broker`` fault uses exactly that (durability lives in the journals and
outboxes, never in the broker; DESIGN.md, "Sync protocol").

Usage::

    async with EmbeddedBroker() as broker:
        print(broker.url)            # mqtt://127.0.0.1:PORT
        await broker.stop()          # a broker outage ...
        await broker.start()         # ... and back on the same port

amqtt logs every connection at INFO under the ``amqtt`` logger; the CLI lowers
that logger to WARNING for fleets of thousands of clients.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from types import TracebackType
from typing import Any, Protocol, Self

# amqtt ships no py.typed; pyproject's mypy overrides belong to the project owner.
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.errors import BrokerError  # type: ignore[import-untyped]

from edge_agent._service import cancel_until_done
from simulator._errors import SimulatorError

__all__ = ["BrokerControl", "BrokerStartError", "EmbeddedBroker", "free_port"]

log = logging.getLogger(__name__)

_BIND_ATTEMPTS = 5
_SAME_PORT_ATTEMPTS = 50
_SAME_PORT_RETRY_S = 0.1
_SHUTDOWN_GRACE_S = 3.0
"""How long amqtt's own shutdown gets before the broker's connections are aborted."""


class BrokerStartError(SimulatorError):
    """The embedded broker could not listen.

    Attributes:
        port: the port it tried.
    """

    def __init__(self, message: str, *, port: int) -> None:
        self.port = port
        super().__init__(f"embedded MQTT broker on 127.0.0.1:{port}: {message}")


class BrokerControl(Protocol):
    """What the fault injector needs of a broker it may stop and restart."""

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the broker."""
        ...

    async def start(self) -> None:
        """Start (or restart) the broker; return once it accepts connections."""
        ...

    async def stop(self) -> None:
        """Stop the broker; every client loses its connection."""
        ...


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker with its retained-message replay kept to the client's own
    subscriptions, and a stop that cannot hang.

    **Stop.** amqtt 0.12 closes its listener only after it has stopped every
    client session one by one, and stopping a session can wait forever (a
    reader task whose cancellation was lost). The port then stays taken and a
    restart cannot bind it (seen in the simulator's ``kill_broker``). So the
    listeners and connections are tracked here: :meth:`close_listeners` frees
    the port first, and :meth:`abort_connections` ends what shutdown did not.

    amqtt 0.12 replays, to every client that connects, the retained messages of
    every topic filter *anyone* subscribed to (``for topic in self._subscriptions``
    in ``_handle_client_session``), and iterates that dict across awaits (a
    ``RuntimeError`` that resets the connection when clients connect together).
    A client must get retained messages of its own subscriptions only (MQTT
    3.1.1, 3.3.1.3): the replay is skipped for filters the session is not
    subscribed to, which also returns before any await, so the iteration is safe.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.listeners: list[asyncio.Server] = []
        self.connections: set[asyncio.StreamWriter] = set()

    async def _create_server_instance(self, *args: Any, **kwargs: Any) -> Any:
        server = await super()._create_server_instance(*args, **kwargs)
        if isinstance(server, asyncio.Server):
            self.listeners.append(server)
        return server

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        self.connections.add(writer)
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            self.connections.discard(writer)

    def close_listeners(self) -> None:
        """Stop accepting connections and free the port at once."""
        for server in self.listeners:
            server.close()

    def abort_connections(self) -> int:
        """Drop every client connection without a goodbye; return how many."""
        writers, self.connections = list(self.connections), set()
        for writer in writers:
            writer.transport.abort()
        return len(writers)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter = subscription[0]
        subscribers = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on right now (racy by nature).

    Picked below Linux's ephemeral range (32768+): a client reconnecting in a
    loop to a stopped broker on an ephemeral port can be given that very port as
    its own source port and connect to itself (TCP simultaneous open), which
    then holds the port and keeps the broker from coming back on it.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_768)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` as an async context manager.

    Args:
        port: the TCP port; ``None`` picks a free one at the first start and
            keeps it for every restart.
        host: the address to bind (loopback by default: the demo is local).
        max_connections: listener connection cap (``0`` = unlimited).
    """

    def __init__(
        self, port: int | None = None, *, host: str = "127.0.0.1", max_connections: int = 0
    ) -> None:
        self._host = host
        self._port = port
        self._fixed_port = port is not None
        self._max_connections = max_connections
        self._broker: Broker | None = None
        self.starts = 0
        """How many times the broker was started (restarts included)."""

    @property
    def host(self) -> str:
        """The bound address."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port (known once started, kept across restarts)."""
        if self._port is None:
            raise RuntimeError("the embedded broker has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT``."""
        return f"mqtt://{self._host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker is listening."""
        return self._broker is not None

    def _config(self, port: int) -> dict[str, object]:
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self._host}:{port}",
                    "max_connections": self._max_connections,
                }
            },
            # Only anonymous auth: no $SYS publisher, no packet logger (cost at scale).
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    async def start(self) -> None:
        """Start listening; a no-op when already running.

        Raises:
            BrokerStartError: the port is taken (after a few fresh picks when
                the port was not fixed by the caller).
        """
        if self._broker is not None:
            return
        same_port = self._fixed_port or self._port is not None
        # A fresh port is picked again when taken; a fixed one (a restart) is
        # retried for a while: the listener just closed may hold it briefly.
        attempts = _SAME_PORT_ATTEMPTS if same_port else _BIND_ATTEMPTS
        last: BaseException | None = None
        for attempt in range(attempts):
            port = self._port if self._port is not None else free_port(self._host)
            broker = _Broker(self._config(port))
            try:
                await broker.start()
            except BrokerError as exc:
                last = exc
                log.debug("embedded broker could not bind %s: %s", port, exc)
                if same_port and attempt + 1 < attempts:
                    await asyncio.sleep(_SAME_PORT_RETRY_S)
                continue
            self._broker = broker
            self._port = port
            self.starts += 1
            log.info("embedded MQTT broker listening on %s", self.url)
            return
        port = self._port if self._port is not None else 0
        raise BrokerStartError(str(last), port=port) from last

    async def stop(self) -> None:
        """Stop listening and drop every client; a no-op when stopped."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        broker.close_listeners()  # the port is free from here on
        shutdown = asyncio.ensure_future(broker.shutdown())
        try:
            done, _ = await asyncio.wait({shutdown}, timeout=_SHUTDOWN_GRACE_S)
            if not done:
                aborted = broker.abort_connections()
                log.warning(
                    "embedded broker on port %s: shutdown still running after %.0f s; "
                    "aborted %d client connections",
                    self._port,
                    _SHUTDOWN_GRACE_S,
                    aborted,
                )
                done, _ = await asyncio.wait({shutdown}, timeout=_SHUTDOWN_GRACE_S)
            if done:
                shutdown.result()
            else:
                await cancel_until_done({shutdown})
                log.warning("embedded broker on port %s: shutdown abandoned", self._port)
        finally:
            broker.abort_connections()
            log.info("embedded MQTT broker on port %s stopped", self._port)

    async def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down for ``down_s`` seconds, start again on the same port."""
        await self.stop()
        if down_s > 0:
            await asyncio.sleep(down_s)
        await self.start()

    async def aclose(self) -> None:
        """Stop the broker (alias of :meth:`stop`)."""
        await self.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
