"""Second adversarial review of the HTTP layer (streamed uploads, the per-client cap, the
refresh-ahead): regression tests for confirmed findings.

Each test states what must happen; each was a strict xfail until its fix landed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import pytest

from tests.helpers import basic, eventually
from tests.rawupstream import ScriptedUpstream, Seen, parse_answers, serving

TESTER = basic("tester", "testerpw")["Authorization"]


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    async with serving(ScriptedUpstream()) as up:
        yield up


class StallingUpstream:
    """An upstream that reads a request's head, then stops reading (the body stays in the
    socket buffers); ``on_head(writer)`` may answer or close. Records the heads it read."""

    def __init__(self, on_head: Callable[[asyncio.StreamWriter], None] | None = None) -> None:
        self.heads: list[bytes] = []
        self.on_head = on_head
        self.port = 0
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.transport.pause_reading()
            if self.on_head is not None:
                self.on_head(writer)
            await self._release.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[StallingUpstream]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._release.set()
            server.close()


async def _upload_and_read(port: int, head: bytes, total: int, timeout: float = 10.0) -> bytes:
    """Send ``head`` and ``total`` body bytes (as fast as the gateway takes them, in the
    background), and return everything the gateway answers until it closes (or timeout);
    a reset is recorded as ``<<reset>>``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)

    async def send() -> None:
        left = total
        with contextlib.suppress(ConnectionError):
            while left:
                n = min(65536, left)
                writer.write(b"z" * n)
                await writer.drain()
                left -= n

    sender = asyncio.create_task(send())
    out = b""
    try:

        async def all_() -> None:
            nonlocal out
            while chunk := await reader.read(65536):
                out += chunk

        await asyncio.wait_for(all_(), timeout)
    except ConnectionError:
        out += b"<<reset>>"
    except TimeoutError:
        out += b"<<timeout>>"
    finally:
        sender.cancel()
        writer.transport.abort()
    return out


def _upload_head(size: int, extra: str = "") -> bytes:
    return (
        f"POST /test/up HTTP/1.1\r\nHost: gw\r\nAuthorization: {TESTER}\r\n"
        f"Content-Length: {size}\r\n{extra}\r\n"
    ).encode()


def _record_audit(gw) -> list[dict[str, object]]:
    """Every audit record the pipeline writes (the test gateway's audit log is off)."""
    records: list[dict[str, object]] = []
    audit = gw.gw.pipeline.audit
    write = audit.write

    def spy(record: dict[str, object]) -> None:
        records.append(dict(record))
        write(record)

    audit.write = spy
    return records


async def test_an_upstream_that_stops_reading_an_upload_is_a_504_not_a_reset(
    make_gateway,
) -> None:
    async with StallingUpstream().serving() as up:
        gw = await make_gateway(upstream=up.url, upstream_timeout=1.0)
        records = _record_audit(gw)
        size = 8_000_000  # far more than the socket buffers and the gateway's high water
        out = await _upload_and_read(gw.port, _upload_head(size), size)
        await eventually(lambda: records, what="the audit record")
        assert out.startswith(b"HTTP/1.1 504"), (out[:120], records)
        doc = json.loads(out.split(b"\r\n\r\n", 1)[1])
        assert doc["status"] == 504, doc
        assert records[0]["status"] == 504, records


