"""The upstream pool and one exchange on it: take a connection (reused LIFO, or new), send
the request, relay the answer, give the connection back only when it is known to be in step.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from typing import Any

from ..errors import BadGateway, GatewayTimeout, Overloaded
from .body import Upload
from .heads import Head
from .request import Request
from .upstream import Stale, UpstreamConnection

log = logging.getLogger(__name__)

_IDLE_SECONDS = 30.0
_HIGH_WATER = 256 * 1024
_GATHER = 8 * 1024  # bodies from this size are written beside the head, not copied behind it


class Pool:
    """Keep-alive connections to one upstream; LIFO so hot connections stay hot.

    ``size`` bounds the connections in use; requests that stream their body may hold at most
    half of them, so trickling uploads cannot take every slot from everyone else. A request
    that waits longer than ``connect_timeout`` for a slot gets 503."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        size: int = 256,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        per_client: int = 0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.ssl = ssl.create_default_context() if tls else None
        self.size = size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.streaming_limit = max(1, size // 2)
        # One client address may hold at most this many connections; 0: no such limit (the
        # default: behind a proxy or NAT many users share one address).
        self.per_client = per_client
        self._held: dict[str, int] = {}
        self.streaming = 0
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[tuple[UpstreamConnection, float]] = []
        # relayed answer heads by what they were made from (UpstreamConnection)
        self.heads: dict[tuple[bytes, bool, bool], Head] = {}
        self.busy: set[UpstreamConnection] = set()
        self.down_since = 0.0  # wall time the upstream stopped answering; 0 if up
        self.failures = 0  # connection failures in the current episode
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def in_use(self) -> int:
        """Connections lent out now."""
        return self.size - self._free

    @property
    def idle(self) -> int:
        """Open idle connections kept for reuse."""
        return sum(1 for c, _ in self._idle if not c.broken)

    @property
    def exhausted(self) -> bool:
        """Every slot is in use and requests are waiting."""
        return self._free <= 0 and bool(self._waiters)

    async def _take_slot(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut = self.loop.create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.connect_timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                self._give_slot()  # granted just as we gave up
            else:
                fut.cancel()
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded(
                    "every upstream connection is busy; retry shortly",
                    code="upstream_pool_exhausted",
                ) from None
            raise

    def _give_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to a waiter
                return
        self._free += 1

    def try_acquire(self) -> UpstreamConnection | None:
        """An idle pooled connection without waiting, or ``None`` (the common case first)."""
        if self._free <= 0 or self._waiters or not self._idle:
            return None
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            t = conn.transport
            if (
                not conn.broken
                and now - since < _IDLE_SECONDS
                and t is not None
                and not t.is_closing()
            ):
                self._free -= 1
                self.busy.add(conn)
                return conn
            conn.close()
        return None

    def hold(self, client: str) -> None:
        """Count a connection lent to ``client``; 503 past its share of the pool."""
        held = self._held.get(client, 0)
        if held >= self.per_client:
            raise Overloaded(
                f"this client holds {held} upstream connections already; retry shortly",
                code="upstream_client_limit",
            )
        self._held[client] = held + 1

    def unhold(self, client: str) -> None:
        left = self._held[client] - 1
        if left:
            self._held[client] = left
        else:
            del self._held[client]

    async def acquire(
        self, streaming: bool = False, *, fresh: bool = False
    ) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused from the pool (never with ``fresh``)."""
        if streaming:
            if self.streaming >= self.streaming_limit:
                raise Overloaded(
                    "too many uploads in progress; retry shortly", code="upstream_pool_exhausted"
                )
            self.streaming += 1
        try:
            await self._take_slot()
        except BaseException:
            if streaming:
                self.streaming -= 1
            raise
        now = time.monotonic()
        while self._idle and not fresh:
            conn, since = self._idle.pop()
            if (
                not conn.broken
                and now - since < _IDLE_SECONDS
                and conn.transport is not None
                and not conn.transport.is_closing()
            ):
                self.busy.add(conn)
                return conn, True
            conn.close()
        try:
            conn = await self._connect()
        except BaseException:
            self._give_slot()
            if streaming:
                self.streaming -= 1
            raise
        self.busy.add(conn)
        return conn, False

    async def _connect(self) -> UpstreamConnection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            self._went_down(f"no connection within {self.connect_timeout:g}s")
            raise GatewayTimeout(
                "the upstream did not accept a connection in time", code="upstream_connect_timeout"
            ) from None
        except OSError as exc:
            self._went_down(exc.strerror or exc.__class__.__name__)
            raise BadGateway("the upstream could not be reached") from None
        if self.down_since:
            log.info(
                "upstream %s:%d answers again (down %.1fs, %d failed attempts)",
                self.host,
                self.port,
                time.time() - self.down_since,
                self.failures,
            )
            self.down_since, self.failures = 0.0, 0
        return conn

    def _went_down(self, why: str) -> None:
        self.failures += 1
        if not self.down_since:
            self.down_since = time.time()
            log.warning(
                "upstream %s:%d unreachable: %s (logged once until it answers again)",
                self.host,
                self.port,
                why,
            )

    def release(self, conn: UpstreamConnection, streaming: bool = False) -> None:
        self.busy.discard(conn)
        if streaming:
            self.streaming -= 1
        if conn.reusable():
            conn.reset()
            t = conn.transport
            if t is not None and not t.is_reading():
                t.resume_reading()  # paused for a slow client: ready for the next one
            self._idle.append((conn, time.monotonic()))
        else:
            conn.reset()
            conn.abort() if not conn.complete else conn.close()
        if self._waiters:
            self._give_slot()
        else:
            self._free += 1

    async def _sweep(self) -> None:
        """Time out exchanges whose upstream made no progress for ``read_timeout``."""
        interval = max(0.05, min(1.0, self.read_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            deadline = self.loop.time() - self.read_timeout
            for conn in list(self.busy):
                sink = conn.sink
                if conn.awaiting_client or (sink is not None and sink.conn.flow.paused_since):
                    continue  # waiting for our client, not for the upstream
                if conn.active and conn.active < deadline and not conn.complete:
                    conn.timed_out()

    def close(self) -> None:
        self._sweeper.cancel()
        for conn, _ in self._idle:
            conn.close()
        self._idle.clear()


async def _drained(conn: UpstreamConnection, done: asyncio.Future[int]) -> bool:
    """Wait until the upstream has room for more of the body: True, or False once its answer
    is complete or failed first (an upstream that answers early and stops reading, keeping
    the connection open, must not hold the exchange and its pool slot for ever)."""
    if done.done():
        return False
    if not conn.flow.paused_since:  # room already, the common case: no task, no wait
        try:
            await conn.flow.drain()  # raises at once if the connection is gone
        except ConnectionError:
            return False
        return True
    drain = asyncio.ensure_future(conn.flow.drain())
    try:
        await asyncio.wait((drain, done), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not drain.done():
            drain.cancel()
    if not drain.done() or drain.cancelled():
        return False
    return drain.exception() is None


def request_head(method: bytes, target: bytes, host: bytes, lines: list[bytes]) -> bytes:
    """The request line and header block, from already-filtered header lines."""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, target, host, b"".join(lines))


async def exchange(
    pool: Pool,
    req: Request | None,
    head: bytes,
    body: bytes | None,
    stream: Any = None,
    *,
    retry: bool = False,
    client: str | None = None,
    fresh: bool = False,
) -> int:
    """Send one request (``head`` + ``body``, or the client's body streamed from ``stream``,
    a :class:`~gateway.http.server.Body` whose framing ``head`` announced) and relay its answer
    into ``req``. Returns the status. Raises :class:`GatewayError` before any byte of the
    answer left, :class:`ClientGone` when the client disappeared. ``fresh``: on a new
    connection, never a pooled one."""
    streaming = stream is not None
    if client is not None and pool.per_client:
        pool.hold(client)
    else:
        client = None
    try:
        for attempt in (0, 1):
            conn = pool.try_acquire() if not (streaming or fresh) and attempt == 0 else None
            if conn is not None:
                reused = True
            else:
                conn, reused = await pool.acquire(streaming, fresh=fresh)
            done: asyncio.Future[int] = pool.loop.create_future()
            conn.start(req, done)
            if req is not None:
                req.conn.relay_source = conn.transport
                if req.conn.flow.paused_since:  # the client is not reading: nor do we
                    conn.transport.pause_reading()  # type: ignore[union-attr]
            try:
                assert conn.transport is not None
                if not body:
                    conn.transport.write(head)
                elif len(body) < _GATHER:
                    conn.transport.write(head + body)
                else:  # one writev, without copying a large body behind the head
                    conn.transport.writelines((head, body))
                if streaming:
                    await _send_body(conn, stream, head, done)
                return await done
            except Stale:
                if attempt == 0 and reused and retry and not streaming:
                    continue
                raise BadGateway(
                    "the upstream closed the connection", code="upstream_broke"
                ) from None
            except BaseException:
                conn.broken = True
                raise
            finally:
                if req is not None:
                    req.conn.relay_source = None
                pool.release(conn, streaming)
    finally:
        if client is not None:
            pool.unhold(client)
    raise AssertionError("unreachable")  # pragma: no cover


async def _send_body(
    conn: UpstreamConnection, body: Upload, head: bytes, done: asyncio.Future[int]
) -> None:
    """Forward a streamed client body; any break aborts the upstream connection. Stops early
    when the upstream has answered (or failed) while it was not reading: the caller relays
    ``done``."""
    chunked = head.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    transport = conn.transport
    assert transport is not None
    conn.upload = body
    try:
        while True:
            conn.awaiting_client = True  # the client's pause: its own deadlines apply
            try:
                chunk = await body.read()
            finally:
                conn.awaiting_client = False
            if conn.complete or conn.broken:
                conn.broken = True  # answered (or failed) before the body was sent
                return
            if not chunk:
                break
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            conn.active = conn.loop.time()  # an upload in progress is not a stall
            if transport.get_write_buffer_size() > _HIGH_WATER and not await _drained(conn, done):
                # The upstream answered, went away or was timed out mid-upload: what the
                # client gets is that answer or that failure (504, 502), which the caller
                # awaits; never a reset taken for the client's own disconnect.
                conn.broken = True
                return
        if chunked:
            transport.write(b"0\r\n\r\n")
        conn.active = conn.loop.time()
    except BaseException:
        conn.abort()  # a half-sent body must never be reused
        raise
    finally:
        conn.upload = None
