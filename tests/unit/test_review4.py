"""Fourth adversarial review of the HTTP layer (d4edbf9: a body that has wholly arrived goes
upstream with its head, re-framed with its length; 79da165: every connection reads into one
shared buffer, the header checks restructured): reproducers for confirmed findings.

Each test states what must happen and fails on 79da165.

Finding 1 (LOW): a request whose body (over 256 KiB of buffered bytes, so that ``Body.feed``
paused the socket) arrived whole, and that is answered without the body being read (401,
403, 400 from the guard, 413 from the ``Content-Length`` check, every decision-mode answer),
is answered keep-alive, but the socket's read pause (``reading_paused`` bit 1) is never
lifted: the next request on that connection is never read, and the client hangs until the
keep-alive timeout closes the connection (75 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.helpers import basic, eventually, nginx_check
from tests.unit.test_review2 import StallingUpstream

TESTER = basic("tester", "testerpw")["Authorization"]
SALES = basic("sales", "imsales")["Authorization"]
BODY = 300_000  # over the 256 KiB a body may buffer before the socket stops being read


async def _read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes]:
    """One answer with a Content-Length: its status and head."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await asyncio.wait_for(reader.readexactly(length), timeout)
    return int(head.split()[1]), head


class HeldUpstream(StallingUpstream):
    """Answers every request 200 (having read its body), but only once ``release`` is set."""

    @property
    def release(self) -> asyncio.Event:
        return self._release

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                if b"content-length:" in head:
                    n = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(n)
                await self.release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()


def _only_connection(gw):
    conns = list(gw.server.connections)
    return conns[0] if len(conns) == 1 else None


async def test_a_refused_request_whose_large_body_arrived_whole_does_not_stall_the_connection(
    make_gateway,
) -> None:
    # A first request waits on the upstream; meanwhile a second one, with no credentials and
    # a 300 KB body, arrives whole (the body paused the socket at 256 KiB, in the read that
    # also completed it). The second is answered 401 without its body being read, keep-alive
    # (rightly: its body was read to its end by the parser), so the client sends a third
    # request on the same connection -- which must be read and answered.
    async with HeldUpstream().serving() as up:
        gw = await make_gateway(upstream=up.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(
                b"GET /test/first HTTP/1.1\r\nHost: gw\r\nAuthorization: %s\r\n\r\n"
                % TESTER.encode()
                + b"POST /test/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % BODY
                + b"a" * BODY
            )

            def second_body_arrived() -> bool:
                c = _only_connection(gw)
                return c is not None and len(c.queue) == 2 and c.queue[1].body.ended

            await eventually(second_body_arrived, what="the 300 KB body arrived whole")
            up.release.set()
            assert (await _read_answer(reader, 5))[0] == 200
            status, head = await _read_answer(reader, 5)
            assert status == 401
            assert b"connection: close" not in head.lower()  # the gateway says: keep it
            writer.write(b"GET /-/healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            try:
                status, _ = await _read_answer(reader, 3)
            except TimeoutError:
                c = _only_connection(gw)
                paused = c.reading_paused if c is not None else None
                raise AssertionError(
                    "the next request on a connection answered keep-alive was never read "
                    f"(reading_paused={paused})"
                ) from None
            assert status == 200
        finally:
            writer.transport.abort()


async def test_a_check_request_whose_large_body_arrived_whole_does_not_stall_the_connection(
    decider,
) -> None:
    # Decision mode never reads a check request's body (Envoy's ext_authz can be told to
    # send one: with_request_body). The decision is held until the body has arrived whole
    # (as a bcrypt check at a real cost would); answered keep-alive, the front proxy's next
    # check on that connection must be read and answered.
    server = decider.server
    handle = server.handler

    async def held(req):
        if req.body is not None:
            await eventually(lambda: req.body.ended, what="the 300 KB body arrived whole")
        await handle(req)

    server.handler = held
    check = b"GET /-/decide HTTP/1.1\r\nHost: gw\r\n%s" % b"".join(
        b"%s: %s\r\n" % (k.encode(), v.encode())
        for k, v in {**nginx_check("GET", "/api/inventory"), "Authorization": SALES}.items()
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", decider.port)
    try:
        writer.write(check + b"Content-Length: %d\r\n\r\n" % BODY + b"a" * BODY)
        status, head = await _read_answer(reader, 5)
        assert status == 200
        assert b"connection: close" not in head.lower()
        writer.write(check + b"\r\n")
        try:
            status, _ = await _read_answer(reader, 3)
        except TimeoutError:
            raise AssertionError(
                "the next check request on a connection answered keep-alive was never read"
            ) from None
        assert status == 200
    finally:
        writer.transport.abort()
