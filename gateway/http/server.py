"""The gateway's HTTP/1.1 server: one :class:`Connection` per client on httptools (llhttp).

llhttp refuses what could be framed two ways (``Content-Length`` with ``Transfer-Encoding``,
duplicate lengths, bad chunk sizes, obs-fold, bare LF, NUL and control characters); this layer
adds the limits llhttp leaves to its user (header line size and count) and the deadlines:

* a request head must arrive within ``header_timeout`` of the connection (or of its first byte
  on a kept-alive connection), else 408 and close;
* an idle kept-alive connection is closed after ``keepalive_timeout``;
* a request body must arrive within ``body_timeout`` in total and at ``min_rate`` bytes a
  second after a grace second, else the reader gets :class:`~gateway.errors.RequestTimeout`;
* a client that stops reading its answer for ``send_timeout`` is cut off.

All deadlines are checked by one sweeper task per server (no timer per request). Pipelined
requests are answered in order by one task per busy connection. A request whose body was not
read to its end closes the connection after the answer, so unread bytes are never parsed as a
request. ``Expect: 100-continue`` is answered only when the handler starts reading the body,
that is after authentication, authorization and the size check.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable, Mapping

import httptools

from ..errors import BadRequest, GatewayError, HeadersTooLarge, RequestTimeout
from .flow import FlowControl
from .message import (JSON_TYPE, NO_BODY_STATUS, Headers, error_body, http_date,
                      status_line)

log = logging.getLogger(__name__)

Handler = Callable[["Request"], Awaitable[None]]

_PIPELINE_PAUSE = 16          # queued requests before the socket stops being read
_BODY_HIGH = 256 * 1024       # buffered body bytes before the socket stops being read
_BODY_LOW = 64 * 1024
_MAX_HEADERS = 100
_AUTH_FIELD_LIMIT = 128 * 1024  # an oversize credential is a bad credential (401), up to this
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Connection states the sweeper looks at.
_HEAD, _BUSY, _IDLE, _LINGER = 0, 1, 2, 3
_LINGER_SECONDS = 2.0


class Limits:
    """Sizes and deadlines of one server; plain attributes, fixed at start."""

    __slots__ = ("max_header_bytes", "header_timeout", "keepalive_timeout", "body_timeout",
                 "min_rate", "send_timeout", "max_connections")

    def __init__(self, *, max_header_bytes: int = 8190, header_timeout: float = 10.0,
                 keepalive_timeout: float = 75.0, body_timeout: float = 60.0,
                 min_rate: int = 1024, send_timeout: float = 30.0,
                 max_connections: int = 10_000) -> None:
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.min_rate = min_rate
        self.send_timeout = send_timeout
        self.max_connections = max_connections


class Body:
    """A request body as it arrives: :meth:`read` gives chunks, ``b""`` at its end.

    Raises :class:`~gateway.errors.BadRequest` for a body the parser refused,
    :class:`~gateway.errors.RequestTimeout` for one that came too slowly, and
    :class:`ConnectionResetError` when the client went away before its end."""

    __slots__ = ("_conn", "_chunks", "_buffered", "_eof", "_exc", "_waiter", "received",
                 "started_at", "_continue", "_paused")

    def __init__(self, conn: Connection, expect_continue: bool, now: float) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received = 0
        self.started_at = now
        self._continue = expect_continue
        self._paused = False

    @property
    def complete(self) -> bool:
        """Everything was received and read."""
        return self._eof and not self._chunks

    @property
    def ended(self) -> bool:
        """Everything was received (maybe not read yet)."""
        return self._eof

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > _BODY_HIGH and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._eof and self._exc is None:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        """The next chunk of the body; ``b""`` once it is all read."""
        if self._continue:
            self._continue = False
            self._conn.write_interim(_CONTINUE)
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _BODY_LOW:
            self._paused = False
            self._conn.resume_reading()
        return chunk

    def take_buffered(self) -> bytes:
        """Everything received and not read yet, without waiting."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        return data