async def test_an_early_upstream_answer_then_close_is_recorded_and_not_reset(
    make_gateway,
) -> None:
    answer = (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!"
    )

    def on_head(writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        # once the gateway is blocked writing the body (nothing is read here), answer; then
        # close with the body unread (a reset, as a kernel does)
        loop.call_later(0.3, writer.write, answer)
        loop.call_later(0.6, writer.transport.abort)

    async with StallingUpstream(on_head).serving() as up:
        gw = await make_gateway(upstream=up.url, upstream_timeout=5.0)
        records = _record_audit(gw)
        size = 8_000_000
        out = await _upload_and_read(gw.port, _upload_head(size), size)
        await eventually(lambda: records, what="the audit record")
        assert out.startswith(b"HTTP/1.1 413"), out[:120]
        assert records[0]["status"] == 413 and records[0]["decision"] == "allow", records
        assert out.endswith(b"nope!"), out[-60:]  # a clean close, no reset


async def test_expect_continue_client_is_not_timed_out_before_it_was_invited(
    make_gateway, scripted
) -> None:
    import socket

    size = 8_000_000

    def script(r: Seen) -> bytes:
        if r.target == "/test/big":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    scripted.script = script
    gw = await make_gateway(
        upstream=scripted.url,
        pool_size=1,
        connect_timeout=10.0,
        body_timeout=1.0,
        upstream_timeout=10.0,
    )
    pool = gw.gw._pool
    # hold the only upstream slot: a download whose client does not read (yet)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    holder.connect(("127.0.0.1", gw.port))
    holder.sendall(
        f"GET /test/big HTTP/1.1\r\nHost: gw\r\nAuthorization: {TESTER}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    holder.setblocking(False)
    hr, hw = await asyncio.open_connection(sock=holder)
    await eventually(lambda: pool.in_use == 1, what="the download holds the slot")
    # a polite client: a streamed upload's head with Expect; the body only after 100 Continue
    loop = asyncio.get_running_loop()
    r2, w2 = await asyncio.open_connection("127.0.0.1", gw.port)
    w2.write(_upload_head(20_000, "Expect: 100-continue\r\nConnection: close\r\n"))
    asked = loop.time()
    await eventually(lambda: pool._waiters, what="the polite upload waits for a slot")
    # more than body_timeout (and a sweep interval, 1 s) passes while the gateway (not the
    # client) is the one waiting
    await eventually(lambda: loop.time() - asked > 2.5, timeout=5, interval=0.1)
    got = 0
    while chunk := await asyncio.wait_for(hr.read(65536), 10):  # the slot is given back
        got += len(chunk)
    hw.close()
    assert got > size
    interim = await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    w2.write(b"b" * 20_000)
    rest = await asyncio.wait_for(r2.read(), 5)
    w2.close()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]


async def test_a_client_pausing_its_upload_is_not_an_upstream_timeout(
    make_gateway, scripted
) -> None:
    gw = await make_gateway(upstream=scripted.url, upstream_timeout=1.0, body_timeout=10.0)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(_upload_head(50_000, "Connection: close\r\n") + b"a" * 30_000)
    paused = loop.time()
    await eventually(lambda: gw.gw._pool.in_use == 1, what="the upload is streaming")
    # pause for longer than --upstream-timeout (and a sweep), well within the body deadlines
    await eventually(lambda: loop.time() - paused > 2.0, timeout=5, interval=0.1)
    writer.write(b"a" * 20_000)
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert [len(s.body) for s in scripted.seen] == [50_000]


async def test_one_user_cannot_evict_everyone_from_the_credential_cache(
    make_gateway, scripted
) -> None:
    size = 200  # --cache-size (10,000 by default: 'Basic' + 1..4000 spaces x 32 cases)
    gw = await make_gateway(upstream=scripted.url, cache_size=size)
    auth = gw.gw.pipeline.auth
    sales = basic("sales", "imsales")["Authorization"]

    async def get(authorization: str, n: int = 1, spaces: int = 1) -> list[int]:
        token = authorization.split(" ", 1)[1]
        data = b"".join(
            (
                f"GET /api/inventory HTTP/1.1\r\nHost: gw\r\n"
                f"Authorization: Basic{' ' * (spaces + i)}{token}\r\n\r\n"
            ).encode()
            for i in range(n)
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(data + b"GET /-/healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        out = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return [status for status, _, _ in parse_answers(out)][:-1]

    assert await get(sales) == [200]
    checks = auth.bcrypt_checks
    # another user (no right to the path needed: authentication comes first) sends their own
    # credentials in 50-request pipelines, each with one more space after 'Basic'
    for batch in range(size // 50 + 1):
        statuses = await get(TESTER, 50, spaces=1 + 50 * batch)
        assert set(statuses) == {403}, statuses
    checks_flood = auth.bcrypt_checks - checks
    assert checks_flood <= 2, checks_flood  # the flood itself cost (almost) no bcrypt
    before = auth.bcrypt_checks
    assert await get(sales) == [200]
    assert auth.bcrypt_checks == before, "sales was evicted: their request ran bcrypt again"


@pytest.mark.parametrize(
    "prefix",
    [
        b"GET /test/a HTTP/1.1\r\nHost: gw\r\nX-Big: ",  # a header value
        b"GET /test/a HTTP/1.1\r\nHost: gw\r\nX-Big",  # a header name
        # a trailer field, after a complete chunked body (trailers are never size-checked)
        (
            f"POST /test/a HTTP/1.1\r\nHost: gw\r\nAuthorization: {TESTER}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Big: "
        ).encode(),
    ],
    ids=["value", "name", "trailer"],
)
async def test_an_endless_header_line_is_refused_while_it_arrives(
    make_gateway, scripted, prefix: bytes
) -> None:
    gw = await make_gateway(upstream=scripted.url, header_timeout=30.0, body_timeout=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(prefix)
    piece = b"a" * 65536
    answer = b""

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB, 32 times the whole header block's limit
                writer.write(piece)
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.read(65536), 5)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        sender.cancel()
        writer.transport.abort()
    assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:80]
    assert scripted.seen == []


async def test_only_one_oversize_authorization_escapes_the_header_block_limit(
    make_gateway, scripted
) -> None:
    gw = await make_gateway(upstream=scripted.url)
    line = b"Authorization: Basic " + b"A" * (120 * 1024) + b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /test/a HTTP/1.1\r\nHost: gw\r\n" + line * 98 + b"Connection: close\r\n\r\n")
    out = b""
    with contextlib.suppress(ConnectionError):
        out = await asyncio.wait_for(reader.read(65536), 5)
    writer.transport.abort()
    assert out.startswith(b"HTTP/1.1 431"), out[:120]
    assert scripted.seen == []
