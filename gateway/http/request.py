"""One request and its answer on a client connection: what the pipeline reads (method,
target, headers, body) and how it answers (a complete answer, or a relayed one in pieces)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .body import Body
from .message import NO_BODY_STATUS, Headers, http_date, status_line

if TYPE_CHECKING:
    from .connection import Connection


class Request:
    """One request and its answer. The pipeline answers with :meth:`respond`, or a forwarder
    writes a relayed answer through :meth:`send` (head first, then body pieces)."""

    __slots__ = (
        "conn",
        "method",
        "target",
        "headers",
        "http11",
        "keep_alive",
        "body",
        "content_length",
        "chunked",
        "started",
        "remote",
        "scheme",
        "head_only",
        "status",
        "handoff",
    )

    def __init__(
        self,
        conn: Connection,
        method: str,
        target: str,
        headers: Headers,
        http11: bool,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        self.body: Body | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.started = False  # a byte of the answer was written
        self.remote = conn.remote
        self.scheme = conn.scheme
        self.head_only = method == "HEAD"
        self.status = 0
        # What the callback path (gateway.fastpath) found before it gave the request to the
        # task path, or None: the task path starts from it instead of doing it again.
        self.handoff: object = None

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self.headers.raw

    def connection_header(self) -> bytes:
        """The ``Connection`` line of the answer (also says close while draining)."""
        conn = self.conn
        if (
            conn.draining
            or (self.body is not None and not self.body.ended)
            or (conn.refused and len(conn.queue) <= 1)
        ):
            # draining; an unread body; the last request before a refusal or an upgrade:
            # the connection closes after this
            self.keep_alive = False
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
