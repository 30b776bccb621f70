"""The answer's head as the client gets it, made from the upstream's and remembered.

The relayed head is a pure function of the answer's head bytes and two facts about the
request (HEAD or not, HTTP/1.1 or 1.0): remembered per pool, since an upstream repeats its
heads (until the Date changes), and looked up by those bytes. The key runs to the first blank
line in them, so it holds the whole head (a head cannot contain a blank line), and llhttp,
starting each exchange in the same state, parses equal bytes alike. Only when they begin with
the status line: llhttp skips CR/LF before it, and a key of blank lines before the head held
none of it (the review of this memo found two answers sharing one key that way); and not
after a 1xx, whose head the key would be.
"""

from __future__ import annotations

import httptools

from ..errors import BadGateway
from .message import HOP_BY_HOP, NO_BODY_STATUS, REASONS, connection_tokens, status_line

Head = tuple[bytes, bool, bool, bool]  # see make_head

_SKIP_RESPONSE = HOP_BY_HOP | {b"content-length"}
_NONE: frozenset[bytes] = frozenset()
_STANDARD = {
    (code, phrase): line for code, phrase in REASONS.items() for line in (status_line(code),)
}


_HEADS_MAX = 256  # remembered relayed heads per pool (a new Date makes a new one each second)
_HEAD_MEMO_MAX = 4096  # head bytes: at most ~2 MiB of keys and heads remembered per pool
# An answer's final head (its lines, as read), and the bytes before its end counted in whole
# reads (any 1xx included): past this, 502.
HEAD_MAX = 64 * 1024


def make_head(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]], head_only: bool, http11: bool
) -> Head:
    """The answer's head as relayed to the client, without its ``Connection`` line and the
    blank line: hop-by-hop headers and those the upstream's ``Connection`` names dropped, the
    framing re-made. Returns (head, chunked out, body ends with the close, client
    connection closes after it)."""
    conn_values = [v for n, v in headers if len(n) == 10 and n.lower() == b"connection"]
    named = connection_tokens(b",".join(conn_values)) if conn_values else _NONE
    out = [_STANDARD.get((status, reason)) or status_line(status, reason or None)]
    length: bytes | None = None
    chunked_in = chunked_out = until_eof = closes = False
    for name, value in headers:
        low = name.lower()
        if low in _SKIP_RESPONSE or low in named:
            if low == b"content-length":
                length = value
            elif low == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # re-framing would drop the other coding (gzip): the bytes would lie
                    raise BadGateway(
                        "the upstream used a transfer coding other than chunked",
                        code="upstream_malformed",
                    )
                chunked_in = True
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    no_body = head_only or status in NO_BODY_STATUS
    if head_only and length is not None:
        out.append(b"Content-Length: %s\r\n" % length)
    elif not no_body:
        if length is not None:
            out.append(b"Content-Length: %s\r\n" % length)
        elif http11:
            chunked_out = True
            out.append(b"Transfer-Encoding: chunked\r\n")
        else:
            closes = True
        until_eof = length is None and not chunked_in
    return b"".join(out), chunked_out, until_eof, closes


def relayed_head(
    heads: dict[tuple[bytes, bool, bool], Head],
    seen: bytes,
    status: int,
    after_interim: bool,
    head_only: bool,
    http11: bool,
) -> Head:
    """The relayed head of the final answer whose head ends in ``seen`` (the exchange's bytes
    so far), from ``heads`` (the pool's memo) when it can be."""
    if after_interim or not seen.startswith(b"HTTP/"):  # after a 1xx, or after blank lines
        return make_head(status, *read_head(seen), head_only, http11)
    end = seen.find(b"\r\n\r\n", 0, _HEAD_MEMO_MAX + 4)
    if 0 <= end < _HEAD_MEMO_MAX:
        key = (seen[: end + 4], head_only, http11)
        known = heads.get(key)
        if known is None:
            known = make_head(status, *read_head(key[0]), head_only, http11)
            if len(heads) >= _HEADS_MAX:
                heads.clear()
            heads[key] = known
        return known
    return make_head(status, *read_head(seen), head_only, http11)


class _HeadRead(Exception):
    """Stops a :class:`_HeadReader` at the final answer's head."""


class _HeadReader:
    """The status reason and header lines of an answer's final head.

    The connection's own parser has no per-header callbacks: each costs a call from C into
    Python, five or more an answer, and the relayed head is remembered by the head's bytes,
    so on most answers nothing reads them. When it must be made, this reads them from the
    same bytes with a parser of its own: llhttp from its initial state, as the connection's
    parser starts each exchange, so both parse them alike."""

    __slots__ = ("parser", "reason", "headers", "size")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.size = 0  # of the head being read: "HTTP/1.1 200 ", the lines, their ": " and CRLFs

    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []
        self.size = 17

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        self.size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.size += len(name) + len(value) + 4
        if self.size > HEAD_MAX:
            raise BadGateway(
                f"the upstream's answer head is over {HEAD_MAX} bytes", code="upstream_malformed"
            )

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() >= 200:
            raise _HeadRead


def read_head(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(reason, header lines) of the final head in ``data``, an exchange's first bytes."""
    reader = _HeadReader()
    try:
        reader.parser.feed_data(data)
    except httptools.HttpParserError as exc:
        if isinstance(exc.__context__, _HeadRead):
            return reader.reason, reader.headers
        if isinstance(exc.__context__, BadGateway):
            raise exc.__context__ from None
    # the connection's parser read a final head in these bytes: this one must too
    raise BadGateway("the upstream sent a malformed answer", code="upstream_malformed")
