"""The failed-login throttle, and one throttle for all workers of ``--workers N``.

:class:`FailureThrottle`: exponential back-off on failed logins, per client address and per
address+user (the limits are in :mod:`gateway.auth`'s docstring).

Each worker is a process of its own, and the kernel spreads a client's connections over them
(``SO_REUSEPORT``): with a throttle per worker, a password guesser would get N times the
guesses before the back-off starts. So the supervisor keeps the throttle that counts, and each
worker talks to it over a ``SOCK_SEQPACKET`` socket pair (one message per datagram, JSON):

    worker -> supervisor   ["check", id, address, user]    answered with [id, seconds to wait]
                           ["failed", address, user]       no answer
                           ["ok", address, user]           no answer (a success)

A worker asks only on the uncached path, just before a bcrypt check (which costs far more than
the round trip), and keeps its own throttle too, so that it goes on throttling on its own when
the supervisor does not answer (it waits :data:`ANSWER_WITHIN` at most, logs it once, and
uses its own): a degraded link never lets a request through that a single worker would refuse.
The supervisor's side never blocks: an answer that does not fit in the socket buffer is
dropped, and the worker's own throttle decides.

Users are sent as given up to :data:`_USER_MAX` characters, as a hash beyond (a key only has
to be equal for equal users).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Iterator

from .errors import TooManyRequests

log = logging.getLogger(__name__)

THROTTLE_FD_ENV = "GATEWAY_THROTTLE_FD"
ANSWER_WITHIN = 0.5  # seconds a worker waits for the supervisor's answer
_MESSAGE_MAX = 4096
_USER_MAX = 256
_BLOCKED_MAX = 10_000


def _wire_user(user: str) -> str:
    if len(user) <= _USER_MAX:
        return user
    return "sha256:" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class FailureThrottle:
    """Exponential back-off on failed logins, per client address and per address+user."""

    shared = False  # True for a worker's throttle that asks its supervisor's too
    unanswered = 0  # questions to the supervisor that went unanswered (shared only)

    def __init__(
        self,
        *,
        per_user: int = 5,
        per_address: int = 20,
        base: float = 1.0,
        cap: float = 300.0,
        window: float = 900.0,
        max_entries: int = 100_000,
    ) -> None:
        self._limits = {"user": per_user, "addr": per_address}
        self._base, self._cap, self._window, self._max = base, cap, window, max_entries
        self._state: OrderedDict[tuple[str, ...], tuple[int, float, float]] = OrderedDict()

    def wait(self, address: str, user: str) -> float:
        """Seconds either key still backs off; 0 when neither does."""
        now = time.monotonic()
        left = 0.0
        for key in (("addr", address), ("user", address, user)):
            state = self._state.get(key)
            if state is not None and state[2] - now > left:
                left = state[2] - now
        return left

    def check(self, address: str, user: str) -> None:
        """Raise :class:`TooManyRequests` while either key is backing off."""
        left = self.wait(address, user)
        if left > 0:
            raise TooManyRequests("too many failed logins; retry later", retry_after=int(left) + 1)

    def close(self) -> None:
        """Nothing to release here (a shared throttle closes its link)."""

    async def admit(self, address: str, user: str) -> None:
        """:meth:`check`, where a shared throttle asks the others first (see
        :class:`gateway.throttle.SharedThrottle`)."""
        self.check(address, user)

    def failed(self, address: str, user: str) -> None:
        now = time.monotonic()
        for key in (("addr", address), ("user", address, user)):
            count, last, _ = self._state.get(key, (0, now, 0.0))
            if now - last > self._window:
                count = 0
            count += 1
            over = count - self._limits[key[0]]
            until = now + min(self._cap, self._base * 2 ** (over - 1)) if over > 0 else 0.0
            self._state[key] = (count, now, until)
            self._state.move_to_end(key)
        while len(self._state) > self._max:
            self._state.popitem(last=False)

    def succeeded(self, address: str, user: str) -> None:
        self._state.pop(("user", address, user), None)


# -- the supervisor's side -------------------------------------------------------------------


class ThrottleService:
    """The shared throttle, served to each worker slot over its own socket pair; driven by the
    supervisor's select loop (:meth:`sockets`, :meth:`serve`)."""

    def __init__(self, throttle: FailureThrottle | None = None) -> None:
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self._socks: dict[int, socket.socket] = {}
        self.bad_messages = 0

    def connect(self, slot: int) -> socket.socket:
        """A new link for ``slot`` (the old one is closed): returns the worker's end, to be
        passed to the worker and closed here once it is started."""
        self.drop(slot)
        mine, theirs = _pair()
        mine.setblocking(False)
        self._socks[slot] = mine
        return theirs

    def drop(self, slot: int) -> None:
        sock = self._socks.pop(slot, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for slot in list(self._socks):
            self.drop(slot)

    def sockets(self) -> list[socket.socket]:
        return list(self._socks.values())

    def serve(self, sock: socket.socket) -> None:
        """Handle every message waiting on ``sock`` (readable per select)."""
        for data in _messages(sock):
            if not data:  # the worker is gone; its slot gets a new link when restarted
                for slot, s in list(self._socks.items()):
                    if s is sock:
                        self.drop(slot)
                return
            self._handle(sock, data)

    def _handle(self, sock: socket.socket, data: bytes) -> None:
        try:
            msg = json.loads(data)
            op = msg[0]
            if op == "check":
                _, ident, address, user = msg
                answer = [ident, round(self.throttle.wait(str(address), str(user)), 3)]
                try:
                    sock.send(json.dumps(answer).encode())
                except OSError:  # full or gone: the worker's own throttle decides
                    pass
            elif op == "failed":
                self.throttle.failed(str(msg[1]), str(msg[2]))
            elif op == "ok":
                self.throttle.succeeded(str(msg[1]), str(msg[2]))
            else:
                raise ValueError(op)
        except (ValueError, TypeError, IndexError, KeyError):
            self.bad_messages += 1
            log.warning("throttle link: ignored a malformed message (%d bytes)", len(data))


def _messages(sock: socket.socket) -> Iterator[bytes]:
    """The datagrams waiting on a non-blocking ``sock``; b"" once at its end."""
    while True:
        try:
            data = sock.recv(_MESSAGE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        yield data
        if not data:
            return


# -- a worker's side ---------------------------------------------------------------------------


class SharedThrottle(FailureThrottle):
    """A worker's throttle: its own, and the supervisor's (every worker's failures)."""

    shared = True

    def __init__(self, sock: socket.socket, *, answer_within: float = ANSWER_WITHIN) -> None:
        super().__init__()
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._answer_within = answer_within
        self._waiting: dict[int, asyncio.Future[float]] = {}
        self._next = 0
        self._reading = False
        self._warned = False
        # (address, user) -> monotonic time until which the supervisor said to wait: asked once
        self._blocked: dict[tuple[str, str], float] = {}
        self.unanswered = 0  # checks the supervisor did not answer in time (or could not)

    async def admit(self, address: str, user: str) -> None:
        self.check(address, user)  # this worker's own failures
        now = time.monotonic()
        until = self._blocked.get((address, user), 0.0)
        if until <= now:
            until = now + await self._ask(address, user)
            if until > now:
                if len(self._blocked) >= _BLOCKED_MAX:
                    self._blocked.clear()
                self._blocked[(address, user)] = until
        if until > now:
            raise TooManyRequests(
                "too many failed logins; retry later", retry_after=int(until - now) + 1
            )

    def failed(self, address: str, user: str) -> None:
        super().failed(address, user)
        self._tell(["failed", address, _wire_user(user)])

    def succeeded(self, address: str, user: str) -> None:
        super().succeeded(address, user)
        self._blocked.pop((address, user), None)
        self._tell(["ok", address, _wire_user(user)])

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._reading:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self._reading = False
        sock.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(0.0)
        self._waiting.clear()

    # -- the link

    def _tell(self, msg: list[object]) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.send(json.dumps(msg).encode())
        except OSError as exc:
            self._unanswered(f"cannot reach the supervisor ({exc.strerror or exc})")
            return False
        return True

    async def _ask(self, address: str, user: str) -> float:
        """Seconds the supervisor says to wait; 0 when it does not answer in time."""
        loop = asyncio.get_running_loop()
        if self._sock is not None and not self._reading:
            loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True
        self._next += 1
        ident = self._next
        fut: asyncio.Future[float] = loop.create_future()
        self._waiting[ident] = fut
        try:
            if not self._tell(["check", ident, address, _wire_user(user)]):
                return 0.0
            try:
                return await asyncio.wait_for(fut, self._answer_within)
            except TimeoutError:
                self._unanswered(f"no answer within {self._answer_within} s")
                return 0.0
        finally:
            self._waiting.pop(ident, None)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for data in _messages(sock):
            if not data:
                self._unanswered("the supervisor closed the link")
                self.close()
                return
            try:
                ident, wait = json.loads(data)
                fut = self._waiting.get(int(ident))
                if fut is not None and not fut.done():
                    fut.set_result(max(0.0, float(wait)))
                if self._warned:
                    self._warned = False
                    log.warning("shared login throttle: the supervisor answers again")
            except (ValueError, TypeError):
                log.warning("throttle link: ignored a malformed answer (%d bytes)", len(data))

    def _unanswered(self, why: str) -> None:
        self.unanswered += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "shared login throttle: %s; this worker throttles on its own failures only", why
            )
