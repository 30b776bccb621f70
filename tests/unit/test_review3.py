"""Third adversarial review (of the second review's fixes): regression tests for confirmed
findings. Each states what must happen; each was a strict xfail until its fix landed."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.helpers import basic, eventually
from tests.rawupstream import ScriptedUpstream, parse_answers, serving
from tests.unit.test_review2 import StallingUpstream, _upload_head

TESTER = basic("tester", "testerpw")["Authorization"]


@pytest.fixture
async def scripted():
    async with serving(ScriptedUpstream()) as up:
        yield up


async def test_an_early_complete_answer_from_an_upstream_that_stops_reading_frees_the_slot(
    make_gateway,
) -> None:
    answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 5\r\n\r\nnope!"

    def on_head(writer: asyncio.StreamWriter) -> None:
        # once the gateway is blocked writing the body, answer completely; keep the
        # connection open and never read (the body stays in the socket buffers)
        asyncio.get_running_loop().call_later(0.3, writer.write, answer)

    async with StallingUpstream(on_head).serving() as up:
        gw = await make_gateway(
            upstream=up.url, pool_size=1, upstream_timeout=1.0, body_timeout=2.0
        )
        pool = gw.gw._pool
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        size = 8_000_000
        writer.write(_upload_head(size))

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(size // 65536):
                    writer.write(b"z" * 65536)
                    await writer.drain()

        sender = asyncio.create_task(send())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"nope!"), 5)
            assert head.startswith(b"HTTP/1.1 413"), head
            # (it used to hold the slot for ever.) Within the upstream timeout, the body
            # timeout and a sweep, the exchange must have ended and given its slot back.
            await eventually(
                lambda: pool.in_use == 0 and pool.streaming == 0 and not pool._held,
                timeout=8,
                what="the slot, the upload count and the client's share are given back",
            )
        finally:
            sender.cancel()
            writer.transport.abort()


async def test_an_upstream_dying_while_the_client_pauses_its_upload_is_a_prompt_502(
    make_gateway,
) -> None:
    def on_head(writer: asyncio.StreamWriter) -> None:
        asyncio.get_running_loop().call_later(0.3, writer.transport.abort)  # dies, no answer

    async with StallingUpstream(on_head).serving() as up:
        gw = await make_gateway(upstream=up.url, upstream_timeout=1.0, body_timeout=6.0)
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        # part of the body, then a pause well within the client's own deadlines
        writer.write(_upload_head(500_000) + b"a" * 100_000)
        start = loop.time()
        try:
            out = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.transport.abort()
        took = loop.time() - start
        assert out.startswith(b"HTTP/1.1 502"), (round(took, 2), out[:80])
        assert took < 3.0, took


async def test_an_odd_spelling_served_from_the_cache_counts_as_a_hit(
    make_gateway, scripted
) -> None:
    gw = await make_gateway(upstream=scripted.url)
    auth = gw.gw.pipeline.auth
    token = TESTER.split(" ", 1)[1]

    async def get(authorization: str, n: int) -> list[int]:
        data = b"".join(
            f"GET /test/a HTTP/1.1\r\nHost: gw\r\nAuthorization: {authorization}\r\n\r\n".encode()
            for _ in range(n)
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(data + b"GET /-/healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        out = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return [status for status, _, _ in parse_answers(out)]

    assert await get(TESTER, 1) == [200, 200]  # verified once, with bcrypt
    checks, hits, misses = auth.bcrypt_checks, auth.cache.hits, auth.cache.misses
    statuses = await get(f"basic {token}", 5)
    assert statuses == [200] * 6, statuses
    assert auth.bcrypt_checks == checks  # served from the cache...
    assert (auth.cache.hits - hits, auth.cache.misses - misses) == (5, 0)  # ...and counted so


class SlowReadingUpstream:
    """Reads a request's head, then its body at ``rate`` bytes/s (in 8 KiB sips), answers
    200 once it has all of it."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.port = 0
        self.got = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while self.got < size:
                self.got += len(await reader.readexactly(min(8192, size - self.got)))
                await asyncio.sleep(8192 / self.rate)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self):
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()


async def test_a_slow_reading_upstream_is_not_the_clients_slow_upload(make_gateway) -> None:
    # the upstream takes 1 MB/s; the client could send far faster than the (high) minimum
    size = 12_000_000
    async with SlowReadingUpstream(rate=1_000_000).serving() as up:
        gw = await make_gateway(
            upstream=up.url,
            upstream_timeout=30.0,
            body_timeout=60.0,
            min_upload_rate=3_000_000,
            max_body=size,
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_upload_head(size, "Connection: close\r\n"))

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(size // 100_000):
                    writer.write(b"z" * 100_000)  # as fast as the gateway takes it
                    await writer.drain()

        sender = asyncio.create_task(send())
        try:
            out = await asyncio.wait_for(reader.read(), 40)
        finally:
            sender.cancel()
            writer.transport.abort()
        assert out.startswith(b"HTTP/1.1 200"), (out[:160], up.got)
