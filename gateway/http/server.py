"""The gateway's HTTP/1.1 server: limits, listeners, the connection registry with its cap,
one sweeper for every deadline, graceful shutdown. A connection's own work is in
:mod:`gateway.http.connection`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..errors import GatewayError
from .connection import BUSY, Connection
from .request import Request

Handler = Callable[[Request], Awaitable[None]]


class Inflight(Protocol):
    """A request the callback path is forwarding (:class:`gateway.fastpath.FastExchange`)."""

    def cut(self) -> None:
        """Shutdown: give up on it now, and record that."""


# The callback path: takes a request and forwards it without a task, or returns None (the
# request is then the handler's).
FastPath = Callable[[Request], Inflight | None]
_READ_BUFFER = 256 * 1024  # bytes one read may take (what uvloop's own read buffer holds)
_QUIET = 0.5  # seconds without a request in flight before a draining server closes idle ones


class Limits:
    """Sizes and deadlines of one server; plain attributes, fixed at start."""

    __slots__ = (
        "max_header_bytes",
        "header_timeout",
        "keepalive_timeout",
        "body_timeout",
        "min_rate",
        "send_timeout",
        "max_connections",
    )

    def __init__(
        self,
        *,
        max_header_bytes: int = 8190,
        header_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
        body_timeout: float = 60.0,
        min_rate: int = 1024,
        send_timeout: float = 30.0,
        max_connections: int = 10_000,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.min_rate = min_rate
        self.send_timeout = send_timeout
        self.max_connections = max_connections


class Server:
    """Protocol factory, connection registry, sweeper and graceful shutdown."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        on_refusal: Callable[[GatewayError], None] = lambda e: None,
        fast: FastPath | None = None,
    ) -> None:
        self.handler = handler
        self.fast = fast
        self.limits = limits
        self.on_refusal = on_refusal
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.refused_connections = 0
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        # Every connection of this server reads into this one buffer (asyncio's
        # BufferedProtocol): the parser copies what it keeps before the next read, and the
        # loop runs one callback at a time. It spares a copy of each read into a new bytes
        # object, which for an upload is the whole body once more.
        self.read_buffer = memoryview(bytearray(_READ_BUFFER))

    def __call__(self) -> Connection:
        return Connection(self)

    def opened(self, conn: Connection) -> None:
        """Register a connection; at the cap, make room or refuse it."""
        if len(self.connections) >= self.limits.max_connections and not self._evict():
            self.refused_connections += 1
            conn.abort()
            return
        self.connections.add(conn)

    def _evict(self) -> bool:
        """Close the connection that waited longest without a request in hand (idle, or
        still sending its head): slow heads must not lock legitimate clients out."""
        victim: Connection | None = None
        for c in self.connections:
            if c.state != BUSY and (victim is None or c.since < victim.since):
                victim = c
        if victim is None:
            return False
        victim.abort()
        self.connections.discard(victim)
        return True

    async def listen(
        self,
        host: str,
        port: int,
        *,
        ssl: object = None,
        sock: object = None,
        reuse_port: bool = False,
        backlog: int = 1024,
    ) -> tuple[str, int]:
        """Start listening; returns the bound address."""
        if sock is not None:
            srv = await self.loop.create_server(
                self,
                sock=sock,
                ssl=ssl,  # type: ignore
                backlog=backlog,
            )
        else:
            srv = await self.loop.create_server(
                self,
                host,
                port,
                ssl=ssl,  # type: ignore
                reuse_port=reuse_port or None,
                backlog=backlog,
            )
        self._servers.append(srv)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
        addr = srv.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def _sweep(self) -> None:
        lim = self.limits
        interval = max(
            0.05, min(1.0, lim.header_timeout / 4, lim.keepalive_timeout / 4, lim.send_timeout / 4)
        )
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.sweep(now)

    def busy(self) -> int:
        """Connections with a request in hand."""
        return sum(1 for c in self.connections if c.task is not None or c.inflight is not None)

    async def shutdown(self, grace: float) -> int:
        """Stop accepting; answer every request in flight, and any that arrives on an open
        connection meanwhile, with ``Connection: close``; once nothing has been in flight for
        ``_QUIET`` seconds (a keep-alive client's next request may be on its way) close what
        is idle; at ``grace`` seconds cut the rest. Returns how many requests were cut."""
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.draining = True
        loop = self.loop
        deadline = loop.time() + grace
        quiet_since = loop.time()
        while self.connections and loop.time() < deadline:
            tasks = [c.task for c in self.connections if c.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=min(0.1, max(0.0, deadline - loop.time())))
                quiet_since = loop.time()
            elif any(c.inflight is not None for c in self.connections):
                await asyncio.sleep(0.01)  # callback-path requests: no task to wait on
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= _QUIET:
                break
            else:
                await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close_if_idle()
        cut: list[asyncio.Task[None]] = []
        cut_fast = 0
        for conn in list(self.connections):
            if conn.task is not None:
                cut.append(conn.task)
                conn.task.cancel()
            elif conn.inflight is not None:
                cut_fast += 1
                conn.inflight.cut()  # recorded now
            conn.abort()
        if cut:
            await asyncio.wait(cut, timeout=1.0)  # their audit lines are written
        if self._sweeper is not None:
            self._sweeper.cancel()
        for srv in self._servers:
            await srv.wait_closed()
        return len(cut) + cut_fast
