"""HTTP/1.1 connection handling of the gateway's server (keep-alive, pipelining, 1.0,
100-continue, unread bodies), checked on raw sockets."""

from __future__ import annotations

import asyncio

from tests.helpers import basic, eventually

AUTH = ("Authorization: " + basic("tester", "testerpw")["Authorization"]).encode()
SALES = ("Authorization: " + basic("sales", "imsales")["Authorization"]).encode()


async def open_conn(raw_gateway):
    return await asyncio.open_connection(raw_gateway.host, raw_gateway.port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    from tests.conftest import _read_response

    return await asyncio.wait_for(_read_response(reader), 5)


async def test_keep_alive_serves_many_requests_on_one_connection(raw_gateway) -> None:
    reader, writer = await open_conn(raw_gateway)
    for i in range(5):
        writer.write(b"GET /test/k%d HTTP/1.1\r\nHost: t\r\n%s\r\n\r\n" % (i, AUTH))
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers.get("connection", "") != "close"
    writer.close()
    assert [s.path_qs for s in raw_gateway.upstream.seen] == [f"/test/k{i}" for i in range(5)]


async def test_pipelined_requests_are_answered_in_order(raw_gateway) -> None:
    reader, writer = await open_conn(raw_gateway)
    writer.write(
        b"".join(b"GET /test/p%d HTTP/1.1\r\nHost: t\r\n%s\r\n\r\n" % (i, AUTH) for i in range(4))
        + b"GET /api/inventory HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    statuses = []
    bodies = []
    for _ in range(5):
        status, _, body = await read_response(reader)
        statuses.append(status)
        bodies.append(body)
    writer.close()
    assert statuses == [200, 200, 200, 200, 401]
    assert [b'"/test/p%d"' % i in bodies[i] for i in range(4)] == [True] * 4


async def test_http_10_gets_an_answer_and_the_connection_closes(raw_gateway) -> None:
    reader, writer = await open_conn(raw_gateway)
    writer.write(b"GET /test/old HTTP/1.0\r\n%s\r\n\r\n" % AUTH)
    data = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the server closed
    writer.close()
    assert data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    assert b'"/test/old"' in data


async def test_expect_100_continue(raw_gateway) -> None:
    reader, writer = await open_conn(raw_gateway)
    writer.write(
        b"POST /test/e HTTP/1.1\r\nHost: t\r\n%s\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n" % AUTH
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    status, _, body = await read_response(reader)
    writer.close()
    assert status == 200 and b'"body_len": 5' in body


async def test_refused_request_with_unread_body_closes_the_connection(raw_gateway) -> None:
    reader, writer = await open_conn(raw_gateway)
    # 403 before the (large, still arriving) body was read: the connection cannot be reused
    writer.write(
        b"POST /api/inventory HTTP/1.1\r\nHost: t\r\n%s\r\n"
        b"Content-Length: 1000000\r\n\r\n" % SALES + b"x" * 1000
    )
    status, _, _ = await read_response(reader)
    assert status == 403
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest == b""
    assert raw_gateway.upstream.seen == []


async def test_idle_keep_alive_connection_is_closed_after_the_timeout(make_raw_gateway) -> None:
    gw = await make_raw_gateway(keepalive_timeout=0.2)
    reader, writer = await open_conn(gw)
    writer.write(b"GET /test/k HTTP/1.1\r\nHost: t\r\n%s\r\n\r\n" % AUTH)
    status, _, _ = await read_response(reader)
    assert status == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()


async def test_forty_pipelined_requests_in_one_write_are_all_answered(raw_gateway) -> None:
    reader, writer = await open_conn(raw_gateway)
    writer.write(b"GET /-/healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 40)
    statuses = [(await read_response(reader))[0] for _ in range(40)]
    writer.close()
    assert statuses == [200] * 40


async def test_abandoned_uploads_give_back_every_upstream_slot(raw_gateway) -> None:
    pool = raw_gateway.gw.pool
    for _ in range(30):
        reader, writer = await open_conn(raw_gateway)
        writer.write(
            b"POST /test/upload HTTP/1.1\r\nHost: t\r\n%s\r\nContent-Length: 100\r\n\r\nabc" % AUTH
        )
        await writer.drain()
        writer.close()  # gone halfway through the body
    for _ in range(30):  # and a chunked body that breaks its framing
        reader, writer = await open_conn(raw_gateway)
        writer.write(
            b"POST /test/upload HTTP/1.1\r\nHost: t\r\n%s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nZZZ\r\n" % AUTH
        )
        await writer.drain()
        writer.close()
    await eventually(lambda: pool.in_use == 0, timeout=10)
    reader, writer = await open_conn(raw_gateway)
    writer.write(b"GET /test/after HTTP/1.1\r\nHost: t\r\n%s\r\n\r\n" % AUTH)
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_upstream_answering_out_of_turn_is_not_reused(make_gateway) -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = connections
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                if n == 1:  # two answers to one request: the second must never be relayed
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTALE!"
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(upstream=f"http://127.0.0.1:{port}")
        first = await gw.get("/test/a", headers=basic("tester", "testerpw"))
        assert await first.read() == b"hello"
        second = await gw.get("/test/b", headers=basic("tester", "testerpw"))
        assert await second.read() == b"fresh"
        assert connections == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_in_process_tests_run_on_uvloop_like_the_gateway() -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_connections_interleaving_partial_requests_keep_their_own_bytes(raw_gateway) -> None:
    # Every connection reads into one shared buffer; what one connection had half-parsed
    # must survive another connection's reads in between.
    a_reader, a_writer = await open_conn(raw_gateway)
    b_reader, b_writer = await open_conn(raw_gateway)
    long_value = b"v" * 3000
    a_head = (
        b"POST /test/a HTTP/1.1\r\nHost: t\r\n%s\r\nX-Long: %s\r\nContent-Length: 6\r\n\r\n"
        % (
            AUTH,
            long_value,
        )
    )
    cut = a_head.index(b"X-Long") + 1500
    a_writer.write(a_head[:cut])
    await a_writer.drain()
    # A whole request on B, answered: by then the gateway has read A's half head too (it
    # was sent first), and B's bytes went through the buffer after it.
    b_writer.write(b"GET /test/b0 HTTP/1.1\r\nHost: t\r\n%s\r\n\r\n" % AUTH)
    assert (await read_response(b_reader))[0] == 200
    b_body = b"B" * 70_000
    b_writer.write(
        b"POST /test/b HTTP/1.1\r\nHost: t\r\n%s\r\nContent-Length: %d\r\n\r\n%s"
        % (AUTH, len(b_body), b_body[:30_000])
    )
    await b_writer.drain()
    a_writer.write(a_head[cut:] + b"AAA")
    await a_writer.drain()
    b_writer.write(b_body[30_000:])
    a_writer.write(b"AAA")
    assert (await read_response(a_reader))[0] == 200
    assert (await read_response(b_reader))[0] == 200
    a_writer.close()
    b_writer.close()
    seen = {s.path_qs: s for s in raw_gateway.upstream.seen}
    assert seen["/test/a"].headers["X-Long"] == long_value.decode()
    assert seen["/test/a"].body == b"AAAAAA"
    assert seen["/test/b"].body == b_body