class Request:
    """One request and its answer. The pipeline answers with :meth:`respond`, or a forwarder
    writes a relayed answer through :meth:`send` (head first, then body pieces)."""

    __slots__ = ("conn", "method", "target", "headers", "http11", "keep_alive", "body",
                 "content_length", "chunked", "started", "remote", "scheme", "head_only",
                 "status")

    def __init__(self, conn: Connection, method: str, target: str, headers: Headers,
                 http11: bool, keep_alive: bool) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        self.body: Body | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.started = False       # a byte of the answer was written
        self.remote = conn.remote
        self.scheme = conn.scheme
        self.head_only = method == "HEAD"
        self.status = 0

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self.headers.raw

    def connection_header(self) -> bytes:
        """The ``Connection`` line of the answer (also says close while draining)."""
        if self.conn.draining or (self.body is not None and not self.body.ended):
            self.keep_alive = False      # an unread body: the connection closes after this
        if not self.keep_alive:
            return b"Connection: close\r\n"
        return b"" if self.http11 else b"Connection: keep-alive\r\n"

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """Send a complete answer made by the gateway itself."""
        out = [status_line(status)]
        for name, value in headers.items():
            out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("utf-8")))
        out.append(b"Date: %s\r\n" % http_date())
        no_body = status in NO_BODY_STATUS
        if not no_body:
            out.append(b"Content-Length: %d\r\n" % len(body))
        out.append(self.connection_header())
        out.append(b"\r\n")
        if body and not no_body and not self.head_only:
            out.append(body)
        self.status = status
        self.started = True
        self.conn.write(b"".join(out))
        await self.conn.flow.drain()

    def send(self, data: bytes) -> None:
        """Write part of a relayed answer (raises :class:`ConnectionError` if the client is
        gone); the caller honours :attr:`Connection.flow`."""
        self.started = True
        self.conn.write(data)

    def abort(self) -> None:
        """Cut the client connection: the answer cannot be completed."""
        self.keep_alive = False
        self.conn.abort()


class _ParseFailure:
    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


