"""One client connection of the gateway's HTTP/1.1 server, on httptools (llhttp).

Long because the parser callbacks, the pipelined-request queue, flow control and the deadline
states are one state machine; split up, its invariants would be spread over several files.

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
import re
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools

from ..errors import BadRequest, GatewayError, HeadersTooLarge, RequestTimeout
from .body import Body
from .flow import FlowControl
from .message import JSON_TYPE, Headers, error_body, http_date, status_line
from .request import Request

if TYPE_CHECKING:
    from .server import Inflight, Server

log = logging.getLogger(__name__)

_PIPELINE_PAUSE = 16  # queued requests before the socket stops being read
_MAX_HEADERS = 100
_AUTH_FIELD_LIMIT = 128 * 1024  # an oversize credential is a bad credential (401), up to this
_MAX_HEAD_BYTES = 32 * 1024  # the whole header block (an oversize Authorization aside)
_PIPELINE_MAX = 64  # queued requests past which a connection is refused
_KEEP_HEAD_BYTES = 4096  # header bytes of the last head a connection keeps for the next
# Bytes the parser may swallow without finishing anything (a header line, a trailer, a chunk
# size line): llhttp hands a field over only once its line ends, and httptools joins the
# pieces with bytes += until then (quadratic copying, on the loop), so the per-field limits in
# on_header come too late for a line that never ends. The longest legitimate line is one
# oversize Authorization.
_MAX_UNFINISHED_BYTES = _AUTH_FIELD_LIMIT + 8 * 1024
# RFC 9110 Host: reg-name or IP literal, optional port (a repeated Host joins with ", ": refused)
_HOST = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")

# Connection states the sweeper looks at.
_HEAD, BUSY, _IDLE, _LINGER = 0, 1, 2, 3
_LINGER_SECONDS = 2.0


class _ParseFailure:
    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


class Connection(asyncio.BufferedProtocol):
    """One client connection: parses requests, queues them, answers them in order.

    Reads go into the server's shared buffer (:meth:`get_buffer`) and are parsed at once
    (:meth:`buffer_updated`); httptools hands over copies of what it parsed, so nothing here
    refers to that buffer once the call returns."""

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
        # the request the callback path (Server.fast) is forwarding, with no task
        self.inflight: Inflight | None = None
        self.closing = False
        # the byte stream went wrong: nothing more is read, the queue is answered up to the
        # refusal, which closes the connection
        self.refused = False
        self.draining = False
        self.state = _HEAD
        self.since = self.loop.time()
        self.reading_paused = 0  # reasons the socket is not read (bit set)
        self.relay_source: asyncio.Transport | None = None  # paused with our writes
        # the request being parsed
        self._url = b""
        self._lines: list[tuple[bytes, bytes]] = []  # header lines of the head being parsed
        self._head_bytes = 0
        self._oversize_auth = False  # this head had its one oversize Authorization already
        self._body: Body | None = None
        self._error: GatewayError | None = None
        self._in_head = False
        self._progressed = False  # a parser callback ran during the current feed
        self._unfinished = 0  # bytes fed since the parser last finished something
        self.client_done = False  # the client half-closed (sent EOF)
        self._host_ok: bytes | None = None  # the last Host value found valid here
        self.last_headers: Headers | None = None  # the last request's, for the next one
        # (credential cache, Authorization value, its cache key) of the last request here
        self.auth_key: tuple[object, bytes, bytes] | None = None
        # (forwarder, user, client, header lines, forwarded block) of the last request here
        self.forwarded: tuple[object, object, str, list[tuple[bytes, bytes]], bytes] | None = None
        # the callback path's plan for a repeat of the last request here (gateway.fastpath)
        self.plan: tuple[Any, ...] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.flow.transport = self.transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.server.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.flow.connection_lost()
        relay = self.relay_source
        if relay is not None and not relay.is_closing():
            relay.resume_reading()  # the relay must see that its client is gone
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

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closing or self.refused:
            return
        self._progressed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade is not proxied: what was asked up to it is answered, then the
            # connection closes (nothing after it is read)
            self.refused = True
            return
        except httptools.HttpParserError as exc:
            self._refuse(self._error or BadRequest(_parser_message(exc), code="framing"))
            return
        if self._progressed:
            self._unfinished = 0
            return
        self._unfinished += len(data)
        if self._unfinished > _MAX_UNFINISHED_BYTES:
            where = "header line" if self._in_head else "trailer or chunk line"
            message = f"a {where} over {_MAX_UNFINISHED_BYTES} bytes"
            self._refuse(
                HeadersTooLarge(message, code="headers_too_large")
                if self._in_head
                else BadRequest(message, code="framing")
            )

    def eof_received(self) -> bool | None:
        self.client_done = True
        if self._body is not None and not self._body.ended:
            self._body.fail(ConnectionResetError("client closed before sending the whole body"))
            return None
        # A client that half-closes after its request(s) still reads the answers: keep our
        # side open until they are written (``_serve`` closes once the queue is empty).
        return True if (self.task is not None or self.queue) else None

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._progressed = True
        self._url = b""
        self._lines = []
        self._head_bytes = 0
        self._oversize_auth = False
        self._in_head = True
        if self.state == _IDLE:
            self.state = _HEAD
            self.since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._progressed = True  # called per piece; the length check below bounds it
        self._url += url
        if len(self._url) > self.limits.max_header_bytes:
            self._error = HeadersTooLarge("request line too long", code="headers_too_large")
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progressed = True
        if not self._in_head:
            return  # a chunked body's trailer: never a header of the request
        size = len(name) + len(value)
        lines = self._lines
        self._head_bytes += size
        if (
            size > self.limits.max_header_bytes
            or self._head_bytes > _MAX_HEAD_BYTES
            or len(lines) >= _MAX_HEADERS
        ):
            self._oversize_header(name, size)
        lines.append((name, value))

    def _oversize_header(self, name: bytes, size: int) -> None:
        """Refuse a head over a limit, except its one oversize ``Authorization`` (a bad
        credential, answered 401, which is not counted in the block's size)."""
        limit = self.limits.max_header_bytes
        if size > limit and (
            size > _AUTH_FIELD_LIMIT or self._oversize_auth or name.lower() != b"authorization"
        ):
            self._error = HeadersTooLarge(
                f"header {name[:64].decode('latin-1')} is over {limit} bytes",
                code="headers_too_large",
            )
            raise self._error
        if len(self._lines) >= _MAX_HEADERS:
            self._error = HeadersTooLarge(
                f"more than {_MAX_HEADERS} header lines", code="headers_too_large"
            )
            raise self._error
        if size > limit:
            self._oversize_auth = True  # one is a bad credential (401); two are an attack
            self._head_bytes -= size
        if self._head_bytes > _MAX_HEAD_BYTES:
            self._error = HeadersTooLarge(
                f"request header block over {_MAX_HEAD_BYTES} bytes", code="headers_too_large"
            )
            raise self._error

    def on_headers_complete(self) -> None:
        self._progressed = True
        p = self.parser
        headers = self.last_headers
        if headers is None or headers.raw != self._lines:
            # A kept-alive client tends to repeat its header lines: the last ones are kept
            # (Headers is never changed once made), when small: an idle connection holds
            # little.
            headers = Headers(self._lines)
            small = self._head_bytes <= _KEEP_HEAD_BYTES and not self._oversize_auth
            self.last_headers = headers if small else None
        req = Request(
            self,
            p.get_method().decode("ascii", "replace"),
            self._url.decode("latin-1"),
            headers,
            p.get_http_version() == "1.1",
            p.should_keep_alive(),
        )
        length = headers.get_raw(b"content-length")
        if length is not None:
            req.content_length = int(length)
            if req.content_length:
                req.body = Body(self, _expects_continue(headers, req.http11), self.loop.time())
        elif headers.get_raw(b"transfer-encoding") is not None:
            req.chunked = True
            req.body = Body(self, _expects_continue(headers, req.http11), self.loop.time())
            if not req.http11:
                req.keep_alive = False  # RFC 9112 6.1: close after a chunked 1.0 request
        if len(self.queue) >= _PIPELINE_MAX:
            self._error = BadRequest(
                f"more than {_PIPELINE_MAX} pipelined requests", code="pipeline_depth"
            )
            raise self._error
        if req.body is not None and headers.get_raw(b"upgrade") is not None:
            # llhttp stops at the head of an upgrade: its body would be lost, not forwarded.
            self._error = BadRequest(
                "a protocol upgrade with a request body is not accepted", code="upgrade_body"
            )
            raise self._error
        if req.http11:
            host = headers.get_raw(b"host")
            if host is None or (
                host != self._host_ok
                and (not _HOST.fullmatch(host) or len(headers.getall_raw(b"host")) != 1)
            ):
                self._error = BadRequest(
                    "an HTTP/1.1 request needs exactly one valid Host header", code="host"
                )
                raise self._error
            self._host_ok = host
        self._body = req.body
        self._in_head = False
        if self.last_headers is not headers:  # not kept: not held until the next head
            self._lines = []
            self._url = b""
        self.state = BUSY
        self.queue.append(req)
        if len(self.queue) >= _PIPELINE_PAUSE:
            self.pause_reading(2)
        if self.task is None and self.inflight is None:
            fast = self.server.fast
            if (
                fast is not None
                and req.body is None
                and len(self.queue) == 1
                and not self.flow.paused_since  # else it waits for the client (_serve)
            ):
                try:
                    self.inflight = fast(req)
                except Exception:  # a bug there must not read as the client's framing error
                    log.exception("callback path failed; the task path takes the request")
            if self.inflight is None:
                self.task = self.loop.create_task(self._serve())

    def on_body(self, data: bytes) -> None:
        self._progressed = True
        body = self._body
        if body is not None:
            body.feed(data)

    def on_message_complete(self) -> None:
        self._progressed = True
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
        if (
            was
            and not self.reading_paused
            and self.transport is not None
            and not self.transport.is_closing()
        ):
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
        """The byte stream can no longer be trusted: answer the requests queued before it,
        then this; past the pipelining limit (an abuse, not a mistake) only the request in
        hand is answered before the connection closes."""
        self.refused = True
        if error.code == "pipeline_depth":
            self.closing = True
        if self._body is not None:
            self._body.fail(BadRequest(f"malformed request body: {error.message}", code="framing"))
            self._body = None
        self.queue.append(_ParseFailure(error))
        if self.task is None and self.inflight is None:
            self.task = self.loop.create_task(self._serve())

    def fast_done(self) -> None:
        """The callback path answered the first request in the queue (and recorded it)."""
        self.inflight = None
        item = self.queue.popleft()
        self._dequeued()
        if not self._keeps(item):  # type: ignore[arg-type]
            self.close()  # what is written still goes out first
        elif self.queue:
            self.task = self.loop.create_task(self._serve())
        else:
            self._wait_for_next()

    def slow_path(self) -> None:
        """The callback path gave the first request in the queue to the task path."""
        self.inflight = None
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    def _dequeued(self) -> None:
        if self.reading_paused & 2 and len(self.queue) < _PIPELINE_PAUSE // 2:
            self.resume_reading(2)

    def _keeps(self, item: Request) -> bool:
        """Whether the connection stays open after the answer to ``item``."""
        return (
            item.keep_alive
            and not self.closing
            and not ((self.client_done or self.refused) and not self.queue)
        )

    def _wait_for_next(self) -> None:
        self.state = _HEAD if self._in_head else _IDLE
        self.since = self.loop.time()

    async def _serve(self) -> None:
        handler = self.server.handler
        try:
            while self.queue:
                if self.flow.paused_since:
                    # The client is not reading what it was sent: the next answer waits
                    # (else a client that never reads fills memory, one answer at a time).
                    try:
                        await self.flow.drain()
                    except ConnectionError:
                        self.abort()
                        return
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
                self._dequeued()
                body = item.body
                if body is not None and not body.complete:
                    if not body.ended:
                        await self._drained()
                        self.linger()
                        return
                    # Received whole but answered unread (401, 403, 413, a decision): drop
                    # it, which also lifts the pause a large one put on reading, so the
                    # next request on this connection is read.
                    body.take_buffered()
                if not self._keeps(item):
                    await self._drained()
                    self.close()
                    return
            self._wait_for_next()
        finally:
            self.task = None

    async def _drained(self) -> None:
        try:
            await self.flow.drain()
        except ConnectionError:
            pass  # gone already: closing is all that is left

    def _answer_failure(self, error: GatewayError) -> None:
        log.info("refused malformed request from %s: %s", self.remote, error.message)
        self.server.on_refusal(error)
        body = error_body(error.status, error.code, error.message)
        try:
            self.write(
                b"%sContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n"
                b"Connection: close\r\n\r\n%s"
                % (status_line(error.status), JSON_TYPE.encode(), len(body), http_date(), body)
            )
        except ConnectionError:
            pass

    def sweep(self, now: float) -> None:
        """Enforce this connection's deadlines (called by the server's sweeper)."""
        lim = self.limits
        if self.state == _LINGER:
            if now - self.since > _LINGER_SECONDS:
                self.abort()
            return
        paused = self.flow.paused_since
        if paused and now - paused > lim.send_timeout:
            # in any state: answers may be waiting in its buffer between requests too
            log.info("client %s stopped reading its answers; connection cut", self.remote)
            self.abort()
            return
        if self.state == _HEAD:
            if now - self.since > lim.header_timeout:
                if self.task is None and not self.queue:
                    self._refuse(
                        RequestTimeout(
                            "the request head did not arrive in time", code="header_timeout"
                        )
                    )
                else:
                    self.abort()
            return
        if self.state == _IDLE:
            if now - self.since > lim.keepalive_timeout:
                self.close()
            return
        body = self._body
        if body is not None and not body.ended and body.invited and not body.held_back:
            elapsed = now - body.started_at
            if elapsed > lim.body_timeout:
                body.fail(
                    RequestTimeout(
                        f"the request body did not arrive within {lim.body_timeout:g} s",
                        code="body_timeout",
                    )
                )
                self.closing = True
            elif elapsed > 2.0 and body.received < lim.min_rate * (elapsed - 1.0):
                body.fail(
                    RequestTimeout(
                        f"the request body arrived slower than {lim.min_rate} bytes/s",
                        code="body_too_slow",
                    )
                )
                self.closing = True


def _expects_continue(headers: Headers, http11: bool) -> bool:
    value = headers.get_raw(b"expect")
    return http11 and value is not None and value.lower() == b"100-continue"


def _parser_message(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed request"
    return text.rstrip(":")
