"""One request and its answer, whichever HTTP server carries them.

The pipeline reads the request and answers through this small interface, so the same code
runs behind aiohttp's web server (:class:`AiohttpExchange`) and behind the gateway's own lean
HTTP/1.1 server (:mod:`gateway.fastserver`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Protocol

from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy

JSON_TYPE = "application/json; charset=utf-8"
RawHeaders = list[tuple[bytes, bytes]]


class Exchange(Protocol):
    """A request being answered: :meth:`respond` or :meth:`relay` with a body once, or
    :meth:`relay` without one, any number of :meth:`write` and :meth:`finish`."""

    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    raw_headers: tuple[tuple[bytes, bytes], ...]
    remote: str | None
    scheme: str
    content: StreamReader
    content_length: int | None
    body_exists: bool
    started: bool

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """Send a complete answer."""
        ...

    async def relay(self, status: int, reason: str, headers: RawHeaders,
                    body: bytes | None) -> None:
        """Send an upstream's answer with its (already filtered) raw header lines: complete
        with ``body``, or, with ``None``, just the head of a streamed answer."""
        ...

    async def write(self, data: bytes) -> None:
        """Send part of the body (waits while the client is slow to read)."""
        ...

    async def finish(self) -> None:
        """End the streamed answer."""
        ...

    def abort(self) -> None:
        """Cut the client connection: the answer cannot be completed."""
        ...


def json_body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


class AiohttpExchange:
    """:class:`Exchange` over an aiohttp :class:`web.Request`; ``response`` is returned."""

    __slots__ = ("request", "response", "started", "method", "raw_path", "headers",
                 "raw_headers", "remote", "scheme", "content", "content_length", "body_exists")

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.started = False
        self.method = request.method
        self.raw_path = request.raw_path
        self.headers = request.headers
        self.raw_headers = request.raw_headers
        self.remote = request.remote
        self.scheme = request.scheme
        self.content = request.content
        self.content_length = request.content_length
        self.body_exists = request.body_exists

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.response = web.Response(status=status, body=body, headers=headers)

    async def _start(self, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        resp = self.response = web.StreamResponse(status=status, reason=reason,
                                                  headers=headers)
        self.started = True
        await resp.prepare(self.request)

    async def relay(self, status: int, reason: str, headers: RawHeaders,
                    body: bytes | None) -> None:
        decoded: CIMultiDict[str] = CIMultiDict(
            (k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in headers)
        if body is None:
            await self._start(status, reason, decoded)
        else:
            await self.respond(status, decoded, body)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()
