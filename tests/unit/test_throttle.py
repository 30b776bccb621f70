"""The failed-login throttle shared by the workers of ``--workers N`` (gateway.throttle):
the supervisor's service and a worker's side, over real socket pairs in one event loop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.auth import FailureThrottle
from gateway.errors import TooManyRequests
from gateway.throttle import SharedThrottle, ThrottleService
from tests.helpers import eventually

ADDR, USER = "192.0.2.7", "manager"
KEY = bytes(range(32))


@pytest.fixture
async def service() -> AsyncIterator[tuple[ThrottleService, Callable[[int], SharedThrottle]]]:
    """A supervisor's service, served by this loop, and a maker of worker links."""
    loop = asyncio.get_running_loop()
    svc = ThrottleService(FailureThrottle(per_user=5, per_address=20))
    workers: list[SharedThrottle] = []
    served: set[int] = set()

    def worker(slot: int) -> SharedThrottle:
        theirs = svc.connect(slot)
        for sock in svc.sockets():
            if sock.fileno() not in served:
                served.add(sock.fileno())
                loop.add_reader(sock.fileno(), svc.serve, sock)
        link = SharedThrottle(theirs, KEY)  # the key the supervisor gives every worker
        workers.append(link)
        return link

    yield svc, worker
    for fd in served:
        loop.remove_reader(fd)
    for w in workers:
        w.close()
    svc.close()


async def test_failures_on_two_workers_are_counted_together(service) -> None:
    svc, worker = service
    a, b = worker(0), worker(1)
    for _ in range(3):
        b.failed(ADDR, USER)
    b.release(
        await b.admit(ADDR, USER)
    )  # a round trip on b's link: its failures are counted by now
    for _ in range(3):
        a.failed(ADDR, USER)
    assert a.wait(ADDR, USER) == 0  # a alone saw 3 failures: no back-off of its own
    with pytest.raises(TooManyRequests) as refused:
        a.release(await a.admit(ADDR, USER))
    assert refused.value.retry_after >= 1
    with pytest.raises(TooManyRequests):
        b.release(await b.admit(ADDR, USER))
    assert svc.throttle.wait(ADDR, USER) > 0
    assert a.unanswered == b.unanswered == 0
    # other users from the same address are not held back by one user's failures
    a.release(await a.admit(ADDR, "sales"))


async def test_the_supervisors_answer_is_remembered_until_it_expires(service) -> None:
    svc, worker = service
    a = worker(0)
    for _ in range(6):
        svc.throttle.failed(ADDR, USER)  # failures another worker reported
    with pytest.raises(TooManyRequests):
        a.release(await a.admit(ADDR, USER))
    svc.close()  # the supervisor can no longer answer: the remembered answer still holds
    with pytest.raises(TooManyRequests):
        a.release(await a.admit(ADDR, USER))
    assert a.unanswered == 0  # it was not asked again


async def test_a_success_clears_the_users_back_off_everywhere(service) -> None:
    svc, worker = service
    a, b = worker(0), worker(1)
    for _ in range(6):
        a.failed(ADDR, USER)
    a.release(await a.admit(ADDR, "sales"))  # round trip: the failures are counted
    with pytest.raises(TooManyRequests):
        b.release(await b.admit(ADDR, USER))
    b.succeeded(ADDR, USER)  # e.g. after the back-off, the right password
    b.release(await b.admit(ADDR, "sales"))
    assert svc.throttle.wait(ADDR, USER) == 0
    b.release(await b.admit(ADDR, USER))


async def test_a_silent_supervisor_costs_one_timeout_and_the_local_throttle_still_holds() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = SharedThrottle(theirs, answer_within=0.05)
    try:
        started = time.monotonic()
        await link.admit(ADDR, USER)  # nobody answers: allowed, as a lone worker would
        assert 0.03 <= time.monotonic() - started < 2  # it waited for an answer, not forever
        assert link.unanswered == 1
        for _ in range(6):
            link.failed(ADDR, USER)
        with pytest.raises(TooManyRequests):
            await link.admit(ADDR, USER)  # its own failures: refused without asking
        assert link.unanswered == 1
    finally:
        link.close()
        mine.close()


async def test_a_supervisor_gone_is_noticed_at_once() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = SharedThrottle(theirs, answer_within=5.0)
    mine.close()
    try:
        started = time.monotonic()
        await link.admit(ADDR, USER)
        await link.admit(ADDR, USER)
        assert time.monotonic() - started < 1  # no 5 s wait for an answer that cannot come
        assert link.unanswered >= 1
        for _ in range(6):
            link.failed(ADDR, USER)
        with pytest.raises(TooManyRequests):
            await link.admit(ADDR, USER)
    finally:
        link.close()


async def test_malformed_messages_are_ignored_and_counted(service) -> None:
    svc, worker = service
    a = worker(0)
    peer = svc.sockets()[0]
    # what a broken worker could send: not JSON, the wrong shape, an unknown operation
    raw = a._sock
    assert raw is not None
    for junk in (b"\xff\xfe", b"{}", b'["check", 1]', b'["nope", 1, 2]', b"[]"):
        raw.send(junk)
    for _ in range(6):
        a.failed(ADDR, USER)
    a.release(await a.admit(ADDR, "sales"))  # a round trip: everything before it was handled
    assert svc.bad_messages == 5
    assert svc.throttle.wait(ADDR, USER) > 0  # the good messages after the junk counted
    assert peer in svc.sockets()  # the link stays up


