"""One upstream connection: its answers parsed by httptools and relayed straight into the
client connection (the pool that keeps these is :mod:`gateway.http.pool`).

Framing is re-made on every hop and never trusted across it:

* request bodies are forwarded byte for byte as the client sent them (never decoded; a
  ``Content-Encoding`` travels with the bytes it describes); the upstream gets the client's
  ``Content-Length`` only when exactly that many bytes follow, else ``chunked``. A body that
  ends early or breaks off aborts the upstream connection: it is never reused.
* answers are parsed by llhttp; the client gets the upstream's ``Content-Length`` with exactly
  that many bytes, or our own chunked framing around the decoded chunks (``Connection: close``
  for HTTP/1.0 clients). An answer that breaks off cuts the client connection.
* an upstream connection is reused only after a complete answer that did not ask to close,
  to a request whose body was sent whole, and never after HEAD (llhttp cannot be told that a
  HEAD answer has no body) or after bytes arrived out of turn.

Slow clients slow the upstream (its socket is paused while the client's is full), they do not
fill memory. A reused connection that turns out closed is retried once on a fresh one for
idempotent requests whose body was not streamed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from ..errors import BadGateway, GatewayError, GatewayTimeout
from .flow import FlowControl
from .heads import HEAD_MAX, relayed_head
from .request import Request

if TYPE_CHECKING:
    from .body import Upload
    from .pool import Pool


class Settles(Protocol):
    """Where an exchange's outcome goes: an :class:`asyncio.Future`, or the callback path's
    exchange (:class:`gateway.fastpath.FastExchange`), which has no task to wake."""

    def done(self) -> bool: ...
    def set_result(self, status: int, /) -> None: ...
    def set_exception(self, exc: BaseException, /) -> None: ...
    def exception(self) -> BaseException | None: ...


class Stale(Exception):
    """The connection closed before any byte of the answer: safe to retry idempotent ones."""


class ClientGone(ConnectionError):
    """The client went away while its answer was being relayed."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Request | None = None
        self.done: Settles | None = None
        self.relayed: Callable[[], None] | None = None
        self.active = 0.0  # loop time data last moved; 0 while idle
        self.awaiting_client = False  # an upload waits for the client's next bytes
        self.upload: Upload | None = None  # the client body being streamed to this upstream
        self.broken = False
        self.complete = False
        self.received_any = False
        # The exchange's reads until the final answer's head has been parsed (its reason and
        # header lines are read from them, see heads.py), and how many bytes they hold.
        self._seen: list[bytes] = []
        self._seen_bytes = 0
        self._out: list[bytes] = []
        self._interim = False
        self._after_interim = False
        self._chunked_out = False
        self._until_eof = False
        self._status = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.flow.transport = self.transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.broken = True
        self.flow.connection_lost()
        if self.sink is not None and self._status and self._until_eof and not self.complete:
            # An answer delimited by the close is complete now.
            self._finish_body()
            self._flush()
            self._settle(self._status)
            self._relayed()
            return
        if not self.received_any:
            self._fail(Stale())
        elif not self.complete:
            self._fail(
                BadGateway("the upstream closed the connection mid-answer", code="upstream_broke")
            )

    def pause_writing(self) -> None:
        self.flow.pause(self.loop.time())

    def resume_writing(self) -> None:
        self.flow.resume()

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.complete:
            # Nothing was asked: an upstream that talks out of turn cannot be trusted to
            # stay in step with our requests.
            self.broken = True
            self.close()
            return
        self.active = self.loop.time()
        self.received_any = True
        if not self._status:  # the final answer's head is still to come (or being parsed)
            self._seen.append(data)
            self._seen_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.broken = True
            if not self.complete:  # else what follows a complete answer: never relayed
                self._fail(
                    BadGateway(
                        "the upstream switched protocols, which is not proxied",
                        code="upstream_protocol",
                    )
                )
        except httptools.HttpParserError as exc:
            self.broken = True
            if not self.complete:
                if self.sink is not None and not self.sink.started:
                    self._out.clear()  # nothing sent yet: the client gets a clean 502
                cause = exc.__context__
                self._fail(
                    cause
                    if isinstance(cause, GatewayError)
                    else BadGateway(
                        "the upstream sent a malformed answer", code="upstream_malformed"
                    )
                )
            self.abort()
        if not self._status and self._seen_bytes > HEAD_MAX:
            self._fail(
                BadGateway(
                    f"the upstream's answer head is over {HEAD_MAX} bytes",
                    code="upstream_malformed",
                )
            )
            self.abort()
        self._flush()
        if self.complete:
            # Settled only now, after the answer's last bytes were handed to the client: a
            # client found gone by that write makes the outcome ClientGone, not the status.
            self._settle(self._status)
            if self.relayed is not None:
                self._relayed()

    def _relayed(self) -> None:
        relayed = self.relayed
        if relayed is not None:
            self.relayed = None
            relayed()

    # -- httptools callbacks (no per-line ones: see heads.py)
    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request (also one begun in the read that ended the
            # first): the connection is out of step for good.
            self.broken = True
            raise BadGateway("the upstream answered twice", code="upstream_malformed")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise BadGateway(
                    "the upstream switched protocols, which is not proxied",
                    code="upstream_protocol",
                )
            self._interim = True  # 1xx answers are not relayed
            self._after_interim = True  # the final answer's head does not begin the bytes
            return
        self._status = status
        parts = self._seen
        seen = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        sink = self.sink
        if sink is None:  # a probe: only the status matters
            return
        known = relayed_head(
            self.pool.heads, seen, status, self._after_interim, sink.head_only, sink.http11
        )
        head, self._chunked_out, self._until_eof, closes = known
        if closes:
            sink.keep_alive = False  # HTTP/1.0 client, no length: the body ends with the close
        sink.status = status
        self._out.append(head + sink.connection_header() + b"\r\n")
        if sink.head_only:
            # llhttp would wait for a body the answer to HEAD does not have.
            self.broken = True
            self._finish_body()

    def on_body(self, data: bytes) -> None:
        if self.sink is None or self.complete:
            return
        if self._chunked_out:
            self._out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._out.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.complete:
            return
        if not self.parser.should_keep_alive():
            self.broken = True
        self._finish_body()

    # -- the exchange
    def _finish_body(self) -> None:
        self.complete = True
        if self._chunked_out:
            self._out.append(b"0\r\n\r\n")

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        sink = self.sink
        if sink is None:
            return
        try:
            sink.send(data)
        except ConnectionError:
            self.broken = True
            self.close()
            self._fail(ClientGone("the client went away during the answer"))

    def _settle(self, status: int) -> None:
        done = self.done
        if done is not None and not done.done():
            done.set_result(status)

    def _fail(self, exc: BaseException) -> None:
        self.broken = True
        upload = self.upload
        if upload is not None and self.awaiting_client:
            # The upload waits for a client that paused: tell it now (a 502/504), not when
            # the client sends more and the body deadline has run out on the client's name.
            upload.fail(
                exc
                if isinstance(exc, GatewayError)
                else BadGateway("the upstream closed the connection", code="upstream_broke")
            )
        done = self.done
        if done is not None and not done.done():
            done.set_exception(exc)
            done.exception()  # retrieved: the awaiter re-raises it

    def start(
        self, sink: Request | None, done: Settles, relayed: Callable[[], None] | None = None
    ) -> None:
        """Get ready for the answer to the next request, relayed into ``sink``; its status
        (or its failure) goes to ``done``; ``relayed`` is called once a complete answer's
        last bytes were written (by the read that completed it, or the close that did)."""
        self.sink = sink
        self.relayed = relayed
        self.complete = False
        self.received_any = False
        self._chunked_out = self._until_eof = self._interim = self._after_interim = False
        self._status = 0
        self._seen.clear()
        self._seen_bytes = 0
        self.active = self.loop.time()
        self.done = done

    def reset(self) -> None:
        """The exchange is over (the pool keeps or closes the connection)."""
        self.sink = None
        self.relayed = None
        self.done = None
        self.active = 0.0

    def reusable(self) -> bool:
        t = self.transport
        return (
            self.complete
            and not self.broken
            and t is not None
            and not t.is_closing()
            # an answer that came before the whole request left: what is still queued would
            # precede the next request, for an upstream that may have stopped reading it
            and not t.get_write_buffer_size()
        )

    def timed_out(self) -> None:
        self._fail(GatewayTimeout("the upstream did not answer in time"))
        self.abort()

    def abort(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
