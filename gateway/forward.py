"""Stage 4, forward: the request head the upstream sees, and the exchange on the pool.

Request headers lose the hop-by-hop set (and every header named in ``Connection``),
``Authorization``, framing (re-made here), every client-supplied identity header — also its
look-alikes (``X-Authenticated.User``, ``X-AuthenticatedUser``, any name with ``_``) that an
upstream folding punctuation could read as identity, and likewise method-override look-alikes
(``X-HTTP-Method.Override``; the exact names are refused by the guard) — and the forwarding
headers; the gateway
then sets ``X-Authenticated-User``/``-Roles`` and ``X-Forwarded-For/-Proto/-Host``. The query
string is passed through unchanged; the body byte for byte.

Bodies up to ``buffer_body`` bytes with a ``Content-Length`` are read whole before an upstream
connection is taken (as nginx buffers), so a client trickling a small upload holds no upstream
connection; a body of any size that has wholly arrived by the time the request is forwarded is
sent with the head in one write; other larger and chunked bodies are streamed and may hold at
most half the pool.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any

from .errors import PayloadTooLarge
from .guard import (
    IDENTITY_HEADERS,
    Target,
    claims_identity,
    fold_name,
    is_override_lookalike,
)
from .http.message import HOP_BY_HOP, connection_tokens
from .http.pool import Pool, exchange, request_head
from .http.request import Request
from .policy import User

_DROP = (
    HOP_BY_HOP
    | frozenset(
        h.encode()
        for h in (
            "authorization",
            "host",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
            "content-length",
            "expect",
        )
    )
    | frozenset(h.lower().encode() for h in IDENTITY_HEADERS)
)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
BUFFER_BODY = 16 * 1024
_NO_BODY = b"Content-Length: 0\r\n"
_MEMO_MAX = 4096  # bytes of forwarded header block a connection keeps for its next request


def is_folded_lookalike(low: bytes) -> bool:
    """True for a lower-cased header name that a punctuation-folding upstream reads as an
    identity header or a method override (``x-authenticated.user``, ``x-http-method.override``);
    the cheap substring test keeps the fold off ordinary headers."""
    if b"authenticated" in low or b"user" in low or b"method" in low:
        folded = fold_name(low.decode("latin-1"))
        return claims_identity(folded) or is_override_lookalike(folded)
    return False


_VERDICTS: dict[bytes, bool] = {}  # lower-cased name -> never forwarded (names repeat)
_VERDICTS_MAX = 4096  # names, each at most _NAME_CACHED bytes: at most ~256 KiB of keys
_NAME_CACHED = 64


def is_dropped(low: bytes) -> bool:
    """True for a lower-cased header name the upstream never gets, whatever its value."""
    verdict = low in _DROP or b"_" in low or is_folded_lookalike(low)
    if len(_VERDICTS) < _VERDICTS_MAX and len(low) <= _NAME_CACHED:
        _VERDICTS[low] = verdict
    return verdict


class Forwarder:
    """Builds the upstream request and runs the exchange on the pool."""

    def __init__(
        self, pool: Pool, host: str, max_body: int, buffer_body: int = BUFFER_BODY
    ) -> None:
        self.pool = pool
        self.host = host.encode()
        self.max_body = max_body
        self.buffer_body = buffer_body
        # Lines that repeat from request to request, made once.
        self._identity: dict[str, tuple[User, bytes]] = {}
        self._forwarded: dict[tuple[str, str], bytes] = {}
        self._hosts: dict[bytes, bytes] = {}

    def header_lines(self, req: Request, user: User | None, client: str) -> list[bytes]:
        """The client's headers as forwarded, plus the gateway's own, as one block.

        A kept-alive client tends to send the same headers again: the block made for the
        previous request on the connection is reused when everything it came from is equal
        (kept on the connection, so it lives no longer than the client's own bytes)."""
        raw = req.headers.raw
        memo = req.conn.forwarded
        if (
            memo is not None
            and memo[0] is self
            and memo[1] is user
            and memo[2] == client
            and memo[3] == raw
        ):
            return [memo[4]]
        named = connection_tokens(req.headers.get_raw(b"connection"))
        out = []
        for name, value in raw:
            low = name.lower()
            dropped = _VERDICTS.get(low)
            if dropped is None:
                dropped = is_dropped(low)
            if dropped or (named and low in named):
                continue
            out.append(b"%s: %s\r\n" % (name, value))
        if user is not None:
            known = self._identity.get(user.name)
            if known is None or known[0] is not user:  # a reload makes new User objects
                known = self._identity[user.name] = (user, self.identity_lines(user))
            out.append(known[1])
        fwd = self._forwarded.get((client, req.scheme))
        if fwd is None:
            fwd = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
                client.encode("latin-1", "replace"),
                req.scheme.encode(),
            )
            _remember(self._forwarded, (client, req.scheme), fwd)
        out.append(fwd)
        host = req.headers.get_raw(b"host")
        if host:
            line = self._hosts.get(host)
            if line is None:
                line = (
                    b"X-Forwarded-Host: %s\r\n" % host
                    if _HOST.fullmatch(host.decode("latin-1"))
                    else b""
                )
                _remember(self._hosts, host, line)
            out.append(line)
        block = b"".join(out)
        # an idle kept-alive connection holds at most this much for the next request
        req.conn.forwarded = (self, user, client, raw, block) if len(block) <= _MEMO_MAX else None
        return [block]

    @staticmethod
    def identity_lines(user: User) -> bytes:
        """The identity headers the gateway asserts for ``user``."""
        return b"X-Authenticated-User: %s\r\nX-Authenticated-Roles: %s\r\n" % (
            user.name.encode(),
            user.roles_header.encode(),
        )

    def plain_head(self, req: Request, target: Target, user: User | None, client: str) -> bytes:
        """The upstream request's head for a request without a body."""
        lines = self.header_lines(req, user, client)
        if req.content_length == 0:
            lines.append(_NO_BODY)
        return request_head(req.method.encode(), target.wire, self.host, lines)

    def forward(
        self,
        req: Request,
        target: Target,
        user: User | None,
        client: str,
        body: bytes | None,
        *,
        fresh: bool = False,
    ) -> Awaitable[int]:
        """Forward ``req`` as ``target`` for ``user``; ``body`` when already read. Returns an
        awaitable of the status relayed: the exchange itself when nothing is left to read
        first (no coroutine of its own around it, on the per-request path). ``fresh``: sent
        once, on a new connection (the callback path found a pooled one closed)."""
        lines = self.header_lines(req, user, client)
        stream = None
        if body is None and req.body is not None:
            length = req.content_length
            if length is not None and length > self.max_body:
                raise PayloadTooLarge(f"request body over {self.max_body} bytes")
            if req.body.ended:
                # All of it is here already (the common case: it came with the head). Sent
                # with the head in one write, like a buffered body: no streaming loop, and no
                # share of the pool's streaming slots, since it cannot trickle.
                body = req.body.take_buffered()
                if len(body) > self.max_body:
                    raise PayloadTooLarge(f"request body over {self.max_body} bytes")
            elif length is not None and length <= self.buffer_body:
                return self._read_then_send(req, target, lines, length, client)
            else:
                stream = _Limited(req.body, self.max_body)
        return self._send(req, target, lines, body, stream, client, fresh)

    async def _read_then_send(
        self, req: Request, target: Target, lines: list[bytes], length: int, client: str
    ) -> int:
        body = await read_body(req, length)
        return await self._send(req, target, lines, body, None, client)

    def _send(
        self,
        req: Request,
        target: Target,
        lines: list[bytes],
        body: bytes | None,
        stream: _Limited | None,
        client: str,
        fresh: bool = False,
    ) -> Awaitable[int]:
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        elif stream is not None:
            lines.append(
                b"Content-Length: %d\r\n" % req.content_length
                if req.content_length is not None
                else b"Transfer-Encoding: chunked\r\n"
            )
        elif req.content_length == 0:
            lines.append(_NO_BODY)
        head = request_head(req.method.encode(), target.wire, self.host, lines)
        return exchange(
            self.pool,
            req,
            head,
            body,
            stream,
            retry=req.method in IDEMPOTENT and not fresh,
            client=client,
            fresh=fresh,
        )


def _remember(memo: dict[Any, bytes], key: Any, value: bytes) -> None:
    if len(memo) >= 1024:
        memo.clear()
    memo[key] = value


async def read_body(req: Request, limit: int) -> bytes:
    """The whole request body, refused with 413 past ``limit`` bytes."""
    assert req.body is not None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await req.body.read()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        chunks.append(chunk)


class _Limited:
    """A streamed body refused (413) once over ``limit`` bytes."""

    __slots__ = ("_body", "_left")

    def __init__(self, body: object, limit: int) -> None:
        self._body = body
        self._left = limit

    async def read(self) -> bytes:
        chunk: bytes = await self._body.read()  # type: ignore[attr-defined]
        self._left -= len(chunk)
        if self._left < 0:
            raise PayloadTooLarge("request body over the limit")
        return chunk

    def fail(self, exc: BaseException) -> None:
        self._body.fail(exc)  # type: ignore[attr-defined]
