"""What the hot path remembers between requests must never carry one request's facts into
another: the credential key and the forwarded header block kept on a client connection, and
the relayed answer head kept per upstream pool (issue 9)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
import yaml

from tests.helpers import basic
from tests.rawupstream import ScriptedUpstream, Seen, answering, parse_answers, serving
from tests.unit.test_smuggling import RawUpstream, send_raw

SALES = basic("sales", "imsales")["Authorization"]
MANAGER = basic("manager", "imthemanager")["Authorization"]
WRONG = basic("manager", "not-the-password")["Authorization"]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> tuple[int, bytes]:
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), 5)
    return int(head.split()[1]), head


def _get(auth: str, trace: str) -> bytes:
    return (
        f"GET /api/inventory?t={trace} HTTP/1.1\r\nHost: gateway.test\r\n"
        f"Authorization: {auth}\r\nX-Trace: {trace}\r\n\r\n"
    ).encode()


async def test_credentials_and_headers_that_change_on_one_connection_are_seen_anew(
    raw_gateway,
) -> None:
    """One keep-alive connection: each request is authenticated as its own credentials say
    and forwarded with its own headers, whatever the previous request on it sent."""
    reader, writer = await asyncio.open_connection(raw_gateway.host, raw_gateway.port)
    try:
        steps = [
            (SALES, "one", 200),
            (SALES, "one", 200),  # the same bytes again: what a memo would serve
            (MANAGER, "two", 200),
            (WRONG, "three", 401),
            (SALES, "four", 200),
            (SALES, "five", 200),
        ]
        for auth, trace, want in steps:
            status, _ = await _exchange(reader, writer, _get(auth, trace))
            assert status == want, (auth, trace, status)
    finally:
        writer.close()
    seen = [
        (s.headers.get("X-Authenticated-User"), s.headers.get("X-Trace"))
        for s in raw_gateway.upstream.seen
    ]
    assert seen == [
        ("sales", "one"),
        ("sales", "one"),
        ("manager", "two"),
        ("sales", "four"),
        ("sales", "five"),
    ]
    assert all("Authorization" not in s.headers for s in raw_gateway.upstream.seen)


async def test_a_reload_that_changes_a_user_is_seen_on_a_kept_alive_connection(
    raw_gateway, policy_path
) -> None:
    """The identity lines come from the policy in force, not from the connection's last
    request: after a reload that takes a role away, the same bytes are forwarded with the
    new roles (or refused)."""
    reader, writer = await asyncio.open_connection(raw_gateway.host, raw_gateway.port)
    try:
        status, _ = await _exchange(reader, writer, _get(MANAGER, "before"))
        assert status == 200
        doc = yaml.safe_load(policy_path.read_text())
        doc["users"]["manager"]["roles"] = ["sales"]
        doc.pop("tests", None)  # the policy's own checks expect the manager's old grants
        policy_path.write_text(yaml.safe_dump(doc))
        result = await raw_gateway.gw.reload("test")
        assert result.ok and result.changed, result
        status, _ = await _exchange(reader, writer, _get(MANAGER, "after"))
        assert status == 200
    finally:
        writer.close()
    roles = [s.headers.get("X-Authenticated-Roles") for s in raw_gateway.upstream.seen]
    assert roles[0] != roles[1]
    assert roles[1] == "sales"


async def test_one_answer_shape_relayed_to_http10_and_http11_clients_in_turn(
    make_gateway,
) -> None:
    """A chunked answer without a length: HTTP/1.1 clients get it chunked and kept alive,
    HTTP/1.0 clients get it delimited by the close, in any order on one upstream pool."""
    async with serving(RawUpstream(answer="chunked", answer_body=b"0123456789")) as up:
        gw = await make_gateway(upstream=up.url)
        for version in ("1.1", "1.0", "1.1", "1.0"):
            data = (
                f"GET /api/inventory HTTP/{version}\r\nHost: gw\r\nAuthorization: {SALES}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            raw = await send_raw(gw.port, data)
            head, _, body = raw.partition(b"\r\n\r\n")
            if version == "1.1":
                assert b"transfer-encoding: chunked" in head.lower(), raw
                assert parse_answers(raw)[0][2] == b"0123456789"
            else:
                assert b"transfer-encoding" not in head.lower(), raw
                assert b"connection: close" in head.lower(), raw
                assert body == b"0123456789", raw


async def test_what_a_connection_or_pool_remembers_is_bounded(make_gateway, raw_gateway) -> None:
    """The review's two LOW notes: an idle connection keeps no large header block for its
    next request, and the pool keeps no large answer head (both are made again instead)."""
    reader, writer = await asyncio.open_connection(raw_gateway.host, raw_gateway.port)
    try:
        small = _get(SALES, "small")
        status, _ = await _exchange(reader, writer, small)
        assert status == 200
        (conn,) = raw_gateway.client.server.connections
        assert conn.forwarded is not None  # an ordinary block is kept
        large = small.replace(b"\r\n\r\n", b"\r\nX-Big: %s\r\n\r\n" % (b"b" * 8000))
        status, _ = await _exchange(reader, writer, large)
        assert status == 200
        assert conn.forwarded is None
        assert raw_gateway.upstream.seen[-1].headers["X-Big"] == "b" * 8000
    finally:
        writer.close()

    big_header = b"X-Echo: " + b"e" * 6000
    up = RawUpstream()
    up.script = lambda _seen: b"HTTP/1.1 200 OK\r\n%s\r\nContent-Length: 2\r\n\r\nok" % big_header
    async with serving(up):
        gw = await make_gateway(upstream=up.url)
        for _ in range(2):
            answers = parse_answers(
                await send_raw(
                    gw.port, _get(SALES, "x").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                )
            )
            assert answers[0][1]["x-echo"] == "e" * 6000
        assert gw.gw.pool.heads == {}


def _by_query(answers: dict[str, bytes]):
    def script(seen: Seen) -> bytes | None:
        return answers[seen.target.partition("?")[2]]

    return script


def _upstream(
    answer: Callable[[bytes, asyncio.StreamWriter], Awaitable[None]],
) -> contextlib.AbstractAsyncContextManager[str]:
    """An upstream that answers each request with ``answer(query, writer)``."""

    async def by_query(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        await answer(head.split(b" ", 2)[1].partition(b"?")[2], writer)
        return True

    return answering(by_query)


def _get_q(q: str) -> bytes:
    return (
        f"GET /api/inventory?{q} HTTP/1.1\r\nHost: gw\r\nAuthorization: {SALES}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("lead", [b"", b"\r\n", b"\r\n\r\n", b"\n\r\n\r\n"])
async def test_two_answer_heads_on_one_pool_are_each_relayed_as_sent(make_gateway, lead) -> None:
    """Answers that differ in their head reach each client with their own head and framing,
    in any order on one pool, also when the upstream sends blank lines before the status
    line (llhttp skips them: a key ending at the first blank line would hold no head)."""
    first = lead + b"HTTP/1.1 200 OK\r\nSet-Cookie: s=alice\r\nContent-Length: 2\r\n\r\nok"
    inner = b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n"
    second = lead + b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\nno%s" % (
        2 + len(inner),
        inner,
    )
    third = lead + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    answers = {"a": first, "b": second, "c": third}
    async with serving(ScriptedUpstream(script=_by_query(answers))) as up:
        gw = await make_gateway(upstream=up.url)
        for q in "abcabc":
            raw = await send_raw(gw.port, _get_q(q))
            ((status, headers, body),) = parse_answers(raw)
            want = {"a": (200, "s=alice", b"ok"), "b": (404, None, b"no" + inner)}.get(
                q, (200, None, b"abc")
            )
            assert (status, headers.get("set-cookie"), body) == want, (q, raw)


@pytest.mark.parametrize("split", [False, True])
async def test_an_interim_answer_then_the_final_head_relays_only_the_final(
    make_gateway, split
) -> None:
    """103 or 100 before the final answer, in the same read or in the next one: the client
    gets the final head (never the 1xx's headers), and a later answer with the same final
    bytes but no 1xx relays the same head."""
    final = b"HTTP/1.1 200 OK\r\nSet-Cookie: s=%s\r\nContent-Length: 2\r\n\r\nok"
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"

    async def reply(q: bytes, writer: asyncio.StreamWriter) -> None:
        if q.startswith(b"i"):
            writer.write(early)
            if split:
                await writer.drain()
                await asyncio.sleep(0.05)  # the final head in a read of its own
        writer.write(final % q)

    async with _upstream(reply) as url:
        gw = await make_gateway(upstream=url)
        for q in ("i1", "p1", "i2", "p2", "i1"):
            ((status, headers, body),) = parse_answers(await send_raw(gw.port, _get_q(q)))
            assert (status, headers.get("set-cookie"), body) == (200, f"s={q}", b"ok"), q
            assert "link" not in headers, q


async def test_a_head_split_over_two_reads_is_relayed_as_the_whole_one(make_gateway) -> None:
    """The same answer sent whole and split (at every kind of place, before and inside its
    blank line): one relayed head, hop-by-hop headers dropped alike on memo hit and miss."""
    answer = (
        b"HTTP/1.1 200 OK\r\nConnection: x-foo\r\nX-Foo: hop\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nok"
    )
    blank = answer.index(b"\r\n\r\n")
    cuts = {"whole": None, "line": 20, **{f"blank{i}": blank + i for i in (1, 2, 3)}}

    async def reply(q: bytes, writer: asyncio.StreamWriter) -> None:
        cut = cuts[q.decode()]
        if cut is not None:
            writer.write(answer[:cut])
            await writer.drain()
            await asyncio.sleep(0.05)  # the rest in a read of its own
        writer.write(answer if cut is None else answer[cut:])

    async with _upstream(reply) as url:
        gw = await make_gateway(upstream=url)
        raws = [await send_raw(gw.port, _get_q(q)) for q in [*cuts, "whole", "line"]]
    assert len(set(raws)) == 1, raws
    head = raws[0].partition(b"\r\n\r\n")[0].lower()
    assert b"set-cookie: s=1" in head
    for hop in (b"x-foo", b"keep-alive:", b"proxy-connection"):
        assert hop not in head, raws[0]
