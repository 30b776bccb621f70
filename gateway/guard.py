"""The request guard: one canonical path from the raw request target, or a rejection.

The canonical path is what the policy decides on, what the audit line records and what is
forwarded upstream, byte for byte. Anything that could be read two ways by two parsers is
rejected (400) instead of normalised: dot-segments in any spelling, encoded ``/`` ``\\`` ``%``,
empty segments, ``;`` parameters, fragments, control characters, bad percent escapes, bytes that
are not UTF-8, absolute- and authority-form targets, ``CONNECT``/``TRACE`` and method-override
headers. The query string never takes part in the decision and is passed through unchanged.

This module is pure: it imports nothing from aiohttp's server side.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Protocol

from .errors import BadRequest, HeadersTooLarge

REJECTED_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method")
# Other spellings of "who is this" that services behind proxies are known to trust, besides
# the gateway's own X-Authenticated-User/-Roles.
IDENTITY_HEADERS = ("Remote-User", "X-Remote-User", "X-User", "X-Forwarded-User")


def fold_name(name: str) -> str:
    """A header name as a service that folds punctuation reads it (CGI and FastCGI turn
    ``-`` and ``.`` into ``_``; some frameworks then drop it): lower case, no ``-_.``."""
    return name.lower().replace("-", "").replace("_", "").replace(".", "")


_FOLDED_OVERRIDES = frozenset(fold_name(h) for h in OVERRIDE_HEADERS)
_FOLDED_IDENTITY = frozenset(fold_name(h) for h in IDENTITY_HEADERS)


def is_override_lookalike(folded: str) -> bool:
    """True for a folded header name a service could read as a method override."""
    return folded in _FOLDED_OVERRIDES


def claims_identity(folded: str) -> bool:
    """True for a folded header name a service could read as the authenticated identity:
    ``X-Authenticated-*`` in any spelling, or one of :data:`IDENTITY_HEADERS`."""
    return folded.startswith("xauthenticated") or folded in _FOLDED_IDENTITY


def is_gateway_path(path: str) -> bool:
    """``/-`` and everything below it belong to the gateway, never to the upstream."""
    return path == "/-" or path.startswith("/-/")


# RFC 3986 pchar without ';' (path parameters are rejected) and without '%' (handled apart).
_PCHAR = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,=" + ":@")
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,=:@]+)*/?")
_QUERY_OK = re.compile(r"[\x21-\x7e]*")
_HEX = frozenset("0123456789abcdefABCDEF")
# Bytes that must never appear in a segment once decoded.
_FORBIDDEN_DECODED = {0x2F: "encoded '/'", 0x5C: "encoded '\\'", 0x25: "encoded '%'"}


@dataclass(frozen=True, slots=True)
class Target:
    """The guard's verdict on an acceptable request target."""

    path: str  # canonical, percent-encoded: decided on, logged, forwarded
    segments: tuple[str, ...]  # decoded segments of ``path``, what patterns match against
    query: str  # raw query string without '?', '' when absent
    # Made once (targets are remembered and repeat): what the request line upstream carries,
    # and whether the path is the gateway's own (``/-``, ``/-/…``).
    wire: bytes = field(init=False, repr=False, compare=False)
    own: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wire", self.path_qs.encode())
        object.__setattr__(self, "own", is_gateway_path(self.path))

    @property
    def path_qs(self) -> str:
        """The canonical path with the untouched query string, as sent upstream."""
        return f"{self.path}?{self.query}" if self.query else self.path


class Rejected(BadRequest):
    """The guard refused the request; ``code`` names the reason class (metrics label)."""

    audit_decision = "reject"


class HeaderLookup(Protocol):
    """What the guard reads of headers (a ``Mapping[str, str]`` fits)."""

    def get(self, key: str, /) -> str | None:
        """The value of a header (any case), or None."""
        ...

    def __contains__(self, key: object, /) -> bool:
        """Whether a header is present (any case)."""
        ...


def check_method(method: str, headers: HeaderLookup) -> None:
    """Refuse tunnelling/echo methods, methods not in upper case and every method-override
    header."""
    if method in REJECTED_METHODS:
        raise Rejected(f"method {method} is not allowed through the gateway", code="method")
    if not method.isupper():
        # Rules name methods in upper case and services often upper-case what they get, so
        # "delete" would be decided as an unknown method and then run as DELETE. llhttp
        # refuses such a request line; a method given in a header (decision mode) must too.
        raise Rejected(f"method {method[:20]!r} is not in upper case", code="method")
    for name in OVERRIDE_HEADERS:
        if name in headers:
            raise Rejected(f"method-override header {name} is not allowed", code="method_override")


def check_framing(headers: HeaderLookup) -> None:
    """Only ``chunked`` is accepted as a transfer coding: anything else would be dropped on
    the way upstream and the upstream would read the coded bytes as the body."""
    te = headers.get("Transfer-Encoding")
    if te is not None and te.strip().lower() != "chunked":
        raise Rejected(
            f"transfer coding {te.strip()[:40]!r} is not accepted (only chunked)",
            code="transfer_coding",
        )


