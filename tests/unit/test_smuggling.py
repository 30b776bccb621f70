"""Framing across the gateway, against a raw upstream that parses framing itself.

Issue 14's class: a body transformed on the way (decompressed) while the framing announced
the original length let the rest of the body be read upstream as a second request. The
guarantees checked here, for request and answer paths alike:

* every forwarded client request arrives upstream as exactly one request, its body byte for
  byte as the client sent it (never decoded), with the gateway's identity headers only;
* every upstream answer reaches the client as exactly one answer with its body intact.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.helpers import basic, policy_doc, write_policy
from tests.rawupstream import ScriptedUpstream, parse_answers, serving

SALES = basic("sales", "imsales")["Authorization"]
TESTER = basic("tester", "testerpw")["Authorization"]
SMUGGLED = (
    b"DELETE /api/inventory?name=X-Men+1+(1991) HTTP/1.1\r\nHost: x\r\n"
    b"X-Authenticated-User: admin\r\nX-Authenticated-Roles: admin\r\n"
    b"Content-Length: 0\r\n\r\n"
)


@dataclass
class RawUpstream(ScriptedUpstream):
    """Answers every request in a chosen framing (length, chunked, or delimited by close)."""

    answer: str = "length"  # length | chunked | close
    answer_body: bytes = b'{"ok": true}'

    def __post_init__(self) -> None:
        self.script = lambda _seen: self.answer_bytes()

    def closes_after(self) -> bool:
        return self.answer == "close"

    def answer_bytes(self) -> bytes:
        body = self.answer_body
        if self.answer == "length":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        if self.answer == "chunked":
            mid = len(body) // 2
            parts = [p for p in (body[:mid], body[mid:]) if p]
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % chunks
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n%s" % body


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    async with serving(RawUpstream()) as up:
        yield up


async def send_raw(port: int, data: bytes, *, close: bool = True) -> bytes:
    """Send bytes, read until the gateway closes (or 5 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return (
            await asyncio.wait_for(reader.read(1 << 20), 5)
            if not close
            else await asyncio.wait_for(_read_all(reader), 5)
        )
    finally:
        writer.close()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while chunk := await reader.read(65536):
        out += chunk
    return out


def request(
    method: str,
    target: str,
    auth: str,
    body: bytes,
    *,
    encoding: str | None,
    framing: str,
    split: int = 7,
) -> bytes:
    head = [
        f"{method} {target} HTTP/1.1",
        "Host: gateway.test",
        f"Authorization: {auth}",
        "Connection: close",
    ]
    if encoding:
        head.append(f"Content-Encoding: {encoding}")
    if framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        parts = [body[i : i + split] for i in range(0, len(body), max(1, split))]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def compress(encoding: str | None, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    return data


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_body_with_a_smuggled_request_reaches_the_upstream_as_one_request(
    make_gateway, raw_upstream, encoding
) -> None:
    """The issue's reproduction, byte for byte: on the removed aiohttp server mode the
    upstream received the GET and a separate DELETE as 'admin'."""
    gw = await make_gateway(upstream=raw_upstream.url)
    body = compress(encoding, b"X" * 140 + SMUGGLED)
    data = (
        f"GET /api/inventory HTTP/1.1\r\nHost: gw\r\nAuthorization: {SALES}\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode() + body
    answers = parse_answers(await send_raw(gw.port, data))
    assert [a[0] for a in answers] == [200]
    # a second request on the pooled connection would show up here
    assert (await gw.get("/api/inventory", headers={"Authorization": SALES})).status == 200
    assert [s.method for s in raw_upstream.seen] == ["GET", "GET"], raw_upstream.seen
    first = raw_upstream.seen[0]
    assert first.body == body  # the compressed bytes, as sent
    assert first.header("Content-Encoding") == [encoding]
    assert first.header("Content-Length") == [str(len(body))]
    assert first.header("X-Authenticated-User") == ["sales"]
    assert raw_upstream.errors == []


async def test_legitimate_gzip_upload_is_forwarded_still_compressed(
    make_gateway, raw_upstream
) -> None:
    gw = await make_gateway(upstream=raw_upstream.url)
    body = gzip.compress(b'{"hello": "world"}' * 100)
    data = request("POST", "/test/upload", TESTER, body, encoding="gzip", framing="length")
    assert [a[0] for a in parse_answers(await send_raw(gw.port, data))] == [200]
    assert raw_upstream.seen[0].body == body
    assert gzip.decompress(raw_upstream.seen[0].body).startswith(b'{"hello"')


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", [20_000, 65_536, 300_000])
async def test_a_body_that_came_with_its_head_reaches_the_upstream_as_one_request(
    make_gateway, raw_upstream, framing: str, size: int
) -> None:
    # Sent in one write, the body has wholly arrived when the request is forwarded: the
    # gateway sends it with the head (re-framed with its length), never as two requests.
    gw = await make_gateway(upstream=raw_upstream.url)
    body = bytes(range(256)) * (size // 256) + SMUGGLED
    data = request("POST", "/test/upload", TESTER, body, encoding=None, framing=framing, split=999)
    assert [a[0] for a in parse_answers(await send_raw(gw.port, data))] == [200]
    assert len(raw_upstream.seen) == 1
    seen = raw_upstream.seen[0]
    assert seen.body == body
    if size < 100_000:  # in the socket in full before the gateway reads: sent as one piece
        assert seen.header("Content-Length") == [str(len(body))]
        assert seen.header("Transfer-Encoding") == []
    else:  # may be read in parts: then streamed, chunked if the client chunked it
        framed = seen.header("Content-Length") + seen.header("Transfer-Encoding")
        assert framed in ([str(len(body))], ["chunked"])


async def test_a_chunked_body_over_the_limit_that_came_whole_is_413(
    make_gateway, raw_upstream
) -> None:
    gw = await make_gateway(upstream=raw_upstream.url, max_body=1000)
    data = request("POST", "/test/upload", TESTER, b"b" * 5000, encoding=None, framing="chunked")
    assert [a[0] for a in parse_answers(await send_raw(gw.port, data))] == [413]
    assert raw_upstream.seen == []


async def test_identity_header_lookalikes_never_reach_the_upstream(
    make_gateway, raw_upstream
) -> None:
    gw = await make_gateway(upstream=raw_upstream.url)
    spoof = [
        "X-Authenticated-User",
        "X-Authenticated.User",
        "X-AuthenticatedUser",
        "x-authenticated_roles",
        "X.Authenticated.Roles",
        "XAuthenticatedUser",
        "X-AUTHENTICATED-ROLES",
    ]
    head = "".join(f"{name}: admin\r\n" for name in spoof)
    data = (
        f"GET /test/x HTTP/1.1\r\nHost: t\r\nAuthorization: {TESTER}\r\n{head}"
        f"Connection: close\r\n\r\n"
    ).encode()
    assert [a[0] for a in parse_answers(await send_raw(gw.port, data))] == [200]
    names = [k.lower() for k, _ in raw_upstream.seen[0].headers]
    squashed = [n.replace("-", "").replace("_", "").replace(".", "") for n in names]
    assert [n for n in squashed if n.startswith("xauthenticated")] == [
        "xauthenticateduser",
        "xauthenticatedroles",
    ]
    assert raw_upstream.seen[0].header("X-Authenticated-User") == ["tester"]


async def test_other_identity_and_override_spellings_never_reach_the_upstream(
    make_gateway, raw_upstream
) -> None:
    """The exact override names are refused (400); the spellings a punctuation-folding
    upstream reads the same way are dropped, as are other proxies' identity headers."""
    gw = await make_gateway(upstream=raw_upstream.url)
    spoof = ["X-HTTP-Method.Override", "X.Method.Override", "Remote-User", "X-Forwarded-User"]
    spoof += ["X-User", "X-Remote-User", "Remote.User", "X-Forwarded.User"]
    head = "".join(f"{name}: DELETE\r\n" for name in spoof)
    data = (
        f"GET /test/x HTTP/1.1\r\nHost: t\r\nAuthorization: {TESTER}\r\n{head}"
        f"Connection: close\r\n\r\n"
    ).encode()
    assert [a[0] for a in parse_answers(await send_raw(gw.port, data))] == [200]
    names = {k.lower() for k, _ in raw_upstream.seen[0].headers}
    assert not names & {n.lower() for n in spoof}, names


@pytest.mark.parametrize("target", ["/-", "/-/", "/-/anything", "/-/healthz/x"])
async def test_the_gateway_owns_dash_and_never_forwards_it(
    make_gateway, raw_upstream, tmp_path, target
) -> None:
    """Even a user the policy grants everything (``/**`` and ``/-/**``) never reaches the
    upstream under /-: those paths are answered by the gateway (404 when no endpoint)."""
    everything = {"allow": [{"methods": ["*"], "paths": ["/**", "/-/**"]}]}
    policy = write_policy(
        tmp_path / "all.yaml",
        policy_doc({"root": ("rootpw", ["everything"])}, {"everything": everything}),
    )
    gw = await make_gateway(upstream=raw_upstream.url, policy=policy)
    for method in ("GET", "POST"):
        resp = await gw.request(method, target, headers=basic("root", "rootpw"))
        assert resp.status in (400, 404), (method, target, resp.status)
        assert (await resp.json())["status"] == resp.status
    assert raw_upstream.seen == []


@hsettings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity", "gzip, gzip"]),
    framing=st.sampled_from(["length", "chunked"]),
    payload=st.binary(min_size=0, max_size=3000),
    smuggle=st.booleans(),
    split=st.integers(min_value=1, max_value=700),
    answer=st.sampled_from(["length", "chunked", "close"]),
    answer_body=st.binary(min_size=0, max_size=2000),
)
async def test_every_request_arrives_as_exactly_one_and_every_answer_whole(
    make_gateway,
    raw_upstream,
    method,
    encoding,
    framing,
    payload,
    smuggle,
    split,
    answer,
    answer_body,
) -> None:
    gw = getattr(raw_upstream, "_gw", None)
    if gw is None:
        gw = raw_upstream._gw = await make_gateway(upstream=raw_upstream.url)  # type: ignore
    raw_upstream.seen.clear()
    raw_upstream.answer, raw_upstream.answer_body = answer, answer_body
    plain = payload + (SMUGGLED if smuggle else b"")
    body = compress(encoding if encoding in ("gzip", "deflate") else None, plain)
    data = request(
        method, "/test/p?q=1", TESTER, body, encoding=encoding, framing=framing, split=split
    )
    answers = parse_answers(await send_raw(gw.port, data))
    assert len(answers) == 1
    status, headers, got = answers[0]
    assert status == 200, (status, got[:200])
    assert got == answer_body
    assert ("content-length" in headers) != ("transfer-encoding" in headers)
    assert len(raw_upstream.seen) == 1, raw_upstream.seen
    seen = raw_upstream.seen[0]
    assert (seen.method, seen.target) == (method, "/test/p?q=1")
    assert seen.body == body
    if encoding:
        assert seen.header("Content-Encoding") == [encoding]
    assert seen.header("X-Authenticated-User") == ["tester"]
    assert raw_upstream.errors == []
