"""Issue 10, items 4-8, against real processes on 127.0.0.1: trickling uploads, slow heads
under a small fd limit, the header timeout, SIGTERM under keep-alive load, ``Expect:
100-continue`` before authorization, and an upstream that goes away.

Every test starts its own upstream (``tests.integration.slowupstream``: slow on demand with
``?delay=``) and gateway with small deadlines, bounds its own duration, and stops what it
started by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    Process,
    basic,
    eventually,
    policy_doc,
    wait_for_status,
    wait_until,
    write_policy,
)

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("GATEWAY_URL")), reason="starts its own processes"),
    pytest.mark.skipif(sys.platform != "linux", reason="Linux socket and rlimit behaviour"),
]

OPS = basic("ops", "imtheops")
SALES = basic("sales", "imsales")
MANAGER = basic("manager", "imthemanager")
ITEMS = "/api/inventory"


# -- processes ---------------------------------------------------------------------------------


class Procs:
    """Processes a test started; each is stopped by PID at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Process] = []
        self.gateways: list[Process] = []
        self.policy = write_policy(tmp / "rbac.yaml", policy_doc())

    def upstream(self, port: int = 0, name: str = "upstream") -> Process:
        p = Process(
            ["-m", "tests.integration.slowupstream", "--port", str(port)], self.tmp / f"{name}.log"
        )
        self.started.append(p)
        p.wait_listening()
        p.wait_healthy("/healthz")
        return p

    def gateway(
        self,
        upstream: str,
        *flags: str,
        name: str = "gateway",
        nofile: int | None = None,
        port: int = 0,
    ) -> Process:
        args = [
            "-m",
            "gateway",
            "serve",
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--policy",
            str(self.policy),
            "--no-watch",
            "--audit-log",
            str(self.tmp / f"{name}-audit.log"),
            "--workers",
            "1",  # one process: these tests watch its pid, its connections and its log
            *flags,
        ]
        if nofile is not None:
            # Same PID: set both limits, then exec the gateway (as `ulimit -n N; exec ...`).
            args = [
                "-c",
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                "os.execv(sys.executable, [sys.executable] + sys.argv[1:])",
                *args,
            ]
        p = Process(args, self.tmp / f"{name}.log")
        self.started.append(p)
        self.gateways.append(p)
        p.wait_listening()
        p.wait_healthy("/-/healthz")
        return p

    def stop_all(self) -> None:
        for p in reversed(self.started):
            p.stop(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.stop_all()
    for p in ps.gateways:  # whatever the faults, never a traceback
        assert "Traceback" not in p.output(), p.output()[-3000:]


def address(p: Process) -> tuple[str, int]:
    host, port = p.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    """The client side of these tests holds thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- a raw HTTP/1.1 client (no normalisation, full control over timing) -------------------------


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def closes(self) -> bool:
        return "close" in self.headers.get("connection", "").lower()

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers} {self.body[:200]!r}>"


async def read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> Answer:
    """One answer (status, lower-cased headers, body); raises on a connection that ends first."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if head_only or status < 200 or status in (204, 304):
        return Answer(status, headers, body)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read()
    return Answer(status, headers, body)


def request_bytes(
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    close: bool = False,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def fetch(
    addr: tuple[str, int],
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> Answer:
    """One request on a new connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    try:
        writer.write(request_bytes(method, target, headers, body, close=True))
        return await asyncio.wait_for(read_answer(reader), timeout)
    finally:
        writer.close()


async def status_doc(addr: tuple[str, int]) -> dict[str, Any]:
    a = await fetch(addr, "GET", "/-/status", OPS)
    assert a.status == 200, a
    return a.json()


# -- 4. trickling uploads ------------------------------------------------------------------------

UPLOADS = 260
TRICKLE_EVERY = 1.5  # seconds between the uploads' small pieces
MIN_RATE = 1024
BODY_TIMEOUT = 4.0


async def trickle(addr: tuple[str, int], kind: str, stop_after: float) -> tuple[str, Any, float]:
    """An upload that sends a few bytes every TRICKLE_EVERY seconds until it is answered
    ("steady": 600 bytes every 0.25 s, above the minimum rate but too long in total).
    Returns (kind, Answer or the exception that ended it, seconds to the answer)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        reader, writer = await asyncio.open_connection(*addr)
    except OSError as exc:
        return kind, exc, 0.0
    hdrs = {**MANAGER, "Content-Type": "application/json"}
    if kind == "chunked":
        hdrs["Transfer-Encoding"] = "chunked"
        piece = b'7\r\n{"a":1}\r\n'  # one 7-byte chunk
    elif kind == "steady":
        hdrs["Content-Length"] = "15000"  # buffered (<= 16 KiB); too slow in total
        piece = b"x" * 600
    elif kind == "large":
        hdrs["Content-Length"] = str(1024 * 1024)  # streamed: over the 16 KiB buffer
        piece = b"x" * 8
    else:
        hdrs["Content-Length"] = "4000"  # small: read whole before a slot
        piece = b"x" * 8
    every = 0.25 if kind == "steady" else TRICKLE_EVERY  # 2,400 or ~5 bytes/s
    answer = asyncio.ensure_future(read_answer(reader))
    try:
        writer.write(request_bytes("POST", ITEMS, hdrs))
        while not answer.done() and loop.time() - t0 < stop_after:
            try:
                writer.write(piece)
            except (ConnectionError, RuntimeError):
                break
            await asyncio.wait({answer}, timeout=every)
        try:
            got: Any = await asyncio.wait_for(answer, max(0.1, stop_after - (loop.time() - t0)))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            got = exc
        return kind, got, loop.time() - t0
    finally:
        answer.cancel()
        writer.close()


async def test_trickling_uploads_leave_room_for_others(procs: Procs) -> None:
    up = procs.upstream()
    gw = procs.gateway(
        up.url,
        "--pool-size",
        "8",
        "--min-upload-rate",
        str(MIN_RATE),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--header-timeout",
        "2",
    )
    addr = address(gw)
    # Warm the credential cache: "a cached GET" is one whose bcrypt check is remembered.
    for who in (SALES, MANAGER):
        assert (await fetch(addr, "GET", ITEMS, who)).status == 200

    kinds = ["chunked"] * 90 + ["large"] * 90 + ["small"] * 75 + ["steady"] * 5
    assert len(kinds) == UPLOADS
    bound = BODY_TIMEOUT + 4.0
    uploads = [asyncio.ensure_future(trickle(addr, k, bound)) for k in kinds]
    try:
        # The streamed uploads allowed (half of the pool) hold their upstream connections.
        async def holding() -> bool:
            up_doc = (await status_doc(addr))["upstream"]
            return up_doc["busy"] >= 4

        await eventually(holding, 3.0, 0.05, what="uploads hold half the pool")
        assert not any(u.done() and u.result()[0] == "small" for u in uploads)

        # Meanwhile a cached GET is answered at once, and the gateway says it is ready.
        for _ in range(5):
            t = time.monotonic()
            a = await fetch(addr, "GET", ITEMS, SALES, timeout=1.0)
            took = time.monotonic() - t
            assert a.status == 200 and took < 1.0, (a, took)
        ready = await fetch(addr, "GET", "/-/ready", timeout=3.0)
        assert ready.status == 200, ready
        still = sum(1 for u in uploads if not u.done())
        assert still >= 75, f"only {still} uploads still trickling during the GETs"

        results = await asyncio.wait_for(asyncio.gather(*uploads), bound + 2.0)
    finally:
        for u in uploads:
            u.cancel()

    # Every upload is answered, none is reset: 408 from the rate/total deadline, or 503 at
    # once for a streamed one over the half of the pool uploads may hold.
    problems = [(k, r, round(s, 2)) for k, r, s in results if not isinstance(r, Answer)]
    assert not problems, problems[:5]
    codes: dict[str, dict[tuple[int, str], int]] = {}
    for kind, a, took in results:
        doc = a.json()
        assert a.headers.get("content-type", "").startswith("application/json"), a
        key = (a.status, doc.get("code"))
        codes.setdefault(kind, {}).setdefault(key, 0)
        codes[kind][key] += 1
        assert took < BODY_TIMEOUT + 2.0, (kind, a, took)
        assert key in {
            (408, "body_too_slow"),
            (408, "body_timeout"),
            (503, "upstream_pool_exhausted"),
        }, (kind, a)
    assert set(codes["small"]) <= {(408, "body_too_slow"), (408, "body_timeout")}, codes
    assert set(codes["steady"]) == {(408, "body_timeout")}, codes  # the total deadline
    steady = [took for kind, _, took in results if kind == "steady"]
    assert min(steady) > BODY_TIMEOUT - 0.5, steady
    streamed_408 = sum(
        n
        for kind in ("chunked", "large")
        for (status, _), n in codes[kind].items()
        if status == 408
    )
    assert streamed_408 >= 4, codes
    assert "Traceback" not in gw.output()


async def test_ready_says_pool_exhausted(procs: Procs) -> None:
    up = procs.upstream()
    gw = procs.gateway(up.url, "--pool-size", "8")
    addr = address(gw)
    assert (await fetch(addr, "GET", ITEMS, SALES)).status == 200  # warm the cache
    # 12 requests to a slow upstream path: 8 hold the whole pool, 4 wait for a slot.
    slow = [
        asyncio.ensure_future(fetch(addr, "GET", ITEMS + "?delay=3", SALES, timeout=10))
        for _ in range(12)
    ]
    try:

        async def exhausted() -> bool:
            return bool((await status_doc(addr))["upstream"]["exhausted"])

        await eventually(exhausted, 3.0, 0.05, what="the pool is exhausted")
        t = time.monotonic()
        ready = await fetch(addr, "GET", "/-/ready", timeout=5.0)
        took = time.monotonic() - t
        assert ready.status == 503 and ready.json()["code"] == "upstream_pool_exhausted", (
            ready,
            took,
        )
        assert took < 1.0, took
    finally:
        for s in slow:
            s.cancel()


# -- 5. slow heads under a small fd limit ---------------------------------------------------------


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2200,
    reason="the client side needs ~2,100 descriptors",
)
async def test_slow_heads_under_small_fd_limit(procs: Procs) -> None:
    up = procs.upstream()
    # The header timeout is long here: the connection cap and eviction must do the work.
    gw = procs.gateway(up.url, "--header-timeout", "60", nofile=1024)
    addr = address(gw)
    assert (await fetch(addr, "GET", ITEMS, SALES)).status == 200  # warm the cache
    m = re.search(r"up to (\d+) connections", gw.output())
    assert m and int(m.group(1)) < 1024, gw.output()
    cap = int(m.group(1))

    stop = asyncio.Event()
    held = {"now": 0, "max": 0, "opened": 0}

    async def slow_head() -> None:
        """Hold a connection with half a request head until the gateway closes it (evicted
        to make room) or the test ends."""
        try:
            reader, writer = await asyncio.open_connection(*addr)
        except OSError:
            return
        held["opened"] += 1
        held["now"] += 1
        held["max"] = max(held["max"], held["now"])
        try:
            writer.write(b"GET /api/inventory HTTP/1.1\r\nHost: slow\r\n")
            stopped = asyncio.ensure_future(stop.wait())
            eof = asyncio.ensure_future(reader.read())
            await asyncio.wait({stopped, eof}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            eof.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            held["now"] -= 1
            writer.close()

    attackers = []
    try:
        for i in range(2000):
            attackers.append(asyncio.ensure_future(slow_head()))
            if i % 100 == 99:
                await asyncio.sleep(0.02)  # let the connections open in waves
        await eventually(lambda: held["opened"] >= 2000, 10.0, 0.05, what="2,000 slow heads opened")

        ok, times, failures = 0, [], []
        for _ in range(40):
            t = time.monotonic()
            try:
                a = await fetch(addr, "GET", ITEMS, SALES, timeout=5.0)
                ok += a.status == 200
                if a.status != 200:
                    failures.append(repr(a))
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                failures.append(repr(exc))
            times.append(round(time.monotonic() - t, 3))
        assert ok == 40, (ok, failures, times)
        assert max(times) < 3.0, times
        assert held["max"] >= cap // 2, held  # the flood really filled the gateway
        assert (await status_doc(addr))["connections"] <= cap
    finally:
        stop.set()
        await asyncio.wait(attackers, timeout=5.0)
        for a in attackers:
            a.cancel()
    assert gw.proc.poll() is None
    out = gw.output()
    assert "Too many open files" not in out and "Traceback" not in out, out[-3000:]


# -- 5. header timeout --------------------------------------------------------------------------


async def test_partial_head_gets_408_within_header_timeout(procs: Procs) -> None:
    up = procs.upstream()
    gw = procs.gateway(up.url, "--header-timeout", "1")
    addr = address(gw)
    loop = asyncio.get_running_loop()

    async def partial(first: bytes, trickle: bytes = b"") -> tuple[Answer, float, bytes]:
        reader, writer = await asyncio.open_connection(*addr)
        try:
            if first:
                writer.write(first)
                if first.endswith(b"\r\n\r\n"):
                    assert (await asyncio.wait_for(read_answer(reader), 3)).status == 200
            t0 = loop.time()
            writer.write(b"GET /api/inventory HTTP/1.1\r\nHost: x\r\n")
            answer = asyncio.ensure_future(read_answer(reader))
            while trickle and not answer.done():
                writer.write(trickle)  # a slowloris: one header byte now and then
                await asyncio.wait({answer}, timeout=0.2)
            a = await asyncio.wait_for(answer, 5.0)
            took = loop.time() - t0
            rest = await asyncio.wait_for(reader.read(), 3.0)  # then the connection closes
            return a, took, rest
        finally:
            writer.close()

    names = ["new connection", "kept-alive connection", "head trickled byte by byte"]
    results = await asyncio.gather(
        partial(b""), partial(request_bytes("GET", ITEMS, SALES)), partial(b"", trickle=b"X")
    )
    for name, (a, took, rest) in zip(names, results):
        assert a.status == 408, (name, a)
        assert a.headers["content-type"].startswith("application/json"), (name, a)
        assert a.json()["code"] == "header_timeout", (name, a)
        assert a.closes, (name, a)
        assert rest == b"", (name, rest)
        assert 0.9 <= took < 2.5, (name, took)


# -- 6. SIGTERM under keep-alive load ------------------------------------------------------------


async def connect_to(
    addr: tuple[str, int], pid: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that landed on process ``pid`` (two share the port)."""
    for _ in range(200):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(request_bytes("GET", "/-/status", OPS))
        a = await asyncio.wait_for(read_answer(reader), 5)
        if a.status == 200 and a.json()["pid"] == pid and not a.closes:
            return reader, writer
        writer.close()
    raise AssertionError(f"no connection reached pid {pid}")


def two_generations(procs: Procs, grace: float) -> tuple[Process, Process, tuple[str, int]]:
    """An old gateway and a new one sharing its port (as a rolling restart does): after the
    old one stops accepting, reconnecting clients reach the new one."""
    up = procs.upstream()
    old = procs.gateway(up.url, "--reuse-port", "--shutdown-grace", str(grace), name="old")
    addr = address(old)
    new = procs.gateway(up.url, "--reuse-port", "--port", str(addr[1]), name="new")
    return old, new, addr


async def one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str
) -> Any:
    """The answer to one request on an open connection, or the exception that ended it."""
    try:
        writer.write(request_bytes("GET", target, SALES))
        return await asyncio.wait_for(read_answer(reader), 15)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        return exc
    finally:
        writer.close()


async def test_sigterm_finishes_in_flight_and_cuts_after_grace(procs: Procs) -> None:
    grace = 2.5
    old, new, addr = two_generations(procs, grace)
    loop = asyncio.get_running_loop()
    in_flight = [await connect_to(addr, old.pid) for _ in range(3)]
    too_long = await connect_to(addr, old.pid)
    slow = [asyncio.ensure_future(one_request(r, w, ITEMS + "?delay=1.5")) for r, w in in_flight]
    cut = asyncio.ensure_future(one_request(*too_long, ITEMS + "?delay=20"))
    try:
        await eventually(
            lambda: _busy_at_least(addr, old.pid, 4), 3.0, 0.05, what="requests in flight"
        )
        t_term = loop.time()
        os.kill(old.pid, signal.SIGTERM)
        exited = await loop.run_in_executor(None, lambda: _wait_exit(old, grace + 5))
        drained = loop.time() - t_term
        slow_results = await asyncio.wait_for(asyncio.gather(*slow), 3)
        cut_result = await asyncio.wait_for(cut, 3)
    finally:
        for t in (*slow, cut):
            t.cancel()

    assert exited == 0, (exited, old.output()[-3000:])
    assert grace - 0.5 < drained < grace + 2.5, drained
    for r in slow_results:  # in flight at SIGTERM: finished
        assert isinstance(r, Answer) and r.status == 200 and r.closes, r
    # Still running after the grace: cut, audited as such, and counted in the log.
    assert not isinstance(cut_result, Answer), cut_result
    out = old.output()
    m = re.search(r"gateway stopping: (\d+) requests in flight", out)
    assert m and int(m.group(1)) >= 4, out[-3000:]
    assert re.search(r"shutdown cut 1 requests? still in flight", out), out[-3000:]
    cuts = [r for r in audit_lines(procs.tmp / "old-audit.log") if r.get("decision") == "cut"]
    assert len(cuts) == 1 and cuts[0]["path"] == ITEMS, cuts
    assert "Traceback" not in out
    assert new.proc.poll() is None
    assert (await fetch(addr, "GET", ITEMS, SALES)).status == 200  # the new one serves


async def test_sigterm_keepalive_clients_see_no_connection_errors(procs: Procs) -> None:
    grace = 2.0
    old, new, addr = two_generations(procs, grace)
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"ok": 0, "reconnects": 0, "errors": [], "closes_seen": 0}
    stop = asyncio.Event()
    termed = asyncio.Event()

    async def keepalive_client(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pause_at_term: float = 0.0
    ) -> None:
        """Requests in a loop; honours Connection: close by opening a new connection. With
        ``pause_at_term``, it is between two requests when SIGTERM arrives (a user
        reading a page)."""
        while not stop.is_set():
            if pause_at_term and termed.is_set():
                await asyncio.sleep(pause_at_term)  # the user's think time
                pause_at_term = 0.0
            try:
                writer.write(request_bytes("GET", ITEMS, SALES))
                a = await asyncio.wait_for(read_answer(reader), 5)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                stats["errors"].append(repr(exc))
                writer.close()
                return
            if a.status != 200:
                stats["errors"].append(repr(a))
            else:
                stats["ok"] += 1
            if pause_at_term and not termed.is_set():
                await termed.wait()
            if a.closes:
                stats["closes_seen"] += 1
                writer.close()
                try:
                    reader, writer = await asyncio.open_connection(*addr)
                except OSError as exc:
                    stats["errors"].append(f"reconnect: {exc!r}")
                    return
                stats["reconnects"] += 1
        writer.close()

    clients = [await connect_to(addr, old.pid) for _ in range(8)]
    thinking = await connect_to(addr, old.pid)
    in_flight = await connect_to(addr, old.pid)  # keeps the old process draining
    loops = [asyncio.ensure_future(keepalive_client(r, w)) for r, w in clients]
    loops.append(asyncio.ensure_future(keepalive_client(*thinking, pause_at_term=0.3)))
    slow = asyncio.ensure_future(one_request(*in_flight, ITEMS + "?delay=1.2"))
    try:
        await eventually(
            lambda: _busy_at_least(addr, old.pid, 1), 3.0, 0.05, what="a request in flight"
        )
        await eventually(lambda: stats["ok"] >= 40, 3.0, 0.05, what="keep-alive load running")
        os.kill(old.pid, signal.SIGTERM)
        termed.set()
        exited = await loop.run_in_executor(None, lambda: _wait_exit(old, grace + 5))
        ok_before = stats["ok"]
        await eventually(
            lambda: stats["ok"] >= ok_before + 40 or not stats["reconnects"],
            3.0,
            0.05,
            what="the load goes on on the new generation",
        )
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), 6)
        slow_result = await asyncio.wait_for(slow, 3)
    finally:
        stop.set()
        for t in (*loops, slow):
            t.cancel()

    assert exited == 0, (exited, old.output()[-3000:])
    assert isinstance(slow_result, Answer) and slow_result.status == 200, slow_result
    assert stats["errors"] == [], stats
    assert stats["closes_seen"] >= 9, stats  # every old connection was told to close
    assert new.proc.poll() is None


async def _busy_at_least(addr: tuple[str, int], pid: int, n: int) -> bool:
    """Process ``pid`` has at least ``n`` upstream connections lent out (asked through a
    connection that reaches it)."""
    reader, writer = await connect_to(addr, pid)
    try:
        writer.write(request_bytes("GET", "/-/status", OPS, close=True))
        doc = (await asyncio.wait_for(read_answer(reader), 5)).json()
        return doc["pid"] == pid and doc["upstream"]["busy"] >= n
    finally:
        writer.close()


def _wait_exit(p: Process, timeout: float) -> int | None:
    try:
        return p.proc.wait(timeout=timeout)
    except Exception:
        return None


# -- 7. Expect: 100-continue ------------------------------------------------------------------------


async def test_100_continue_only_after_auth_authz_and_size(procs: Procs) -> None:
    up = procs.upstream()
    gw = procs.gateway(up.url, "--max-body", "1000")
    addr = address(gw)

    async def expect(headers: dict[str, str], length: int) -> tuple[Answer, Answer | None]:
        """Send a head with Expect: 100-continue; the first answer, and the final one if the
        first was 100 (after sending the body)."""
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(
                request_bytes(
                    "POST",
                    ITEMS,
                    {
                        **headers,
                        "Content-Type": "application/json",
                        "Content-Length": str(length),
                        "Expect": "100-continue",
                    },
                )
            )
            first = await asyncio.wait_for(read_answer(reader), 5)
            if first.status != 100:
                return first, None
            writer.write(b"{" + b" " * (length - 2) + b"}")
            return first, await asyncio.wait_for(read_answer(reader), 5)
        finally:
            writer.close()

    cases = [
        ("no credentials", {}, 100, 401),
        ("wrong password", basic("manager", "wrong"), 100, 401),
        ("unknown user", basic("nobody", "x"), 100, 401),
        ("forbidden user", SALES, 100, 403),
        ("over --max-body", MANAGER, 5000, 413),
    ]
    for name, hdrs, length, want in cases:
        first, final = await expect(hdrs, length)
        assert first.status == want and final is None, (name, first)
        assert first.json()["status"] == want, (name, first)
    first, final = await expect(MANAGER, 20)
    assert first.status == 100, first
    assert final is not None and final.status == 200, final
    assert final.json()["body_len"] == 20, final


# -- 8. upstream down --------------------------------------------------------------------------------


def test_upstream_down_logged_once_per_state_change(procs: Procs) -> None:
    up = procs.upstream()
    port = int(up.url.rsplit(":", 1)[1])
    gw = procs.gateway(up.url)
    addr = address(gw)
    wait_for_status(gw.url + ITEMS, 200, 10, headers=SALES)
    before = len(gw.output())  # what the log says from here on
    assert up.stop() == 0

    async def flood() -> list[int]:
        statuses = []
        for _ in range(200):
            statuses.append((await fetch(addr, "GET", ITEMS, SALES)).status)
        return statuses

    t = time.monotonic()
    statuses = asyncio.run(flood())
    took = time.monotonic() - t
    assert set(statuses) <= {502, 503, 504}, sorted(set(statuses))
    assert took < 20, took
    ready = asyncio.run(fetch(addr, "GET", "/-/ready"))
    assert ready.status == 503 and ready.json()["code"] == "upstream_down", ready
    # A gateway started while the upstream is down says so once at start.
    cold = procs.gateway(up.url, name="cold")
    wait_until(lambda: "does not answer" in cold.output(), 3)
    assert cold.stop() == 0

    procs.upstream(port=port, name="upstream-again")
    wait_for_status(gw.url + ITEMS, 200, 10, headers=SALES)
    wait_until(lambda: "answers again (down" in gw.output(), 3)
    out = gw.output()[before:]
    warnings = [line for line in out.splitlines() if " WARNING " in line]
    down = [line for line in warnings if "unreachable" in line]
    back = [line for line in out.splitlines() if "answers again (down" in line]
    assert len(down) == 1, warnings[:5]
    assert len(warnings) == 1, warnings[:5]
    assert len(back) == 1, back
    m = re.search(r"(\d+) failed attempts", back[0])
    assert m and int(m.group(1)) >= 200, back[0]
