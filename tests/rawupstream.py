"""A raw upstream for framing tests: it parses requests with its own llhttp parser (so what it
records is what an upstream would read) and answers with scripted bytes. Also the client's
view of a byte stream of answers (:func:`parse_answers`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httptools


@dataclass
class Seen:
    """One request as the upstream parsed it."""

    conn: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def _ok(_: Seen) -> bytes | None:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class ScriptedUpstream:
    """Answers each request with ``script(request)`` bytes (``None``: close instead); closes
    after the answer when :meth:`closes_after` says so."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    script: Callable[[Seen], bytes | None] = _ok
    conns: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def closes_after(self) -> bool:
        return False


class _Parser:
    def __init__(self, up: ScriptedUpstream, conn: int, writer: asyncio.StreamWriter) -> None:
        self.up, self.conn, self.writer = up, conn, writer
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = b""

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        seen = Seen(
            self.conn,
            self.parser.get_method().decode(),
            self.url.decode("latin-1"),
            self.headers,
            self.body,
        )
        self.up.seen.append(seen)
        out = self.up.script(seen)
        if out is None:
            self.writer.close()
            return
        self.writer.write(out)
        if self.up.closes_after():
            self.writer.close()


@contextlib.asynccontextmanager
async def serving(up: ScriptedUpstream) -> AsyncIterator[ScriptedUpstream]:
    """Serve ``up`` on 127.0.0.1, an ephemeral port, for the duration of the block."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.conns += 1
        p = _Parser(up, up.conns, writer)
        try:
            while data := await reader.read(65536):
                p.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            up.errors.append(str(exc))
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()


def parse_answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every answer in a byte stream, parsed by llhttp (the client's view of the framing)."""
    answers: list[tuple[int, dict[str, str], bytes]] = []

    class P:
        headers: dict[str, str]
        body: bytes

        def on_message_begin(self) -> None:
            self.headers, self.body = {}, b""

        def on_header(self, n: bytes, v: bytes) -> None:
            self.headers[n.decode().lower()] = v.decode("latin-1")

        def on_body(self, b: bytes) -> None:
            self.body += b

        def on_message_complete(self) -> None:
            answers.append((parser.get_status_code(), self.headers, self.body))

    p = P()
    parser = httptools.HttpResponseParser(p)
    parser.feed_data(data)
    return answers


@contextlib.asynccontextmanager
async def answering(
    answer: Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]],
) -> AsyncIterator[str]:
    """An upstream (its URL) that answers the n-th request head, counted over all its
    connections, with ``answer(n, head, writer)``, writing as it is told (TCP_NODELAY: a write
    after a drain and a pause arrives in a read of its own); False closes the connection
    without more."""
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                count += 1
                if not await answer(count, head, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
