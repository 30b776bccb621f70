"""A request body as it arrives from the client, with read-side flow control: the client's
socket stops being read while more than ``_BODY_HIGH`` bytes wait to be consumed.
``Expect: 100-continue`` is answered on the first read, that is only once the pipeline has
authenticated, authorized and size-checked the request."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .connection import Connection

_BODY_HIGH = 256 * 1024  # buffered body bytes before the socket stops being read
_BODY_LOW = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Upload(Protocol):
    """What streams a client body upstream: a :class:`Body`, or a wrapper around one."""

    async def read(self) -> bytes: ...
    def fail(self, exc: BaseException) -> None: ...


class Body:
    """A request body as it arrives: :meth:`read` gives chunks, ``b""`` at its end.

    Raises :class:`~gateway.errors.BadRequest` for a body the parser refused,
    :class:`~gateway.errors.RequestTimeout` for one that came too slowly, and
    :class:`ConnectionResetError` when the client went away before its end."""

    __slots__ = (
        "_conn",
        "_chunks",
        "_buffered",
        "_eof",
        "_exc",
        "_waiter",
        "received",
        "started_at",
        "_continue",
        "_paused",
        "_paused_at",
    )

    def __init__(self, conn: Connection, expect_continue: bool, now: float) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received = 0
        self.started_at = now
        self._continue = expect_continue
        self._paused = False
        self._paused_at = 0.0

    @property
    def complete(self) -> bool:
        """Everything was received and read."""
        return self._eof and not self._chunks

    @property
    def invited(self) -> bool:
        """False while an ``Expect: 100-continue`` client still waits for our 100: the
        gateway, not the client, is the one taking time."""
        return not self._continue

    @property
    def ended(self) -> bool:
        """Everything was received (maybe not read yet)."""
        return self._eof

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > _BODY_HIGH and not self._paused:
            self._paused = True
            self._paused_at = self._conn.loop.time()
            self._conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._eof and self._exc is None:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        """The next chunk of the body; ``b""`` once it is all read."""
        if self._continue:
            self._continue = False
            if self._exc is None:  # never invite a body that has failed already
                self._conn.write_interim(_CONTINUE)
                # the client was waiting for us: its deadlines run from the invitation
                self.started_at = self._conn.loop.time()
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        # Everything that has arrived, in one piece: fewer wake-ups and writes per body.
        chunks = self._chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self._buffered < _BODY_LOW:
            self._resume()
        return chunk

    def _resume(self) -> None:
        self._paused = False
        # The gateway was the one not reading (its upstream was slower than the client):
        # that time does not count against the client's body deadlines.
        self.started_at += self._conn.loop.time() - self._paused_at
        self._conn.resume_reading()

    @property
    def held_back(self) -> bool:
        """The gateway stopped reading this body (its buffer is full): not the client's time."""
        return self._paused

    def take_buffered(self) -> bytes:
        """Everything received and not read yet, without waiting."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._resume()
        return data