class Connection(asyncio.Protocol):
    """One client connection: parses requests, queues them, answers them in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl = FlowControl()
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.scheme = "http"
        self.queue: deque[Request | _ParseFailure] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.draining = False
        self.state = _HEAD
        self.since = self.loop.time()
        self.reading_paused = 0   # reasons the socket is not read (bit set)
        self.relay_source: asyncio.Transport | None = None  # paused with our writes
        # the request being parsed
        self._url = b""
        self._headers = Headers()
        self._head_bytes = 0
        self._body: Body | None = None
        self._error: GatewayError | None = None
        self._in_head = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.flow.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.server.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.flow.connection_lost()
        gone = ConnectionResetError("client disconnected")
        if self._body is not None:
            self._body.fail(gone)
        for item in self.queue:
            if isinstance(item, Request) and item.body is not None:
                item.body.fail(gone)

    def pause_writing(self) -> None:
        self.flow.pause(self.loop.time())
        if self.relay_source is not None:
            self.relay_source.pause_reading()

    def resume_writing(self) -> None:
        self.flow.resume()
        if self.relay_source is not None and not self.relay_source.is_closing():
            self.relay_source.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True      # answer what was asked (Upgrade is not proxied), then close
        except httptools.HttpParserError as exc:
            self._refuse(self._error or BadRequest(_parser_message(exc), code="framing"))

    def eof_received(self) -> bool | None:
        if self._body is not None and not self._body.ended:
            self._body.fail(ConnectionResetError("client closed before sending the whole body"))
        return None

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = Headers()
        self._head_bytes = 0
        self._in_head = True
        if self.state == _IDLE:
            self.state = _HEAD
            self.since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_header_bytes:
            self._error = HeadersTooLarge("request line too long", code="headers_too_large")
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        h = self._headers
        if size > self.limits.max_header_bytes and (
                size > _AUTH_FIELD_LIMIT or name.lower() != b"authorization"):
            self._error = HeadersTooLarge(
                f"header {name[:64].decode('latin-1')} is over {self.limits.max_header_bytes}"
                " bytes", code="headers_too_large")
            raise self._error
        if len(h.raw) >= _MAX_HEADERS:
            self._error = HeadersTooLarge(f"more than {_MAX_HEADERS} header lines",
                                          code="headers_too_large")
            raise self._error
        h.add(name, value)

    def on_headers_complete(self) -> None:
        p = self.parser
        headers = self._headers
        req = Request(self, p.get_method().decode("ascii", "replace"),
                      self._url.decode("latin-1"), headers,
                      p.get_http_version() == "1.1", p.should_keep_alive())
        length = headers.get_raw(b"content-length")
        now = self.loop.time()
        if length is not None:
            req.content_length = int(length)
            if req.content_length:
                req.body = Body(self, _expects_continue(headers, req.http11), now)
        elif headers.get_raw(b"transfer-encoding") is not None:
            req.chunked = True
            req.body = Body(self, _expects_continue(headers, req.http11), now)
        self._body = req.body
        self._in_head = False
        self.state = _BUSY
        self.queue.append(req)
        if len(self.queue) >= _PIPELINE_PAUSE:
            self.pause_reading(2)
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            body.feed(data)

    def on_message_complete(self) -> None:
        body = self._body
        if body is not None:
            body.feed_eof()
            self._body = None

    # -- reading and writing
    def pause_reading(self, reason: int = 1) -> None:
        if not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
        self.reading_paused |= reason

    def resume_reading(self, reason: int = 1) -> None:
        was = self.reading_paused
        self.reading_paused &= ~reason
        if was and not self.reading_paused and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            raise ConnectionResetError("client disconnected")
        t.write(data)

    def write_interim(self, data: bytes) -> None:
        """A 1xx line, unless the answer has begun."""
        req = self.queue[0] if self.queue else None
        if isinstance(req, Request) and not req.started:
            try:
                self.write(data)
            except ConnectionError:
                pass

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def linger(self) -> None:
        """Close after an answer while the client may still be sending (an unread body, a
        refused head): end our side, read and discard for a moment, so that the client reads
        the answer instead of a reset."""
        self.closing = True
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.get_extra_info("sslcontext") is not None or not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self.state = _LINGER
        self.since = self.loop.time()
        self.reading_paused = 1
        self.resume_reading(1)

    def close_if_idle(self) -> bool:
        """Close now if no request is being handled; True if it was idle."""
        if self.task is None and not self.queue:
            self.close()
            return True
        self.draining = True
        return False

    # -- serving
    def _refuse(self, error: GatewayError) -> None:
        """The byte stream can no longer be trusted: answer what came before, then this."""
        self.closing = True
        if self._body is not None:
            self._body.fail(BadRequest(f"malformed request body: {error.message}",
                                       code="framing"))
            self._body = None
        self.queue.append(_ParseFailure(error))
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    async def _serve(self) -> None:
        handler = self.server.handler
        try:
            while self.queue:
                item = self.queue[0]
                if isinstance(item, _ParseFailure):
                    self._answer_failure(item.error)
                    self.linger()
                    return
                try:
                    await handler(item)
                except ConnectionError:
                    self.abort()
                    return
                self.queue.popleft()
                if self.reading_paused & 2 and len(self.queue) < _PIPELINE_PAUSE // 2:
                    self.resume_reading(2)
                body = item.body
                if body is not None and not body.ended:
                    await self.flow.drain()
                    self.linger()
                    return
                if not item.keep_alive or self.closing:
                    await self.flow.drain()
                    self.close()
                    return
            self.state = _HEAD if self._in_head else _IDLE
            self.since = self.loop.time()
        finally:
            self.task = None

    def _answer_failure(self, error: GatewayError) -> None:
        log.info("refused malformed request from %s: %s", self.remote, error.message)
        self.server.on_refusal(error)
        body = error_body(error.status, error.code, error.message)
        try:
            self.write(b"%sContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n"
                       b"Connection: close\r\n\r\n%s" % (
                           status_line(error.status), JSON_TYPE.encode(), len(body),
                           http_date(), body))
        except ConnectionError:
            pass

    def sweep(self, now: float) -> None:
        """Enforce this connection's deadlines (called by the server's sweeper)."""
        lim = self.limits
        if self.state == _LINGER:
            if now - self.since > _LINGER_SECONDS:
                self.abort()
            return
        if self.state == _HEAD:
            if now - self.since > lim.header_timeout:
                if self.task is None and not self.queue:
                    self._refuse(RequestTimeout("the request head did not arrive in time",
                                                code="header_timeout"))
                else:
                    self.abort()
            return
        if self.state == _IDLE:
            if now - self.since > lim.keepalive_timeout:
                self.close()
            return
        body = self._body
        if body is not None and not body.ended:
            elapsed = now - body.started_at
            if elapsed > lim.body_timeout:
                body.fail(RequestTimeout(
                    f"the request body did not arrive within {lim.body_timeout:g} s",
                    code="body_timeout"))
                self.closing = True
            elif elapsed > 2.0 and body.received < lim.min_rate * (elapsed - 1.0):
                body.fail(RequestTimeout(
                    f"the request body arrived slower than {lim.min_rate} bytes/s",
                    code="body_too_slow"))
                self.closing = True
        paused = self.flow.paused_since
        if paused and now - paused > lim.send_timeout:
            log.info("client %s stopped reading its answer; connection cut", self.remote)
            self.abort()


def _expects_continue(headers: Headers, http11: bool) -> bool:
    value = headers.get_raw(b"expect")
    return http11 and value is not None and value.lower() == b"100-continue"


def _parser_message(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed request"
    return text.rstrip(":")


class Server:
    """Protocol factory, connection registry, sweeper and graceful shutdown."""

    def __init__(self, handler: Handler, limits: Limits,
                 on_refusal: Callable[[GatewayError], None] = lambda e: None) -> None:
        self.handler = handler
        self.limits = limits
        self.on_refusal = on_refusal
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.refused_connections = 0
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

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
            if c.state != _BUSY and (victim is None or c.since < victim.since):
                victim = c
        if victim is None:
            return False
        victim.abort()
        self.connections.discard(victim)
        return True

    async def listen(self, host: str, port: int, *, ssl: object = None,
                     sock: object = None, reuse_port: bool = False,
                     backlog: int = 1024) -> tuple[str, int]:
        """Start listening; returns the bound address."""
        if sock is not None:
            srv = await self.loop.create_server(self, sock=sock, ssl=ssl,  # type: ignore
                                                backlog=backlog)
        else:
            srv = await self.loop.create_server(self, host, port, ssl=ssl,  # type: ignore
                                                reuse_port=reuse_port or None,
                                                backlog=backlog)
        self._servers.append(srv)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
        addr = srv.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def _sweep(self) -> None:
        lim = self.limits
        interval = max(0.05, min(1.0, lim.header_timeout / 4, lim.keepalive_timeout / 4,
                                 lim.send_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.sweep(now)

    def busy(self) -> int:
        """Connections with a request in hand."""
        return sum(1 for c in self.connections if c.task is not None)

    async def shutdown(self, grace: float) -> int:
        """Stop accepting, close idle connections, let requests in flight finish for up to
        ``grace`` seconds (their answers say ``Connection: close``), then cut the rest.
        Returns how many connections were cut with a request in hand."""
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = self.loop.time() + grace
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - self.loop.time()))
        cut: list[asyncio.Task[None]] = []
        for conn in list(self.connections):
            if conn.task is not None:
                cut.append(conn.task)
                conn.task.cancel()
            conn.abort()
        if cut:
            await asyncio.wait(cut, timeout=1.0)   # their audit lines are written
        if self._sweeper is not None:
            self._sweeper.cancel()
        for srv in self._servers:
            await srv.wait_closed()
        return len(cut)
