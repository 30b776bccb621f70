"""The fast forwarding path: a connection pool of our own on asyncio protocols.

``aiohttp.ClientSession`` builds a request object, a URL, timers, trace hooks and a response
object for every call; in front of a fast upstream that was most of the gateway's CPU. Here a
request head is assembled once as bytes from the client's raw headers (filtered exactly as
``gateway.proxy`` describes) and written to a pooled keep-alive connection whose
responses are parsed by aiohttp's C HTTP parser (``aiohttp.http_parser.HttpResponseParser``).
Bodies stream both ways with flow control. A pooled connection the upstream closed while idle
is retried once on a fresh one when the request had no streamed body (nothing was consumed).

Uses ``BaseProtocol`` and its ``_drain_helper``: aiohttp internals, pinned with aiohttp in
constraints.txt and covered by the forwarding tests, which run against this forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections import deque
from typing import Any, Callable

from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_exceptions import ClientError, ClientPayloadError, ServerTimeoutError
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser
from aiohttp.web_protocol import RequestPayloadError

from .errors import (BadGateway, BadRequest, GatewayTimeout, Overloaded, PayloadTooLarge,
                     RequestTimeout)
from .exchange import Exchange
from .guard import Target
from .policy import User
from .proxy import CHUNK, HOP_BY_HOP, IDENTITY_PREFIX, STRIP_REQUEST, Upstream

log = logging.getLogger(__name__)

_STRIP = frozenset(h.encode() for h in STRIP_REQUEST)
_IDENTITY = IDENTITY_PREFIX.encode()
_SMALL = 64 * 1024
_HOP_B = frozenset(h.encode() for h in HOP_BY_HOP)
_IDLE_SECONDS = 30.0
_HIGH_WATER = 256 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


class _Conn(BaseProtocol):
    """One keep-alive connection to the upstream, parsed by aiohttp's C response parser.

    No timer per read: the pool's sweeper times out requests that made no progress for
    ``read_timeout`` seconds (``active`` is when data last moved; 0 while idle)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._parser: Any = None
        self._skip: bool | None = None
        self._head: asyncio.Future[None] | None = None
        self.message: Any = None
        self.payload: Any = None
        self.active = 0.0
        self.broken = False

    def prepare(self, skip_payload: bool) -> None:
        """Get ready for the answer to the next request."""
        if self._skip is not skip_payload:
            # The parser carries on from one response to the next; a new one is needed
            # only when HEAD-ness (a response without a body) changes.
            self._parser = HttpResponseParser(
                self, self._loop, CHUNK, payload_exception=ClientPayloadError,
                response_with_body=not skip_payload, read_until_eof=True,
                auto_decompress=False)
            self._skip = skip_payload
        self.message = self.payload = None
        self._head = self._loop.create_future()
        self.active = self._loop.time()

    async def read_head(self) -> tuple[Any, Any]:
        assert self._head is not None
        await self._head
        return self.message, self.payload

    def data_received(self, data: bytes) -> None:
        if self.active:
            self.active = self._loop.time()
        elif data:
            # Nothing was asked: an upstream that talks out of turn cannot be trusted to
            # stay in step with our requests.
            self.broken = True
            if self.transport is not None:
                self.transport.close()
            return
        try:
            messages, _, _ = self._parser.feed_data(data)
        except HttpProcessingError:
            self._fail(_Malformed())
            if self.transport is not None:
                self.transport.abort()
            return
        for msg, payload in messages:
            if 100 <= msg.code < 200 and msg.code != 101:
                continue                          # interim answers are not relayed
            if self.message is not None:
                self.broken = True                # a second answer to one request
                continue
            self.message, self.payload = msg, payload
            head = self._head
            if head is not None and not head.done():
                head.set_result(None)

    def eof_received(self) -> bool:
        try:
            self._parser.feed_eof()               # ends a body delimited by the close
        except HttpProcessingError:
            pass
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.broken = True
        self._fail(_Stale())

    def timed_out(self) -> None:
        self._fail(ServerTimeoutError("the upstream sent nothing in time"))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
            head.exception()                      # marked retrieved: waiters re-raise it
        elif self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(ClientPayloadError(str(exc) or type(exc).__name__))

    def reusable(self) -> bool:
        t = self.transport
        return (not self.broken and t is not None and not t.is_closing()
                and self.message is not None and not self.message.should_close
                and self.payload is not None and self.payload.is_eof())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Keep-alive connections to one upstream; LIFO so hot connections stay hot."""

    def __init__(self, upstream: Upstream) -> None:
        url = upstream.url
        self.host, self.port = url.host or "127.0.0.1", url.explicit_port or url.port or 80
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_timeout = upstream.connect_timeout
        self._idle: deque[tuple[_Conn, float]] = deque()
        self._free = upstream.pool_size          # connection slots not in use
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.busy: set[_Conn] = set()
        self.read_timeout = upstream.read_timeout

    async def _take_slot(self) -> None:
        # asyncio.Semaphore scans its waiters on every acquire; the common case here is a
        # free slot, taken without suspending.
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
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
                raise Overloaded("every upstream connection is busy; retry shortly") from None
            raise

    def _give_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)              # the slot passes straight to a waiter
                return
        self._free += 1

    async def acquire(self) -> tuple[_Conn, bool]:
        """A connection and whether it was reused from the pool."""
        await self._take_slot()
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if not conn.broken and now - since < _IDLE_SECONDS:
                self.busy.add(conn)
                return conn, True
            conn.close()
        try:
            conn = await self.connect()
        except BaseException:
            self._give_slot()
            raise
        self.busy.add(conn)
        return conn, False

    async def connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Conn(loop), self.host, self.port, ssl=self.ssl),
            self.connect_timeout)
        return conn

    def release(self, conn: _Conn, reuse: bool) -> None:
        self.busy.discard(conn)
        conn.active = 0.0
        if reuse and conn.reusable():
            self._idle.append((conn, time.monotonic()))
        else:
            conn.close()
        self._give_slot()

    async def sweep(self) -> None:
        """Time out requests whose upstream made no progress for ``read_timeout``."""
        loop = asyncio.get_running_loop()
        interval = max(0.05, min(1.0, self.read_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            deadline = loop.time() - self.read_timeout
            for conn in list(self.busy):
                # a paused transport waits for our client, not for the upstream
                if conn.active and conn.active < deadline and not conn._reading_paused:
                    conn.timed_out()

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[0].close()


class PoolForwarder:
    """:class:`~gateway.proxy.Forwarder` on :class:`_Pool` and aiohttp's C response parser."""

    def __init__(self, upstream: Upstream, max_body: int) -> None:
        self.upstream = upstream
        self.max_body = max_body
        self.read_timeout = upstream.read_timeout
        self._host = upstream.url.raw_authority.encode()
        self._pool: _Pool | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pool = _Pool(self.upstream)
        self._sweeper = asyncio.create_task(self._pool.sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._pool is not None:
            self._pool.close()

    def request_head(self, request: Exchange, target: Target, user: User | None,
                     client: str, length: int | None, chunked: bool) -> bytes:
        """The request line and header block sent upstream, as bytes."""
        named = _connection_tokens(request.headers)
        out = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (request.method.encode(),
                                                     target.path_qs.encode(), self._host)]
        for name, value in request.raw_headers:
            low = name.lower()
            if low in _STRIP or low in named or low.startswith(_IDENTITY) or b"_" in low:
                # Underscored names are dropped (as nginx does): CGI-style upstreams read
                # X-Authenticated_User as X-Authenticated-User.
                continue
            out.append(b"%s: %s\r\n" % (name, value))
        if user is not None:
            out.append(b"X-Authenticated-User: %s\r\nX-Authenticated-Roles: %s\r\n" % (
                user.name.encode(), user.roles_header.encode()))
        out.append(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
            client.encode("latin-1", "replace"), request.scheme.encode()))
        host = request.headers.get("Host")
        if host and _HOST.fullmatch(host):
            out.append(b"X-Forwarded-Host: %s\r\n" % host.encode())
        if length is not None:
            out.append(b"Content-Length: %d\r\n" % length)
        elif chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    async def forward(self, request: Exchange, target: Target, user: User | None,
                      client: str, body: bytes | None) -> int:
        assert self._pool is not None, "forwarder not started"
        length: int | None = None
        chunked = False
        if body is not None:
            length = len(body)
        elif request.body_exists:
            length = request.content_length
            if length is not None and length > self.max_body:
                raise PayloadTooLarge(f"request body over {self.max_body} bytes")
            chunked = length is None
        head = self.request_head(request, target, user, client, length, chunked)
        streamed = body is None and request.body_exists
        skip_payload = request.method == "HEAD"
        for attempt in (0, 1):
            proto, reused = await self._connect()
            try:
                message, payload = await self._exchange(proto, request, head, body, streamed,
                                                        chunked, skip_payload)
            except _Stale:
                self._pool.release(proto, False)
                if attempt == 0 and reused and not streamed and request.method in _IDEMPOTENT:
                    continue      # the upstream closed an idle connection: nothing was lost
                raise BadGateway("the upstream closed the connection") from None
            except BaseException:
                self._pool.release(proto, False)
                raise
            break
        released = False
        pool = self._pool

        def release(reuse: bool) -> None:
            nonlocal released
            if not released:
                released = True
                pool.release(proto, reuse)

        try:
            await self._relay(request, message, payload, release)
        finally:
            release(False)
        return int(message.code)

    async def _connect(self) -> tuple[_Conn, bool]:
        assert self._pool is not None
        try:
            return await self._pool.acquire()
        except asyncio.TimeoutError:
            raise GatewayTimeout("the upstream did not accept a connection in time") from None
        except OSError as exc:
            log.warning("upstream %s:%s unreachable: %s", self._pool.host, self._pool.port,
                        exc.__class__.__name__)
            raise BadGateway("the upstream could not be reached") from None

    async def _exchange(self, proto: _Conn, request: Exchange, head: bytes,
                        body: bytes | None, streamed: bool, chunked: bool,
                        skip_payload: bool) -> tuple[Any, Any]:
        transport = proto.transport
        if transport is None or proto.broken:
            raise _Stale
        proto.prepare(skip_payload)
        try:
            transport.write(head + body if body else head)
            if streamed:
                await self._send_body(proto, request, chunked)
                proto.active = self._loop_time()
            return await proto.read_head()
        except _ClientGone:
            raise
        except ServerTimeoutError:
            raise GatewayTimeout("the upstream did not answer in time") from None
        except _Malformed:
            raise BadGateway("the upstream sent a malformed response") from None
        except ConnectionResetError:
            raise _Stale from None
        except (ClientError, OSError):
            raise BadGateway("the upstream broke the exchange") from None

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def _send_body(self, proto: _Conn, request: Exchange,
                         chunked: bool) -> None:
        transport = proto.transport
        sent = 0
        read = request.content.readany
        while True:
            try:
                chunk = await asyncio.wait_for(read(), self.read_timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout("the request body stopped arriving") from None
            except RequestPayloadError as exc:
                raise BadRequest(f"malformed request body: {exc}") from None
            except ConnectionResetError:
                raise _ClientGone("the client went away during the upload") from None
            if not chunk:
                break
            sent += len(chunk)
            if sent > self.max_body:
                raise PayloadTooLarge(f"request body over {self.max_body} bytes")
            if transport is None or transport.is_closing():
                raise BadGateway("the upstream closed the connection during the upload")
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            proto.active = self._loop_time()      # an upload in progress is not a stall
            if transport.get_write_buffer_size() > _HIGH_WATER:
                await proto._drain_helper()
        if chunked and transport is not None:
            transport.write(b"0\r\n\r\n")

    async def _relay(self, ex: Exchange, message: Any, payload: Any,
                     release: Callable[[bool], None]) -> None:
        """Stream the upstream's answer to the client. The upstream connection is released
        as soon as its answer is read in full, before the last write to a slow client."""
        msg = message  # aiohttp RawResponseMessage
        if msg.code == 101:
            raise BadGateway("the upstream switched protocols, which is not proxied")
        named = _connection_tokens(msg.headers)
        headers = [(k, v) for k, v in msg.raw_headers
                   if k.lower() not in _HOP_B and k.lower() not in named]
        status, reason = msg.code, msg.reason
        read = payload.readany
        try:
            first = await read()
        except (asyncio.TimeoutError, ServerTimeoutError):
            raise GatewayTimeout("the upstream did not answer in time") from None
        except (ClientError, OSError):
            raise BadGateway("the upstream broke the response") from None
        try:
            if payload.is_eof() and len(first) <= _SMALL:
                release(True)
                await ex.relay(status, reason, headers, first)   # the whole answer: one write
                return
            await ex.relay(status, reason, headers, None)
            chunk = first
            while chunk:
                await ex.write(chunk)
                try:
                    chunk = await read()
                except (asyncio.TimeoutError, ClientError, OSError) as exc:
                    # The status line is gone already: cut the connection so the client
                    # sees a truncated answer rather than a complete-looking one.
                    log.warning("upstream response broke off mid-stream: %s",
                                exc.__class__.__name__)
                    ex.abort()
                    return
            release(True)
            await ex.finish()
        except ConnectionError:      # the client went away; nothing more to tell it
            ex.abort()


def _connection_tokens(headers: Any) -> frozenset[bytes]:
    """Lower-cased header names listed in every ``Connection`` header (all of them)."""
    values = headers.getall("Connection", ())
    return frozenset(t.strip().lower().encode("latin-1", "replace")
                     for v in values for t in v.split(",") if t.strip())


class _Stale(Exception):
    """The connection died before a response arrived."""


class _Malformed(Exception):
    """The upstream's answer could not be parsed."""


class _ClientGone(ConnectionError):
    """The client disconnected while its request body was being forwarded."""


