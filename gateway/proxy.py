"""Forwarding: one shared keep-alive client session, bodies streamed both ways.

Request headers lose the hop-by-hop set (and every header named in ``Connection``),
``Authorization``, every client-supplied ``X-Authenticated-*`` and forwarding header; the
gateway then sets ``X-Authenticated-User``/``-Roles`` and ``X-Forwarded-For/-Proto/-Host``.
Response headers lose the hop-by-hop set too. The query string is passed through unchanged.
Upstream unreachable → 502, upstream too slow → 504, both before any byte of the answer left.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import BadGateway, GatewayTimeout, PayloadTooLarge
from .guard import Target
from .policy import User

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade"))
# Never passed on from the client: credentials, and headers only the gateway may assert.
_STRIP_REQUEST = HOP_BY_HOP | {"authorization", "host", "forwarded", "x-forwarded-for",
                               "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
_IDENTITY_PREFIX = "x-authenticated-"
CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where and how to forward."""

    url: URL
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    pool_size: int = 256


class Forwarder(Protocol):
    """A way to send an authorized request upstream and stream the answer back."""

    async def start(self) -> None:
        """Open what forwarding needs (called once the event loop runs)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    async def forward(self, request: web.Request, target: Target, user: User | None,
                      client: str, body: bytes | None) -> web.StreamResponse:
        """Forward ``request`` as ``target`` for ``user``; ``body`` when already read."""
        ...


class SessionForwarder:
    """:class:`Forwarder` on one shared :class:`aiohttp.ClientSession`."""

    def __init__(self, upstream: Upstream, max_body: int) -> None:
        self.upstream = upstream
        self.max_body = max_body
        self._base = str(upstream.url).rstrip("/")
        self._host = upstream.url.raw_authority
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.upstream.pool_size, ttl_dns_cache=10,
                                         enable_cleanup_closed=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.upstream.connect_timeout,
                                        sock_read=self.upstream.read_timeout)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=(
                "User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def request_headers(self, request: web.Request, user: User | None,
                        client: str) -> CIMultiDict[str]:
        """The header block sent upstream."""
        src = request.headers
        named = _connection_tokens(src)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in src.items():
            low = name.lower()
            if low in _STRIP_REQUEST or low in named or low.startswith(_IDENTITY_PREFIX):
                continue
            out.add(name, value)
        if user is not None:
            out["X-Authenticated-User"] = user.name
            out["X-Authenticated-Roles"] = user.roles_header
        out["X-Forwarded-For"] = client
        out["X-Forwarded-Proto"] = request.scheme
        host = src.get("Host")
        if host:
            out["X-Forwarded-Host"] = host
        out["Host"] = self._host
        return out

    async def forward(self, request: web.Request, target: Target, user: User | None,
                      client: str, body: bytes | None) -> web.StreamResponse:
        assert self._session is not None, "forwarder not started"
        headers = self.request_headers(request, user, client)
        data: object = None
        if body is not None:
            data = body
            headers["Content-Length"] = str(len(body))
        elif request.body_exists:
            length = request.content_length
            if length is not None:
                if length > self.max_body:
                    raise PayloadTooLarge(f"request body over {self.max_body} bytes")
                data = request.content
            else:
                data = _Bounded(request.content, self.max_body)
        url = URL(self._base + target.path_qs, encoded=True)
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False,
                compress=None, auto_decompress=False)
        except asyncio.TimeoutError:
            raise GatewayTimeout("the upstream did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(data, _Bounded) and data.exceeded:
                raise PayloadTooLarge(f"request body over {self.max_body} bytes") from None
            log.warning("upstream %s unreachable: %s", self._base, exc.__class__.__name__)
            raise BadGateway("the upstream could not be reached") from None
        try:
            return await self._relay(request, upstream)
        finally:
            upstream.release()

    async def _relay(self, request: web.Request,
                     upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=_response_headers(upstream.headers))
        if upstream.content_length is not None and "Content-Length" in resp.headers:
            resp.content_length = upstream.content_length
        try:
            first = await upstream.content.readany()
        except asyncio.TimeoutError:
            raise GatewayTimeout("the upstream did not answer in time") from None
        except (aiohttp.ClientError, OSError):
            raise BadGateway("the upstream broke the response") from None
        await resp.prepare(request)
        try:
            if first:
                await resp.write(first)
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await resp.write(chunk)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
            # The status line is gone already: all we can do is cut the connection so the
            # client sees a truncated answer rather than a complete-looking one.
            log.warning("upstream response broke off mid-stream: %s", exc.__class__.__name__)
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _response_headers(src: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    named = _connection_tokens(src)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in src.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in named:
            continue
        out.add(name, value)
    return out


class _Bounded:
    """A chunked request body, cut off (and flagged) past ``limit`` bytes."""

    def __init__(self, stream: aiohttp.StreamReader, limit: int) -> None:
        self._stream, self._limit = stream, limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._stream.iter_chunked(CHUNK):
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise PayloadTooLarge("request body over the limit")
            yield chunk
