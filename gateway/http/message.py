"""What both sides of the HTTP layer share: header lookup, status lines, the Date header,
JSON error bodies. Pure: no sockets here."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

JSON_TYPE = "application/json; charset=utf-8"
RawHeaders = list[tuple[bytes, bytes]]

REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
STATUS_LINES: dict[int, bytes] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in REASONS.items()
}
NO_BODY_STATUS = frozenset({204, 304})

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones only the connection itself may carry.
HOP_BY_HOP = frozenset(
    h.encode()
    for h in (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``; a reason phrase of the upstream's is kept when given."""
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


class _DateCache:
    """The HTTP Date value, formatted once a second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self.value


http_date = _DateCache()


def json_body(doc: Any) -> bytes:
    """A JSON document as UTF-8 bytes."""
    return json.dumps(doc, ensure_ascii=False).encode()


def error_body(status: int, code: str, message: str) -> bytes:
    """The gateway's error shape: ``{"error": ..., "status": N, "code": ...}``."""
    return json_body({"error": message, "status": status, "code": code})


class Headers:
    """Request or response headers: raw lines in order, plus a case-insensitive lookup; never
    changed once made (a connection hands the same object to requests that repeat the lines).

    Repeated fields are joined with ``", "`` in the lookup (RFC 9110 5.3), which is what every
    list-valued header means; a repeated singleton (``Authorization``) then fails to parse,
    which is the safe reading.
    """

    __slots__ = ("raw", "_map", "get_raw")

    def __init__(self, raw: RawHeaders | None = None) -> None:
        """Headers from parsed lines (the parser's, taken as they are), or none yet."""
        self.raw: RawHeaders = [] if raw is None else raw
        m: dict[bytes, bytes] = {}
        for name, value in self.raw:
            low = name.lower()
            old = m.get(low)
            m[low] = value if old is None else old + b", " + value
        self._map = m
        # The raw value of an already lower-cased name: the dict's own lookup, the hot
        # path's most frequent call, without a Python frame around it.
        self.get_raw: Callable[[bytes], bytes | None] = m.get

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of ``name`` (any case), decoded as Latin-1, or ``default``."""
        value = self._map.get(name.lower().encode())
        return default if value is None else value.decode("latin-1")

    def getall_raw(self, low_name: bytes) -> list[bytes]:
        """Every raw value of an already lower-cased name, one per header line."""
        return [v for k, v in self.raw if k.lower() == low_name]

    def has_any(self, low_names: frozenset[bytes]) -> bool:
        """True when any of these lower-cased names is present."""
        return not low_names.isdisjoint(self._map)

    def getall(self, name: str, default: Iterable[str] = ()) -> list[str]:
        """Every value of ``name``, one per header line (``default`` when there is none)."""
        low = name.lower().encode()
        found = [v.decode("latin-1") for k, v in self.raw if k.lower() == low]
        return found if found else list(default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower().encode() in self._map

    def __iter__(self) -> Iterator[str]:
        return (k.decode("latin-1") for k in self._map)

    def __len__(self) -> int:
        return len(self._map)

    def items(self) -> list[tuple[str, str]]:
        """Decoded header lines in order."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw]


_NO_TOKENS: frozenset[bytes] = frozenset()


def connection_tokens(value: bytes | None) -> frozenset[bytes]:
    """Lower-cased header names listed in a ``Connection`` value."""
    if not value or value == b"keep-alive" or value == b"close":
        return _NO_TOKENS
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
