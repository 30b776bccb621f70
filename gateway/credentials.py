"""HTTP Basic credentials: parse an ``Authorization`` value, and tell its canonical spelling.

Every malformed value is :class:`~gateway.errors.Unauthenticated` (401), never a 500: not Basic,
bad base64, not UTF-8, no colon, an empty user, control characters, over 4 KB.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from .errors import Unauthenticated

MAX_AUTH_HEADER = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str


def is_canonical(header: bytes, creds: Credentials) -> bool:
    """True when ``header`` is exactly ``Basic <standard base64 of user:password>``."""
    token = base64.b64encode(f"{creds.user}:{creds.password}".encode())
    return header == b"Basic " + token


def parse_basic(header: str | None, realm: str) -> Credentials | None:
    """``None`` when there is no header; :class:`Unauthenticated` when it is malformed."""
    if header is None:
        return None
    if len(header) > MAX_AUTH_HEADER:
        raise Unauthenticated("Authorization header too long", realm=realm)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        raise Unauthenticated("only HTTP Basic authentication is accepted", realm=realm)
    try:
        raw = base64.b64decode(token.strip(), validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        raise Unauthenticated("malformed Basic credentials", realm=realm) from None
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise Unauthenticated("malformed Basic credentials", realm=realm)
    if _CONTROL.search(text):
        raise Unauthenticated("malformed Basic credentials", realm=realm)
    return Credentials(user, password)
