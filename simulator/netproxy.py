"""A TCP proxy with a hand on the wire: partitions, latency, killed connections.

There is no ``tc`` here, so the simulator puts one of these between a region
and the hub's broker (or between devices and their relay broker) and cuts the
region off by command::

    async with TcpProxy("127.0.0.1", broker_port) as proxy:
        relay connects to 127.0.0.1:proxy.port
        proxy.partition()            # every connection cut, new ones refused
        proxy.heal()                 # connections accepted again
        proxy.set_latency(0.2)       # 200 ms added each way
        proxy.kill_connections()     # one-off cut (a NAT timeout, a modem reset)

Partition modes:

``cut``
    Every open connection is aborted (the peer gets a reset) and new ones are
    accepted and aborted at once: clients see the loss immediately, as after a
    modem reset or a broker-side RST.
``blackhole``
    Connections stay open but nothing moves either way; new ones are accepted
    and get no answer. Clients notice only through their keepalive, as on a dead
    satellite link. Bytes are held, not dropped (TCP would retransmit them), so
    a connection that survives until :meth:`TcpProxy.heal` carries on intact.

Buffers are bounded: each direction of a connection reads at most
``chunk_bytes`` at a time and holds at most ``max_chunks`` chunks waiting for
their latency to pass. A full buffer stops reading from the sender (TCP
backpressure, counted in :attr:`ProxyStats.stalls`), it never grows or drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from simulator._errors import SimulatorError

__all__ = ["PartitionMode", "ProxyError", "ProxyStats", "TcpProxy"]

log = logging.getLogger(__name__)

PartitionMode = Literal["cut", "blackhole"]


class ProxyError(SimulatorError):
    """The proxy could not listen.

    Attributes:
        port: the port it tried (``0`` for any).
    """

    def __init__(self, message: str, *, port: int) -> None:
        self.port = port
        super().__init__(f"TCP proxy on port {port}: {message}")


@dataclass
class ProxyStats:
    """Counters of one proxy (for the report and for tests)."""

    accepted: int = 0
    """Connections accepted and forwarded upstream."""
    refused: int = 0
    """Connections aborted at accept time (partitioned, or upstream unreachable)."""
    killed: int = 0
    """Open connections aborted by a partition or :meth:`TcpProxy.kill_connections`."""
    bytes_up: int = 0
    """Bytes forwarded client -> upstream."""
    bytes_down: int = 0
    """Bytes forwarded upstream -> client."""
    held: int = 0
    """Connections accepted during a ``blackhole`` partition and held until heal."""
    stalls: int = 0
    """Times a full buffer paused reading from a sender (backpressure)."""


class _Conn:
    """One proxied connection: two pumps, each with a bounded delay line."""

    def __init__(
        self,
        proxy: TcpProxy,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        u_reader: asyncio.StreamReader,
        u_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.writers = (c_writer, u_writer)
        self.tasks = [
            asyncio.create_task(self._pipe(c_reader, u_writer, up=True), name="proxy-up"),
            asyncio.create_task(self._pipe(u_reader, c_writer, up=False), name="proxy-down"),
        ]

    def abort(self) -> None:
        for w in self.writers:
            w.transport.abort()
        for t in self.tasks:
            t.cancel()

    async def wait(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        proxy = self.proxy
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=proxy.max_chunks)
        sender = asyncio.create_task(self._deliver(line, writer, up=up), name="proxy-deliver")
        try:
            while True:
                data = await reader.read(proxy.chunk_bytes)
                if not data:
                    break
                if line.full():
                    proxy.stats.stalls += 1
                await line.put((time.monotonic() + proxy.latency_s, data))
            # Peer closed its side: flush what is in the line, then half-close.
            await line.join()
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()
        except OSError:
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            # Either side gone: the connection is over (MQTT has no half-open use).
            writer.transport.abort()

    async def _deliver(
        self, line: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        proxy = self.proxy
        while True:
            due, data = await line.get()
            try:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await proxy.flowing.wait()
                writer.write(data)
                await writer.drain()
                if up:
                    proxy.stats.bytes_up += len(data)
                else:
                    proxy.stats.bytes_down += len(data)
            finally:
                line.task_done()


class TcpProxy:
    """Listen on ``listen_host:listen_port`` and forward to ``upstream``.

    Args:
        upstream_host: where connections go.
        upstream_port: the upstream port.
        listen_host: the address to listen on.
        listen_port: the port (``0``: any free one; see :attr:`port`).
        latency_s: delay added to every chunk, each way.
        chunk_bytes: most bytes read at once per direction.
        max_chunks: most chunks waiting per direction (the buffer bound).
        max_connections: connections past this are refused (counted).
        name: a label for logs.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        latency_s: float = 0.0,
        chunk_bytes: int = 65_536,
        max_chunks: int = 64,
        max_connections: int = 100_000,
        name: str = "proxy",
    ) -> None:
        if chunk_bytes < 1 or max_chunks < 1 or max_connections < 1:
            raise ValueError("chunk_bytes, max_chunks and max_connections must be >= 1")
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self._listen_port = listen_port
        self.latency_s = latency_s
        self.chunk_bytes = chunk_bytes
        self.max_chunks = max_chunks
        self.max_connections = max_connections
        self.name = name
        self.stats = ProxyStats()
        self._partition: PartitionMode | None = None
        self.flowing = asyncio.Event()
        """Set while bytes may move (cleared by a ``blackhole`` partition)."""
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started)."""
        if self._server is None:
            raise RuntimeError("the proxy has not been started")
        return self._listen_port

    @property
    def partitioned(self) -> PartitionMode | None:
        """The current partition mode, or ``None`` when healed."""
        return self._partition

    @property
    def blackholed(self) -> bool:
        """Whether bytes are being dropped."""
        return self._partition == "blackhole"

    @property
    def connections(self) -> int:
        """Open proxied connections."""
        return len(self._conns)

    async def start(self) -> None:
        """Listen; a no-op when already listening.

        Raises:
            ProxyError: the port cannot be bound.
        """
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._on_client, self.listen_host, self._listen_port, reuse_address=True
            )
        except OSError as exc:
            raise ProxyError(str(exc), port=self._listen_port) from exc
        sock: socket.socket = self._server.sockets[0]
        self._listen_port = int(sock.getsockname()[1])
        log.info("%s: 127.0.0.1:%s -> %s:%s", self.name, self._listen_port, *self.upstream)

    async def aclose(self) -> None:
        """Stop listening and abort every connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._abort_all()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- controls ----------------------------------------------------------------

    def partition(self, mode: PartitionMode = "cut") -> None:
        """Cut the link (see the module docstring for the two modes)."""
        self._partition = mode
        if mode == "cut":
            self.flowing.set()
            self._abort_all()
        else:
            self.flowing.clear()
        log.info("%s: partitioned (%s)", self.name, mode)

    def heal(self) -> None:
        """End a partition: new connections are forwarded again."""
        if self._partition is not None:
            log.info("%s: healed", self.name)
        self._partition = None
        self.flowing.set()

    def set_latency(self, seconds: float) -> None:
        """Add ``seconds`` of delay to every chunk, each way, from now on."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self.latency_s = seconds

    def kill_connections(self) -> int:
        """Abort every open connection now; return how many. New ones are accepted."""
        return self._abort_all()

    def _abort_all(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        self.stats.killed += len(conns)
        return len(conns)

    # -- connections ---------------------------------------------------------------

    async def _on_client(
        self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(c_reader, c_writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._partition == "cut" or len(self._conns) >= self.max_connections:
            self.stats.refused += 1
            c_writer.transport.abort()
            return
        if self._partition == "blackhole":
            # Accept and stay silent until healed (the client's timeout decides).
            self.stats.held += 1
            await self.flowing.wait()
            if self.partitioned is not None:  # healed into a cut
                self.stats.refused += 1
                c_writer.transport.abort()
                return
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.debug("%s: upstream unreachable: %s", self.name, exc)
            self.stats.refused += 1
            c_writer.transport.abort()
            return
        conn = _Conn(self, c_reader, c_writer, u_reader, u_writer)
        self._conns.add(conn)
        self.stats.accepted += 1
        try:
            await conn.wait()
        finally:
            self._conns.discard(conn)
            conn.abort()
