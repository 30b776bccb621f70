"""What forwarding means, whichever client carries it.

Request headers lose the hop-by-hop set (and every header named in ``Connection``),
``Authorization``, every client-supplied ``X-Authenticated-*`` and forwarding header; the
gateway then sets ``X-Authenticated-User``/``-Roles`` and ``X-Forwarded-For/-Proto/-Host``.
Response headers lose the hop-by-hop set too. The query string is passed through unchanged.
Upstream unreachable → 502, upstream too slow → 504, both before any byte of the answer left.
The implementation is :class:`gateway.upstream.PoolForwarder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from yarl import URL

from .exchange import Exchange
from .guard import Target
from .policy import User

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade"))
# Never passed on from the client: credentials, and headers only the gateway may assert.
STRIP_REQUEST = HOP_BY_HOP | {"authorization", "host", "forwarded", "x-forwarded-for",
                              "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
                              "content-length", "expect"}
IDENTITY_PREFIX = "x-authenticated-"
CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where and how to forward."""

    url: URL
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    pool_size: int = 256


class Forwarder(Protocol):
    """A way to send an authorized request upstream and stream the answer back."""

    async def start(self) -> None:
        """Open what forwarding needs (called once the event loop runs)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    async def forward(self, ex: Exchange, target: Target, user: User | None, client: str,
                      body: bytes | None) -> int:
        """Forward ``ex`` as ``target`` for ``user``; ``body`` when already read.
        Returns the status answered."""
        ...
