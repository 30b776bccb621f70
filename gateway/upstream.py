"""The fast forwarding path: a connection pool of our own on asyncio protocols.

``aiohttp.ClientSession`` builds a request object, a URL, timers, trace hooks and a response
object for every call; in front of a fast upstream that was most of the gateway's CPU. Here a
request head is assembled once as bytes from the client's raw headers (filtered exactly as
``proxy.request_headers`` describes) and written to a pooled keep-alive connection whose
responses are parsed by aiohttp's C HTTP parser (``aiohttp.client_proto.ResponseHandler``).
Bodies stream both ways with flow control. A pooled connection the upstream closed while idle
is retried once on a fresh one when the request had no streamed body (nothing was consumed).

Uses ``ResponseHandler`` and its ``_drain_helper``: aiohttp internals, pinned with aiohttp in
constraints.txt and covered by the forwarding tests, which run against this forwarder.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque

from aiohttp.client_exceptions import ClientError, ServerDisconnectedError, ServerTimeoutError
from aiohttp.client_proto import ResponseHandler

from .errors import BadGateway, GatewayTimeout, PayloadTooLarge
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


class _Pool:
    """Keep-alive connections to one upstream; LIFO so hot connections stay hot."""

    def __init__(self, upstream: Upstream) -> None:
        url = upstream.url
        self.host, self.port = url.host or "127.0.0.1", url.explicit_port or url.port or 80
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_timeout = upstream.connect_timeout
        self._idle: deque[tuple[ResponseHandler, float]] = deque()
        self._slots = asyncio.Semaphore(upstream.pool_size)

    async def acquire(self) -> tuple[ResponseHandler, bool]:
        """A connection and whether it was reused from the pool."""
        await self._slots.acquire()
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()
            if proto.is_connected() and now - since < _IDLE_SECONDS:
                return proto, True
            proto.close()
        try:
            return await self.connect(), False
        except BaseException:
            self._slots.release()
            raise

    async def connect(self) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: ResponseHandler(loop), self.host, self.port,
                                   ssl=self.ssl),
            self.connect_timeout)
        return proto

    def release(self, proto: ResponseHandler, reuse: bool) -> None:
        if reuse and proto.is_connected() and not proto.should_close:
            self._idle.append((proto, time.monotonic()))
        else:
            proto.close()
        self._slots.release()

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

    async def start(self) -> None:
        self._pool = _Pool(self.upstream)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def request_head(self, request: Exchange, target: Target, user: User | None,
                     client: str, length: int | None, chunked: bool) -> bytes:
        """The request line and header block sent upstream, as bytes."""
        named: frozenset[bytes] = frozenset()
        conn = request.headers.get("Connection")
        if conn:
            named = frozenset(t.strip().lower().encode() for t in conn.split(",") if t.strip())
        out = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (request.method.encode(),
                                                     target.path_qs.encode(), self._host)]
        for name, value in request.raw_headers:
            low = name.lower()
            if low in _STRIP or low in named or low.startswith(_IDENTITY):
                continue
            out.append(b"%s: %s\r\n" % (name, value))
        if user is not None:
            out.append(b"X-Authenticated-User: %s\r\nX-Authenticated-Roles: %s\r\n" % (
                user.name.encode(), user.roles_header.encode()))
        out.append(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
            client.encode("latin-1", "replace"), request.scheme.encode()))
        host = request.headers.get("Host")
        if host:
            out.append(b"X-Forwarded-Host: %s\r\n" % host.encode("latin-1", "replace"))
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
        try:
            complete = await self._relay(request, message, payload)
        except BaseException:
            self._pool.release(proto, False)
            raise
        self._pool.release(proto, complete and not message.should_close and payload.is_eof())
        return message.code  # type: ignore[attr-defined,no-any-return]

    async def _connect(self) -> tuple[ResponseHandler, bool]:
        assert self._pool is not None
        try:
            return await self._pool.acquire()
        except asyncio.TimeoutError:
            raise GatewayTimeout("the upstream did not accept a connection in time") from None
        except OSError as exc:
            log.warning("upstream %s:%s unreachable: %s", self._pool.host, self._pool.port,
                        exc.__class__.__name__)
            raise BadGateway("the upstream could not be reached") from None

    async def _exchange(self, proto: ResponseHandler, request: Exchange, head: bytes,
                        body: bytes | None, streamed: bool, chunked: bool,
                        skip_payload: bool) -> tuple[object, object]:
        transport = proto.transport
        if transport is None:
            raise _Stale
        if getattr(proto, "gw_skip", None) is not skip_payload:
            # The C parser carries on from one response to the next on a keep-alive
            # connection; a new one is needed only when HEAD-ness changes.
            proto.set_response_params(skip_payload=skip_payload, read_until_eof=False,
                                      auto_decompress=False, read_timeout=self.read_timeout,
                                      read_bufsize=CHUNK)
            proto.gw_skip = skip_payload  # type: ignore[attr-defined]
        try:
            transport.write(head + body if body else head)
            if streamed:
                await self._send_body(proto, request, chunked)
            proto.start_timeout()
            while True:
                message, payload = await proto.read()
                if not (100 <= message.code < 200) or message.code == 101:
                    return message, payload
        except ServerTimeoutError:
            raise GatewayTimeout("the upstream did not answer in time") from None
        except ServerDisconnectedError:
            raise _Stale from None
        except (ClientError, OSError) as exc:
            if isinstance(exc, ConnectionResetError):
                raise _Stale from None
            raise BadGateway("the upstream broke the exchange") from None

    async def _send_body(self, proto: ResponseHandler, request: Exchange,
                         chunked: bool) -> None:
        transport = proto.transport
        sent = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            sent += len(chunk)
            if sent > self.max_body:
                raise PayloadTooLarge(f"request body over {self.max_body} bytes")
            if transport is None or transport.is_closing():
                raise BadGateway("the upstream closed the connection during the upload")
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if transport.get_write_buffer_size() > _HIGH_WATER:
                await proto._drain_helper()
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def _relay(self, ex: Exchange, message: object, payload: object) -> bool:
        """Stream the upstream's answer to the client; False if it broke off."""
        msg = message  # aiohttp RawResponseMessage
        conn = msg.headers.get("Connection")  # type: ignore[attr-defined]
        named = frozenset(t.strip().lower().encode() for t in conn.split(",")) if conn \
            else frozenset()
        headers = [(k, v) for k, v in msg.raw_headers  # type: ignore[attr-defined]
                   if k.lower() not in _HOP_B and k.lower() not in named]
        status, reason = msg.code, msg.reason  # type: ignore[attr-defined]
        read = payload.readany  # type: ignore[attr-defined]
        try:
            first = await read()
        except (asyncio.TimeoutError, ServerTimeoutError):
            raise GatewayTimeout("the upstream did not answer in time") from None
        except (ClientError, OSError):
            raise BadGateway("the upstream broke the response") from None
        try:
            if payload.is_eof() and len(first) <= _SMALL:  # type: ignore[attr-defined]
                await ex.relay(status, reason, headers, first)   # the whole answer: one write
                return True
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
                    return False
            await ex.finish()
        except ConnectionError:      # the client went away; nothing more to tell it
            ex.abort()
            return False
        return True


class _Stale(Exception):
    """The connection died before a response arrived."""


