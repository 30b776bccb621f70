"""The failed-login throttle, and one throttle for all workers of ``--workers N``.

:class:`FailureThrottle`: exponential back-off on failed logins, per client address and per
address+user (the limits are in :mod:`gateway.auth`'s docstring). This module is long because
it holds both ends of the workers' protocol below (the supervisor's :class:`ThrottleService`,
a worker's :class:`SharedThrottle`) beside the throttle they share: one end is read with the
other.

Each worker is a process of its own, and the kernel spreads a client's connections over them
(``SO_REUSEPORT``): with a throttle per worker, a password guesser would get N times the
guesses before the back-off starts, and N times the password checks in flight. So the
supervisor keeps the throttle that counts, and each worker talks to it over a
``SOCK_SEQPACKET`` socket pair (one message per datagram, JSON):

    worker -> supervisor   ["check", id, address, user, creds]  answered [id, wait s, verdict]
                           ["release", id]                  no answer: the check is over
                           ["failed", address, user]        no answer
                           ["ok", address, user]            no answer (a success)

A check that need not wait also reserves one of the address's password-check slots (two over
all workers, as in one process): verdict 1, and the ``id`` names the reservation until it is
released; verdict 2 when the address has none free (429). ``creds`` names the credentials
being checked (a keyed BLAKE2b digest under ``GATEWAY_THROTTLE_KEY``, which the supervisor
gives every worker; never the password): workers checking the same credentials at once (a
cold cache after a start) share one slot, as one process's requests share one check. A
worker sends a release after the step that reports the check's outcome, so a slot is never
free before its failure is counted. The supervisor gives back the slots of a worker that is
gone, and a worker gives back a reservation whose answer came too late.

A worker asks only when it is about to run a bcrypt check itself (not when it shares one in
flight for the same credentials), which costs far more than the round trip. It keeps its own
throttle and its own per-address bound too, so that it goes on throttling on its own when the
supervisor does not answer (it waits :data:`ANSWER_WITHIN` at most, logs it once, and uses its
own): a degraded link never lets a request through that a single worker would refuse. The
supervisor's side never blocks: an answer that does not fit in the socket buffer is dropped
(its reservation with it), and the worker's own throttle decides. A worker's reports are kept
in order while the link is full and sent as it drains, so no failure goes uncounted.

Users are sent as given up to :data:`_USER_MAX` characters, as a hash beyond (a key only has
to be equal for equal users).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Iterator

from .errors import TooManyRequests

log = logging.getLogger(__name__)

THROTTLE_FD_ENV = "GATEWAY_THROTTLE_FD"
THROTTLE_KEY_ENV = "GATEWAY_THROTTLE_KEY"  # hex: the key naming credentials on the link
ANSWER_WITHIN = 0.5  # seconds a worker waits for the supervisor's answer
_MESSAGE_MAX = 4096
_USER_MAX = 256
_BLOCKED_MAX = 10_000
_BACKLOG_MAX = 100_000  # messages kept for a full link (each under 4 KiB, most ~100 bytes)
# a check's verdict on the address's password-check slots
_NOT_ASKED, _RESERVED, _BUSY = 0, 1, 2


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

    async def admit(self, address: str, user: str, password: str = "") -> int:
        """:meth:`check` before a password check. A shared throttle (:class:`SharedThrottle`)
        also asks the supervisor, and reserves one of the address's password-check slots of
        all workers (one per distinct credentials: workers checking the same ones share it):
        the reservation (0: none), to give back with :meth:`release`."""
        self.check(address, user)
        return 0

    def release(self, reservation: int) -> None:
        """Give back a slot :meth:`admit` reserved (nothing to do here)."""

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
    supervisor's select loop (:meth:`sockets`, :meth:`serve`). Besides the back-off it bounds
    the password checks in flight per client address over all workers (``per_address``, as
    one process does), and gives back the slots of a worker that is gone."""

    def __init__(self, throttle: FailureThrottle | None = None, per_address: int = 2) -> None:
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self.per_address = per_address
        self._socks: dict[int, socket.socket] = {}
        # address -> credentials being checked (their keyed digest) -> reservations of them
        self.inflight: dict[str, dict[str, int]] = {}
        self._held: dict[int, dict[int, tuple[str, str]]] = {}  # slot -> id -> (address, creds)
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
        for address, creds in self._held.pop(slot, {}).values():
            self._give_back(address, creds)

    def close(self) -> None:
        for slot in list(self._socks):
            self.drop(slot)

    def sockets(self) -> list[socket.socket]:
        return list(self._socks.values())

    def serve(self, sock: socket.socket) -> None:
        """Handle every message waiting on ``sock`` (readable per select)."""
        slot = next((n for n, s in self._socks.items() if s is sock), None)
        if slot is None:
            return
        for data in _messages(sock):
            if not data:  # the worker is gone; its slot gets a new link when restarted
                self.drop(slot)
                return
            self._handle(slot, sock, data)

    def _handle(self, slot: int, sock: socket.socket, data: bytes) -> None:
        try:
            msg = json.loads(data)
            op = msg[0]
            if op == "check":
                _, ident, address, user, creds = msg
                address = str(address)
                wait = round(self.throttle.wait(address, str(user)), 3)
                verdict = _NOT_ASKED
                if wait <= 0 and creds:
                    verdict = self._reserve(slot, int(ident), address, str(creds))
                try:
                    sock.send(json.dumps([ident, wait, verdict]).encode())
                except OSError:  # full or gone: the worker's own throttle decides
                    if verdict == _RESERVED:
                        self._release(slot, int(ident))
            elif op == "release":
                self._release(slot, int(msg[1]))
            elif op == "failed":
                self.throttle.failed(str(msg[1]), str(msg[2]))
            elif op == "ok":
                self.throttle.succeeded(str(msg[1]), str(msg[2]))
            else:
                raise ValueError(op)
        except (ValueError, TypeError, IndexError, KeyError):
            self.bad_messages += 1
            log.warning("throttle link: ignored a malformed message (%d bytes)", len(data))

    def _reserve(self, slot: int, ident: int, address: str, creds: str) -> int:
        held = self._held.setdefault(slot, {})
        checking = self.inflight.setdefault(address, {})
        if ident in held or (creds not in checking and len(checking) >= self.per_address):
            if not checking:
                del self.inflight[address]
            return _BUSY
        checking[creds] = checking.get(creds, 0) + 1  # the same credentials share a slot
        held[ident] = (address, creds)
        return _RESERVED

    def _release(self, slot: int, ident: int) -> None:
        held = self._held.get(slot, {}).pop(ident, None)
        if held is not None:  # else not held by this worker: nothing to give back
            self._give_back(*held)

    def _give_back(self, address: str, creds: str) -> None:
        checking = self.inflight.get(address, {})
        left = checking.get(creds, 0) - 1
        if left > 0:
            checking[creds] = left
        else:
            checking.pop(creds, None)
            if not checking:
                self.inflight.pop(address, None)


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
    """A worker's throttle: its own, and the supervisor's (every worker's failures, and the
    password-check slots of each address over all workers)."""

    shared = True

    def __init__(
        self, sock: socket.socket, key: bytes = b"", *, answer_within: float = ANSWER_WITHIN
    ) -> None:
        super().__init__()
        sock.setblocking(False)
        # the key all workers share for naming credentials to the supervisor (never the
        # credentials themselves): from the supervisor, else this worker's own
        self._key = key or os.urandom(32)
        self._sock: socket.socket | None = sock
        self._answer_within = answer_within
        self._waiting: dict[int, asyncio.Future[tuple[float, int]]] = {}
        self._next = 0
        self._reading = False
        self._warned = False
        # (address, user) -> monotonic time until which the supervisor said to wait: asked once
        self._blocked: dict[tuple[str, str], float] = {}
        self.unanswered = 0  # checks the supervisor did not answer in time (or could not)
        self._backlog: deque[bytes] = deque()  # messages waiting for room on the link
        self.dropped = 0  # messages dropped because the backlog was full

    async def admit(self, address: str, user: str, password: str = "") -> int:
        self.check(address, user)  # this worker's own failures
        now = time.monotonic()
        until = self._blocked.get((address, user), 0.0)
        verdict, ident = _NOT_ASKED, 0
        if until <= now:
            creds = hashlib.blake2b(
                b"%s\0%s"
                % (
                    user.encode("utf-8", "surrogatepass"),
                    password.encode("utf-8", "surrogatepass"),
                ),
                key=self._key,
                digest_size=16,
            ).hexdigest()
            ident, wait, verdict = await self._ask(address, user, creds)
            until = now + wait
            if until > now:
                if len(self._blocked) >= _BLOCKED_MAX:
                    self._blocked.clear()
                self._blocked[(address, user)] = until
        if until > now:
            raise TooManyRequests(
                "too many failed logins; retry later", retry_after=int(until - now) + 1
            )
        if verdict == _BUSY:
            raise TooManyRequests(
                "too many password checks in progress from this address", retry_after=1
            )
        return ident if verdict == _RESERVED else 0

    def release(self, reservation: int) -> None:
        # After the loop's current step: the outcome of the check (failed() or succeeded(),
        # called as the check returns) reaches the supervisor before its slot is free.
        if reservation:
            asyncio.get_running_loop().call_soon(self._tell, ["release", reservation])

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
        if self._backlog:
            asyncio.get_running_loop().remove_writer(sock.fileno())
            self._backlog.clear()
        sock.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result((0.0, _NOT_ASKED))
        self._waiting.clear()

    # -- the link

    def _tell(self, msg: list[object]) -> bool:
        """Send ``msg``; when the link is full, keep it (in order) until it drains: a
        failure report is never dropped while the supervisor lives."""
        sock = self._sock
        if sock is None:
            return False
        data = json.dumps(msg).encode()
        if not self._backlog:
            try:
                sock.send(data)
                return True
            except (BlockingIOError, InterruptedError):
                asyncio.get_running_loop().add_writer(sock.fileno(), self._send_backlog)
            except OSError as exc:
                self._unanswered(f"cannot reach the supervisor ({exc.strerror or exc})")
                return False
        if len(self._backlog) >= _BACKLOG_MAX:  # the supervisor has stopped reading
            self._backlog.popleft()
            self.dropped += 1
        self._backlog.append(data)
        return True

    def _send_backlog(self) -> None:
        sock = self._sock
        while sock is not None and self._backlog:
            try:
                sock.send(self._backlog[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._unanswered(f"cannot reach the supervisor ({exc.strerror or exc})")
                self._backlog.clear()
                break
            self._backlog.popleft()
        if sock is not None:
            asyncio.get_running_loop().remove_writer(sock.fileno())

    async def _ask(self, address: str, user: str, creds: str) -> tuple[int, float, int]:
        """The question's number (its reservation, if one is made) and the supervisor's
        answer: seconds to wait, and its verdict on a password-check slot for ``address``
        (reserved or busy); no wait and no slot when it does not answer."""
        loop = asyncio.get_running_loop()
        if self._sock is not None and not self._reading:
            loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True
        self._next += 1
        ident = self._next
        fut: asyncio.Future[tuple[float, int]] = loop.create_future()
        self._waiting[ident] = fut
        answered = False
        try:
            if not self._tell(["check", ident, address, _wire_user(user), creds]):
                return ident, 0.0, _NOT_ASKED
            try:
                wait, verdict = await asyncio.wait_for(fut, self._answer_within)
            except TimeoutError:
                self._unanswered(f"no answer within {self._answer_within} s")
                return ident, 0.0, _NOT_ASKED
            answered = True
            return ident, wait, verdict
        finally:
            self._waiting.pop(ident, None)
            # an answer that came as we gave up (timeout, cancel): its slot is not ours to keep
            if not answered and fut.done() and not fut.cancelled() and fut.result()[1] == _RESERVED:
                self._tell(["release", ident])

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
                ident, wait, verdict = json.loads(data)
                fut = self._waiting.get(int(ident))
                if fut is not None and not fut.done():
                    fut.set_result((max(0.0, float(wait)), int(verdict)))
                elif verdict == _RESERVED:  # answered after we gave up: give the slot back
                    self._tell(["release", int(ident)])
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
