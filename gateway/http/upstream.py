"""The upstream side: a keep-alive pool of connections parsed by httptools, relaying answers
straight into the client connection.

Framing is re-made on every hop and never trusted across it:

* request bodies are forwarded byte for byte as the client sent them (never decoded; a
  ``Content-Encoding`` travels with the bytes it describes); the upstream gets the client's
  ``Content-Length`` only when exactly that many bytes follow, else ``chunked``. A body that
  ends early or breaks off aborts the upstream connection: it is never reused.
* answers are parsed by llhttp; the client gets the upstream's ``Content-Length`` with exactly
  that many bytes, or our own chunked framing around the decoded chunks (``Connection: close``
  for HTTP/1.0 clients). An answer that breaks off cuts the client connection.
* an upstream connection is reused only after a complete answer that did not ask to close,
  to a request whose body was sent whole, and never after HEAD (llhttp cannot be told that a
  HEAD answer has no body) or after bytes arrived out of turn.

Slow clients slow the upstream (its socket is paused while the client's is full), they do not
fill memory. A reused connection that turns out closed is retried once on a fresh one for
idempotent requests whose body was not streamed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from typing import Any

import httptools

from ..errors import BadGateway, GatewayError, GatewayTimeout, Overloaded
from .flow import FlowControl
from .message import HOP_BY_HOP, NO_BODY_STATUS, REASONS, connection_tokens, status_line
from .server import Request

log = logging.getLogger(__name__)

_IDLE_SECONDS = 30.0
_HIGH_WATER = 256 * 1024
_SKIP_RESPONSE = HOP_BY_HOP | {b"content-length"}
_NONE: frozenset[bytes] = frozenset()
_STANDARD = {(code, phrase): line for code, phrase in REASONS.items()
             for line in (status_line(code),)}


class Stale(Exception):
    """The connection closed before any byte of the answer: safe to retry idempotent ones."""


class ClientGone(ConnectionError):
    """The client went away while its answer was being relayed."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Request | None = None
        self.done: asyncio.Future[int] | None = None
        self.active = 0.0            # loop time data last moved; 0 while idle
        self.broken = False
        self.complete = False
        self.received_any = False
        self._out: list[bytes] = []
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._connection: list[bytes] = []
        self._interim = False
        self._chunked_out = False
        self._until_eof = False
        self._status = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.flow.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.broken = True
        self.flow.connection_lost()
        if self.sink is not None and self._status and self._until_eof and not self.complete:
            # An answer delimited by the close is complete now.
            self._finish_body()
            self._flush()
            self._settle(self._status)
            return
        if not self.received_any:
            self._fail(Stale())
        elif not self.complete:
            self._fail(BadGateway("the upstream closed the connection mid-answer",
                                  code="upstream_broke"))

    def pause_writing(self) -> None:
        self.flow.pause(self.loop.time())

    def resume_writing(self) -> None:
        self.flow.resume()

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.complete:
            # Nothing was asked: an upstream that talks out of turn cannot be trusted to
            # stay in step with our requests.
            self.broken = True
            self.close()
            return
        self.active = self.loop.time()
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.broken = True
            self._fail(BadGateway("the upstream switched protocols, which is not proxied",
                                  code="upstream_protocol"))
        except httptools.HttpParserError as exc:
            self.broken = True
            cause = exc.__context__
            self._fail(cause if isinstance(cause, GatewayError) else BadGateway(
                "the upstream sent a malformed answer", code="upstream_malformed"))
            self.abort()
        self._flush()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request: the connection is out of step for good.
            self.broken = True
            raise BadGateway("the upstream answered twice", code="upstream_malformed")
        self._headers = []
        self._connection: list[bytes] = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(name) == 10 and name.lower() == b"connection":
            self._connection.append(value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise BadGateway("the upstream switched protocols, which is not proxied",
                                 code="upstream_protocol")
            self._interim = True                   # 1xx answers are not relayed
            return
        self._status = status
        sink = self.sink
        if sink is None:                           # a probe: only the status matters
            return
        named = connection_tokens(b",".join(self._connection)) if self._connection else _NONE
        reason = self._reason
        out = [_STANDARD.get((status, reason)) or status_line(status, reason or None)]
        length: bytes | None = None
        chunked_in = False
        for name, value in self._headers:
            low = name.lower()
            if low in _SKIP_RESPONSE or low in named:
                if low == b"content-length":
                    length = value
                elif low == b"transfer-encoding":
                    chunked_in = True
                continue
            out.append(b"%s: %s\r\n" % (name, value))
        no_body = sink.head_only or status in NO_BODY_STATUS
        if sink.head_only and length is not None:
            out.append(b"Content-Length: %s\r\n" % length)
        elif not no_body:
            if length is not None:
                out.append(b"Content-Length: %s\r\n" % length)
            elif sink.http11:
                self._chunked_out = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                sink.keep_alive = False            # HTTP/1.0: the body ends with the close
            self._until_eof = length is None and not chunked_in
        out.append(sink.connection_header())
        out.append(b"\r\n")
        sink.status = status
        self._out.append(b"".join(out))
        if sink.head_only:
            # llhttp would wait for a body the answer to HEAD does not have.
            self.broken = True
            self._finish_body()
            self._settle(status)

    def on_body(self, data: bytes) -> None:
        if self.sink is None or self.complete:
            return
        if self._chunked_out:
            self._out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._out.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.complete:
            return
        if not self.parser.should_keep_alive():
            self.broken = True
        self._finish_body()
        self._settle(self._status)

    # -- the exchange
    def _finish_body(self) -> None:
        self.complete = True
        if self._chunked_out:
            self._out.append(b"0\r\n\r\n")

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        sink = self.sink
        if sink is None:
            return
        try:
            sink.send(data)
        except ConnectionError:
            self.broken = True
            self.close()
            self._fail(ClientGone("the client went away during the answer"))

    def _settle(self, status: int) -> None:
        done = self.done
        if done is not None and not done.done():
            done.set_result(status)

    def _fail(self, exc: BaseException) -> None:
        self.broken = True
        done = self.done
        if done is not None and not done.done():
            done.set_exception(exc)
            done.exception()                        # retrieved: the awaiter re-raises it

    def start(self, sink: Request | None) -> asyncio.Future[int]:
        """Get ready for the answer to the next request, relayed into ``sink``."""
        self.sink = sink
        self.complete = False
        self.received_any = False
        self._chunked_out = self._until_eof = self._interim = False
        self._status = 0
        self.active = self.loop.time()
        self.done = self.loop.create_future()
        return self.done

    def reset(self) -> None:
        """The exchange is over (the pool keeps or closes the connection)."""
        self.sink = None
        self.done = None
        self.active = 0.0

    def reusable(self) -> bool:
        t = self.transport
        return self.complete and not self.broken and t is not None and not t.is_closing()

    def timed_out(self) -> None:
        self._fail(GatewayTimeout("the upstream did not answer in time"))
        self.abort()

    def abort(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one upstream; LIFO so hot connections stay hot.

    ``size`` bounds the connections in use; requests that stream their body may hold at most
    half of them, so trickling uploads cannot take every slot from everyone else. A request
    that waits longer than ``connect_timeout`` for a slot gets 503."""

    def __init__(self, host: str, port: int, *, tls: bool = False, size: int = 256,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.ssl = ssl.create_default_context() if tls else None
        self.size = size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.streaming_limit = max(1, size // 2)
        self.streaming = 0
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[tuple[UpstreamConnection, float]] = []
        self.busy: set[UpstreamConnection] = set()
        self.down_since = 0.0          # wall time the upstream stopped answering; 0 if up
        self.failures = 0              # connection failures in the current episode
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
        except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
            if fut.done() and not fut.cancelled():
                self._give_slot()                 # granted just as we gave up
            else:
                fut.cancel()
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded("every upstream connection is busy; retry shortly",
                                 code="upstream_pool_exhausted") from None
            raise

    def _give_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)              # the slot passes straight to a waiter
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
            if not conn.broken and now - since < _IDLE_SECONDS and t is not None \
                    and not t.is_closing():
                self._free -= 1
                self.busy.add(conn)
                return conn
            conn.close()
        return None

    async def acquire(self, streaming: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused from the pool."""
        if streaming:
            if self.streaming >= self.streaming_limit:
                raise Overloaded("too many uploads in progress; retry shortly",
                                 code="upstream_pool_exhausted")
            self.streaming += 1
        try:
            await self._take_slot()
        except BaseException:
            if streaming:
                self.streaming -= 1
            raise
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if not conn.broken and now - since < _IDLE_SECONDS and conn.transport is not None \
                    and not conn.transport.is_closing():
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
            _, conn = await asyncio.wait_for(self.loop.create_connection(
                lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl),
                self.connect_timeout)
        except asyncio.TimeoutError:
            self._went_down("no connection within %gs" % self.connect_timeout)
            raise GatewayTimeout("the upstream did not accept a connection in time",
                                 code="upstream_connect_timeout") from None
        except OSError as exc:
            self._went_down(exc.strerror or exc.__class__.__name__)
            raise BadGateway("the upstream could not be reached") from None
        if self.down_since:
            log.info("upstream %s:%d answers again (down %.1fs, %d failed attempts)",
                     self.host, self.port, time.time() - self.down_since, self.failures)
            self.down_since, self.failures = 0.0, 0
        return conn

    def _went_down(self, why: str) -> None:
        self.failures += 1
        if not self.down_since:
            self.down_since = time.time()
            log.warning("upstream %s:%d unreachable: %s (logged once until it answers again)",
                        self.host, self.port, why)

    def release(self, conn: UpstreamConnection, streaming: bool = False) -> None:
        self.busy.discard(conn)
        if streaming:
            self.streaming -= 1
        if conn.reusable():
            conn.reset()
            self._idle.append((conn, time.monotonic()))
        else:
            conn.reset()
            conn.abort() if not conn.complete else conn.close()
        self._give_slot()

    async def _sweep(self) -> None:
        """Time out exchanges whose upstream made no progress for ``read_timeout``."""
        interval = max(0.05, min(1.0, self.read_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            deadline = self.loop.time() - self.read_timeout
            for conn in list(self.busy):
                sink = conn.sink
                if sink is not None and sink.conn.flow.paused_since:
                    continue               # waiting for our client, not for the upstream
                if conn.active and conn.active < deadline and not conn.complete:
                    conn.timed_out()

    def close(self) -> None:
        self._sweeper.cancel()
        for conn, _ in self._idle:
            conn.close()
        self._idle.clear()


def request_head(method: bytes, target: bytes, host: bytes, lines: list[bytes]) -> bytes:
    """The request line and header block, from already-filtered header lines."""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, target, host, b"".join(lines))


async def exchange(pool: Pool, req: Request | None, head: bytes, body: bytes | None,
                   stream: Any = None, *, retry: bool = False) -> int:
    """Send one request (``head`` + ``body``, or the client's body streamed from ``stream``,
    a :class:`~gateway.http.server.Body` whose framing ``head`` announced) and relay its answer
    into ``req``. Returns the status. Raises :class:`GatewayError` before any byte of the
    answer left, :class:`ClientGone` when the client disappeared."""
    streaming = stream is not None
    for attempt in (0, 1):
        conn = pool.try_acquire() if not streaming and attempt == 0 else None
        if conn is not None:
            reused = True
        else:
            conn, reused = await pool.acquire(streaming)
        done = conn.start(req)
        if req is not None:
            req.conn.relay_source = conn.transport
        try:
            assert conn.transport is not None
            conn.transport.write(head + body if body else head)
            if streaming:
                await _send_body(conn, stream, head)
            return await done
        except Stale:
            if attempt == 0 and reused and retry and not streaming:
                continue
            raise BadGateway("the upstream closed the connection",
                             code="upstream_broke") from None
        except BaseException:
            conn.broken = True
            raise
        finally:
            if req is not None:
                req.conn.relay_source = None
            pool.release(conn, streaming)
    raise AssertionError("unreachable")  # pragma: no cover


async def _send_body(conn: UpstreamConnection, body: Any, head: bytes) -> None:
    """Forward a streamed client body; any break aborts the upstream connection."""
    chunked = head.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    transport = conn.transport
    assert transport is not None
    try:
        while True:
            chunk = await body.read()
            if conn.complete or conn.broken:
                conn.broken = True        # answered (or failed) before the body was sent
                return
            if not chunk:
                break
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            conn.active = conn.loop.time()         # an upload in progress is not a stall
            if transport.get_write_buffer_size() > _HIGH_WATER:
                await conn.flow.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")
        conn.active = conn.loop.time()
    except BaseException:
        conn.abort()                               # a half-sent body must never be reused
        raise