def check_header_sizes(raw_headers: tuple[tuple[bytes, bytes], ...], limit: int) -> None:
    """431 for any header over ``limit`` bytes, except ``Authorization``: an oversize
    credential is a bad credential (401, decided by the authenticator), not a framing error."""
    for name, value in raw_headers:
        if len(value) + len(name) > limit and name.lower() != b"authorization":
            raise HeadersTooLarge(f"header {name.decode('latin-1')[:64]} is over {limit} bytes")


def canonical_target(raw: str) -> Target:
    """Turn the raw request target into a :class:`Target` or raise :class:`Rejected`."""
    if not raw.startswith("/"):
        if raw == "*":
            raise Rejected("asterisk-form request target is not allowed", code="target_form")
        raise Rejected(
            "only origin-form request targets ('/path') are allowed "
            "(absolute- and authority-form are refused)",
            code="target_form",
        )
    if "#" in raw:
        raise Rejected("a fragment ('#') is not allowed in the request target", code="fragment")
    path, sep, query = raw.partition("?")
    if sep and not _QUERY_OK.fullmatch(query):
        raise Rejected("control, space or non-ASCII character in the query string", code="query")
    if _PLAIN_PATH.fullmatch(path) and "/." not in path:
        # Fast path: nothing encoded, no dot segments, no empty segments: already canonical.
        segments = tuple(path[1:].split("/")) if path != "/" else ()
        return Target(path, segments, query)
    segments = _decode_segments(path)
    canonical = "/" + "/".join(_encode(s) for s in segments) if segments else "/"
    return Target(canonical, segments, query)


def _decode_segments(path: str) -> tuple[str, ...]:
    if path == "/":
        return ()
    raw_segments = path[1:].split("/")
    out: list[str] = []
    last = len(raw_segments) - 1
    for i, seg in enumerate(raw_segments):
        if seg == "":
            if i == last:  # a single trailing slash is kept: '/a/' is not '/a'
                out.append("")
                continue
            raise Rejected("empty path segment ('//') is not allowed", code="empty_segment")
        decoded = _decode_segment(seg)
        if decoded in (".", ".."):
            raise Rejected(
                "dot-segments ('.', '..' in any spelling) are not allowed", code="dot_segment"
            )
        out.append(decoded)
    return tuple(out)


def _decode_segment(seg: str) -> str:
    buf = bytearray()
    i, n = 0, len(seg)
    while i < n:
        ch = seg[i]
        if ch == "%":
            hexpair = seg[i + 1 : i + 3]
            if len(hexpair) != 2 or not all(c in _HEX for c in hexpair):
                raise Rejected("invalid percent escape in path", code="bad_escape")
            byte = int(hexpair, 16)
            if byte in _FORBIDDEN_DECODED:
                raise Rejected(
                    f"{_FORBIDDEN_DECODED[byte]} in path is not allowed", code="encoded_separator"
                )
            if byte < 0x20 or byte == 0x7F:
                raise Rejected("encoded control character in path", code="control_char")
            buf.append(byte)
            i += 3
            continue
        if ch == ";":
            raise Rejected("';' path parameters are not allowed", code="path_param")
        if ch == "\\":
            raise Rejected("'\\' in path is not allowed", code="encoded_separator")
        if ch not in _PCHAR:
            if ord(ch) < 0x20 or ord(ch) == 0x7F:
                raise Rejected("control character in path", code="control_char")
            raise Rejected(f"character {ch!r} must be percent-encoded in a path", code="bad_char")
        buf.append(ord(ch))
        i += 1
    try:
        return buf.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(
            "path is not valid UTF-8 once decoded (or uses an overlong form)", code="bad_utf8"
        ) from None


def _encode(segment: str) -> str:
    return "".join(c if c in _PCHAR else _pct(c) for c in segment)


def _pct(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def check_client_headers(raw_headers: tuple[tuple[bytes, bytes], ...]) -> None:
    """400 for a check request carrying a header the service could read as an identity or a
    method override, in any spelling a punctuation-folding service reads as one.

    Proxy mode drops these before forwarding; in decision mode the front proxy forwards the
    client's headers itself, so refusing the check is the only way to keep them from the
    service. (The shipped nginx and Caddy configs also strip the common ones.)
    """
    for raw_name, _ in raw_headers:
        refusal = _REFUSED.get(raw_name, _UNSEEN)
        if refusal is _UNSEEN:
            refusal = _refusal_of(raw_name)
        if refusal is not None:
            code, why = refusal
            name = raw_name.decode("latin-1")
            raise Rejected(why.format(name=name), code=code)


# Header name (as sent) -> None, or why a check carrying it is refused; names repeat.
_REFUSED: dict[bytes, tuple[str, str] | None] = {}
_REFUSED_MAX = 4096  # names, each at most _NAME_CACHED bytes: at most ~256 KiB of keys
_NAME_CACHED = 64
_UNSEEN: tuple[str, str] = ("", "")


def _refusal_of(raw_name: bytes) -> tuple[str, str] | None:
    folded = fold_name(raw_name.decode("latin-1"))
    refusal: tuple[str, str] | None = None
    if is_override_lookalike(folded):
        refusal = ("method_override", "method-override header {name} is not allowed")
    elif claims_identity(folded):
        refusal = (
            "identity_header",
            "header {name} claims an identity; only the gateway asserts who the user is",
        )
    if len(_REFUSED) < _REFUSED_MAX and len(raw_name) <= _NAME_CACHED:
        _REFUSED[raw_name] = refusal
    return refusal
