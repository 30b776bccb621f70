"""A lean HTTP/1.1 server for the gateway's pipeline (the default; ``--server aiohttp`` is the
alternative).

aiohttp's web server builds a full ``web.Request``, a match-info, a middleware chain and a
``StreamResponse`` per request; in front of a fast upstream that was about half of the
gateway's CPU. This server keeps aiohttp's C parser (llhttp: the same smuggling and framing
checks) and its flow-controlled ``StreamReader`` bodies, and writes answers as bytes:

* one task per connection serves its requests in order (pipelining is answered in order);
* an answer to a request whose body was not read completely closes the connection;
* parser-level refusals get the same JSON errors as :mod:`gateway.protocol` (400, 431);
* idle keep-alive connections are closed after ``keepalive_timeout`` seconds;
* shutdown stops accepting, lets requests in flight finish (up to a timeout), then closes.

It plugs into aiohttp's runner and sites (:class:`FastRunner`), so the app's lifecycle
(cleanup contexts, signals) is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError

from .exchange import JSON_TYPE, RawHeaders, json_body

log = logging.getLogger(__name__)

Handler = Callable[["FastExchange"], Awaitable[int]]
_QUEUE_PAUSE = 32
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})
_SKIP_OWN = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_date_cache: list[Any] = [0, b""]


def _date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                       time.gmtime(now)).encode()
    return _date_cache[1]  # type: ignore[no-any-return]


def _header_lines(headers: Mapping[str, str], skip: frozenset[str]) -> list[bytes]:
    return [b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("utf-8", "surrogateescape"))
            for k, v in headers.items() if k.lower() not in skip]


class FastExchange:
    """:class:`~gateway.exchange.Exchange` writing straight to the client transport."""

    __slots__ = ("_proto", "method", "raw_path", "headers", "raw_headers", "remote", "scheme",
                 "content", "content_length", "body_exists", "started", "keep_alive",
                 "_http11", "_chunked", "_bodyless")

    def __init__(self, proto: FastProtocol, msg: Any, payload: StreamReader) -> None:
        self._proto = proto
        self.method: str = msg.method
        self.raw_path: str = msg.path
        self.headers = msg.headers
        self.raw_headers = msg.raw_headers
        self.remote = proto.remote
        self.scheme = proto.scheme
        self.content = payload
        length = msg.headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        self.body_exists = payload is not EMPTY_PAYLOAD
        self.started = False
        self.keep_alive = not msg.should_close
        self._http11 = msg.version >= (1, 1)
        self._chunked = False
        self._bodyless = msg.method == "HEAD"
        expect = msg.headers.get("Expect")
        if self._http11 and expect is not None and expect.lower() == "100-continue":
            proto.write(b"HTTP/1.1 100 Continue\r\n\r\n")   # as aiohttp's server does

    def _status_line(self, status: int, reason: bytes | None = None) -> bytes:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))

    def _connection_line(self) -> bytes:
        return b"" if self.keep_alive else b"Connection: close\r\n"

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        lines = [self._status_line(status)]
        lines += _header_lines(headers, _SKIP_OWN)
        if "Date" not in headers:
            lines.append(b"Date: %s\r\n" % _date())
        if status not in _NO_BODY:
            if self._bodyless and "Content-Length" in headers:
                lines.append(b"Content-Length: %s\r\n" % headers["Content-Length"].encode())
            else:
                lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(self._connection_line())
        lines.append(b"\r\n")
        if body and not self._bodyless and status not in _NO_BODY:
            lines.append(body)
        self.started = True
        self._proto.write(b"".join(lines))
        await self._proto.drain()

    async def relay(self, status: int, reason: str, headers: RawHeaders,
                    body: bytes | None) -> None:
        lines = [self._status_line(status, reason.encode("latin-1", "replace") or None)]
        has_length = False
        for name, value in headers:
            if name.lower() == b"content-length":
                has_length = True
            lines.append(b"%s: %s\r\n" % (name, value))
        no_body = self._bodyless or status in _NO_BODY or status < 200
        if body is not None:
            if not has_length and not no_body:
                lines.append(b"Content-Length: %d\r\n" % len(body))
        elif not no_body and not has_length:
            if self._http11:
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False          # HTTP/1.0: the body ends with the connection
        if no_body:
            self._bodyless = True
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if body and not no_body:
            lines.append(body)
        self.started = True
        self._proto.write(b"".join(lines))
        if body is not None:
            await self._proto.drain()

    async def write(self, data: bytes) -> None:
        if self._bodyless or not data:
            return
        if self._chunked:
            self._proto.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._proto.write(data)
        await self._proto.drain()

    async def finish(self) -> None:
        if self._chunked:
            self._proto.write(b"0\r\n\r\n")
        await self._proto.drain()

    def abort(self) -> None:
        self.keep_alive = False
        self._proto.abort()


class _ParseFailure:
    __slots__ = ("exc",)

    def __init__(self, exc: HttpProcessingError) -> None:
        self.exc = exc


class FastProtocol(BaseProtocol):
    """One client connection."""

    def __init__(self, server: FastServer) -> None:
        loop = server.loop
        super().__init__(loop)
        self._server = server
        self._parser: Any = None
        self._queue: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False
        self._current: StreamReader | None = None   # body of the request being handled
        self._queue_paused = False
        self.idle_since = 0.0      # loop time since when it waits for a request; 0 if not
        self.remote: str | None = None
        self.scheme = "http"

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        s = self._server
        self._parser = HttpRequestParser(
            self, s.loop, 2 ** 16, max_line_size=s.max_line_size,
            max_field_size=s.max_field_size, max_headers=s.max_headers,
            payload_exception=RequestPayloadError, auto_decompress=False)
        s.connections.add(self)
        self._task = s.loop.create_task(self._serve())

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        self._closing = True
        self.idle_since = 0.0
        gone = ConnectionResetError("client disconnected")
        self._fail_current(gone)
        for item in self._queue:
            if not isinstance(item, _ParseFailure):
                item[1].set_exception(gone)
        self._wake()

    def _fail_current(self, exc: BaseException) -> None:
        """The body being read will never complete: wake whoever waits on it."""
        body = self._current
        if body is not None and not body.is_eof():
            body.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            messages, upgraded, _tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._queue.append(_ParseFailure(exc))
            self._closing = True     # nothing after a framing error can be trusted
            self._fail_current(RequestPayloadError(f"malformed request body: {exc.message}"))
            self._wake()
            return
        if messages:
            self._queue.extend(messages)
            if len(self._queue) >= _QUEUE_PAUSE and not self._queue_paused:
                # Stop reading the socket (not the parser: it may be mid-body) until the
                # queue of pipelined requests drains.
                self._queue_paused = True
                if self.transport is not None:
                    self.transport.pause_reading()
            self._wake()
        if upgraded:
            # Upgrade/CONNECT are not proxied: answer what was asked, then close.
            self._closing = True

    def eof_received(self) -> None:
        try:
            self._parser.feed_eof()
        except HttpProcessingError:
            self._fail_current(ConnectionResetError("client closed before sending the body"))

    # -- serving
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        transport.write(data)

    async def drain(self) -> None:
        if self._paused:
            # A client that stops reading must not hold the request (and its upstream
            # connection) for ever.
            try:
                await asyncio.wait_for(self._drain_helper(), self._server.send_timeout)
            except asyncio.TimeoutError:
                self.abort()
                raise ConnectionResetError("client stopped reading") from None

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close_when_idle(self) -> None:
        self._closing = True
        if not self._busy:
            if self.transport is not None:
                self.transport.close()
            self._wake()

    async def _serve(self) -> None:
        loop = self._server.loop
        handler = self._server.handler
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        break
                    self._waiter = loop.create_future()
                    self.idle_since = loop.time()    # the server's sweeper closes it if idle
                    await self._waiter
                    self._waiter = None
                    self.idle_since = 0.0
                    continue
                item = self._queue.popleft()
                if self._queue_paused and len(self._queue) < _QUEUE_PAUSE // 2:
                    self._queue_paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                if isinstance(item, _ParseFailure):
                    self._answer_parse_failure(item.exc)
                    break
                msg, payload = item
                self._busy = True
                self._current = payload
                self._server.requests_count += 1
                ex: FastExchange | None = None
                try:
                    ex = FastExchange(self, msg, payload)
                    await handler(ex)
                except ConnectionError:
                    break
                except Exception:
                    log.exception("error handling %s %s", msg.method, msg.path[:200])
                    if ex is not None and not ex.started:
                        try:
                            await ex.respond(500, {"Content-Type": JSON_TYPE}, json_body(
                                {"error": "internal error", "status": 500,
                                 "code": "internal"}))
                        except ConnectionError:
                            pass
                    break
                finally:
                    self._busy = False
                    self._current = None
                if ex is None or not ex.keep_alive or not payload.is_eof():
                    break
        finally:
            self.idle_since = 0.0
            if self.transport is not None:
                self.transport.close()

    def _answer_parse_failure(self, exc: HttpProcessingError) -> None:
        if isinstance(exc, LineTooLong) or "Too many headers" in str(exc):
            status, code, text = 431, "headers_too_large", "request header block too large"
        else:
            status, code = 400, "bad_request"
            text = ((exc.message if isinstance(exc, BadHttpMessage) else str(exc))
                    or "bad request").strip().splitlines()[0].rstrip(":")
        log.info("refused malformed request from %s: %s", self.remote, text)
        body = json_body({"error": text, "status": status, "code": code})
        try:
            self.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                       b"Date: %s\r\nConnection: close\r\n\r\n%s" % (
                           status, _REASONS[status], JSON_TYPE.encode(), len(body), _date(),
                           body))
        except ConnectionError:
            pass


class FastServer:
    """Protocol factory with the shutdown interface aiohttp's runner expects."""

    def __init__(self, handler: Handler, *, loop: asyncio.AbstractEventLoop,
                 max_line_size: int = 8190, max_field_size: int = 8190, max_headers: int = 100,
                 keepalive_timeout: float = 75.0, send_timeout: float = 30.0) -> None:
        self.handler = handler
        self.loop = loop
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        self.keepalive_timeout = keepalive_timeout
        self.send_timeout = send_timeout
        self.connections: set[FastProtocol] = set()
        self.requests_count = 0
        # One sweeper instead of a timer per request: closes keep-alive connections that
        # waited longer than keepalive_timeout for their next request.
        self._sweeper = loop.create_task(self._sweep())

    def __call__(self) -> FastProtocol:
        return FastProtocol(self)

    async def _sweep(self) -> None:
        interval = max(0.05, min(5.0, self.keepalive_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            limit = self.loop.time() - self.keepalive_timeout
            for conn in list(self.connections):
                if conn.idle_since and conn.idle_since < limit:
                    conn.close_when_idle()

    def pre_shutdown(self) -> None:
        self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close_when_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        tasks = [c._task for c in self.connections if c._task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for conn in list(self.connections):
                conn.abort()
        self.connections.clear()


class FastRunner(web.AppRunner):
    """AppRunner serving the gateway app's pipeline with :class:`FastServer`."""

    async def _make_server(self) -> Any:
        from .app import MAX_PARSED_FIELD, PIPELINE, SETTINGS
        app = self.app
        loop = asyncio.get_running_loop()
        app._set_loop(loop)          # what AppRunner._make_server does before startup
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        settings = app[SETTINGS]
        return FastServer(app[PIPELINE].handle, loop=loop,
                          max_line_size=settings.max_header_bytes,
                          max_field_size=MAX_PARSED_FIELD, max_headers=100,
                          keepalive_timeout=self._kwargs.get("keepalive_timeout", 75.0),
                          send_timeout=settings.upstream_timeout)