async def test_long_user_names_are_sent_as_a_hash(service) -> None:
    svc, worker = service
    a, b = worker(0), worker(1)
    long_user = "x" * 5000  # the name is the client's, up to the header size limit
    for _ in range(3):
        a.failed(ADDR, long_user)
    a.release(await a.admit(ADDR, "sales"))
    for _ in range(3):
        b.failed(ADDR, long_user)
    with pytest.raises(TooManyRequests):
        b.release(await b.admit(ADDR, long_user))
    assert svc.bad_messages == 0
    digest = hashlib.sha256(long_user.encode()).hexdigest()
    assert svc.throttle.wait(ADDR, f"sha256:{digest}") > 0  # what the supervisor keyed on


async def test_an_address_gets_two_password_checks_at_a_time_over_all_workers(service) -> None:
    svc, worker = service
    a, b = worker(0), worker(1)
    first = await a.admit(ADDR, "sales")
    second = await b.admit(ADDR, "manager")
    assert first and second
    for link in (a, b):  # a third check from the address waits, whichever worker gets it
        with pytest.raises(TooManyRequests) as busy:
            await link.admit(ADDR, "ops")
        assert busy.value.retry_after == 1
    await a.admit("192.0.2.8", "sales")  # another address is not held back
    a.release(first)
    await asyncio.sleep(0)  # a release is sent after the step that made it
    third = await b.admit(ADDR, "ops")
    assert third
    b.release(second)
    b.release(third)
    await b.admit("192.0.2.9", "sales")  # round trip: the releases were handled
    assert set(svc.inflight) == {"192.0.2.8", "192.0.2.9"}  # ADDR holds none now


async def test_the_slots_of_a_worker_that_is_gone_are_given_back(service) -> None:
    svc, worker = service
    a, b = worker(0), worker(1)
    assert await a.admit(ADDR, "sales") and await a.admit(ADDR, "manager")
    with pytest.raises(TooManyRequests):
        await b.admit(ADDR, "ops")
    svc.drop(0)  # what the supervisor does when it reaps worker 0
    assert await b.admit(ADDR, "ops")


async def test_a_reservation_answered_too_late_is_given_back(service) -> None:
    svc, worker = service
    a = worker(0)
    a._answer_within = 0.0  # give up before any answer can come
    assert await a.admit(ADDR, "sales") == 0  # no answer: the worker's own bounds decide
    assert a.unanswered == 1
    await eventually(lambda: svc.inflight == {}, what="the late reservation given back")


async def test_reports_sent_while_the_link_is_full_are_kept_and_delivered() -> None:
    """A supervisor that is slow to read: the socket buffer fills, and every failure reported
    meanwhile still reaches it, in order, once it reads again."""

    class Recording(FailureThrottle):
        def __init__(self) -> None:
            super().__init__(per_user=10**6, per_address=10**6)
            self.users: list[str] = []

        def failed(self, address: str, user: str) -> None:
            self.users.append(user)
            super().failed(address, user)

    loop = asyncio.get_running_loop()
    seen = Recording()
    svc = ThrottleService(seen)
    link = SharedThrottle(svc.connect(0))
    sock = svc.sockets()[0]
    try:
        sent = 0
        while not link._backlog:  # until the kernel's buffer is full
            link.failed(ADDR, f"user-{sent}")
            sent += 1
        for i in range(sent, sent + 500):  # these wait in the worker's backlog
            link.failed(ADDR, f"user-{i}")
        sent += 500
        loop.add_reader(sock.fileno(), svc.serve, sock)  # the supervisor reads again
        await eventually(lambda: not link._backlog, what="the backlog sent")
        link.release(await link.admit("192.0.2.99", "x"))  # round trip: all handled by now
        assert seen.users == [f"user-{i}" for i in range(sent)]
        assert svc.bad_messages == 0 and link.dropped == 0 and link.unanswered == 0
    finally:
        loop.remove_reader(sock.fileno())
        link.close()
        svc.close()


async def test_workers_checking_the_same_credentials_share_one_slot(service) -> None:
    """A cold cache after a start: every worker runs its own check of the same credentials.
    Those share one of the address's slots, so three or more workers still let a client's
    burst through (and two users behind one address, as one process would)."""
    svc, worker = service
    links = [worker(slot) for slot in range(4)]
    held = [await link.admit(ADDR, "sales", "imsales") for link in links]
    assert all(held)
    other = await links[0].admit(ADDR, "manager", "imthemanager")  # a second user: 2nd slot
    assert other
    with pytest.raises(TooManyRequests):  # a third set of credentials waits
        await links[1].admit(ADDR, "manager", "a guess")
    assert len(svc.inflight[ADDR]) == 2
    for link, reservation in zip(links, held, strict=True):
        link.release(reservation)
    links[0].release(other)
    await eventually(lambda: ADDR not in svc.inflight, what="every slot given back")


async def test_a_checks_outcome_reaches_the_supervisor_before_its_slot_is_free() -> None:
    """A check's finally releases its slot before its caller reports the failure; on the wire
    the failure comes first, so the supervisor (another process, reading at any moment) never
    frees the slot on the count from before that failure."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = SharedThrottle(theirs, KEY)
    try:
        link.release(7)  # as _verify's finally does
        link.failed(ADDR, USER)  # as authenticate does right after
        await asyncio.sleep(0)  # one loop step: the deferred release is sent in it
        mine.setblocking(False)
        sent = [json.loads(mine.recv(4096)) for _ in range(2)]
        assert sent == [["failed", ADDR, USER], ["release", 7]]
    finally:
        link.close()
        mine.close()
