"""Write-side flow control for a transport: the protocol's pause/resume callbacks set it,
writers ``await drain()`` while the peer is slow to read."""

from __future__ import annotations

import asyncio


class FlowControl:
    """Tracks whether the transport asked us to stop writing, and since when."""

    __slots__ = ("transport", "paused_since", "_waiter", "_lost")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused_since = 0.0  # loop time of the pause; 0 while writing is allowed
        self._waiter: asyncio.Future[None] | None = None
        self._lost = False

    def pause(self, now: float) -> None:
        self.paused_since = now or 1e-9

    def resume(self) -> None:
        self.paused_since = 0.0
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self) -> None:
        self._lost = True
        self.paused_since = 0.0  # nothing to wait for any more
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("connection lost"))
            w.exception()  # retrieved: the waiter re-raises it

    async def drain(self) -> None:
        """Return once the peer has room again (at once when it has)."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self.paused_since:
            return
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)
