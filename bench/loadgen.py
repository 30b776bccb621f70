"""Pure-Python HTTP/1.1 load generator: the fallback when wrk is absent, and the flood client.

    python -m bench.loadgen URL --connections 32 --duration 6 [--method POST --body-bytes 65536]
        [--auth 'Basic …'] [--wrong-password-for USER] [--rate 1000] [--source 127.0.0.2]

Keep-alive connections, each a closed loop (send, read the whole response, repeat), optionally
paced to `--rate` requests/s over all connections. `--source` binds the client side to another
loopback address, so a server that throttles by client address sees a different client.
Prints one line `BENCH_JSON {...}` in the same shape as bench/lua/report.lua, plus the count of
each status. It is one Python process: against fast servers it is the bottleneck (the req/s it
reports is then a floor), but CPU-µs per request measured on the server stays valid.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Tally:
    latencies_us: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    bytes: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0


class Closed(Exception):
    """The server closed the connection (after a response without a length, or mid-way)."""


async def read_response(reader: asyncio.StreamReader, head_only: bool) -> tuple[int, int, bool]:
    """Read one response; return (status, bytes read, keep-alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length: int | None = None
    chunked = False
    keep = not head.startswith(b"HTTP/1.0")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep = b"close" not in value.lower()
    total = len(head)
    if head_only or status in (204, 304) or 100 <= status < 200:
        return status, total, keep
    if chunked:
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            total += len(line)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    total += len(trailer)
                return status, total + 2, keep
            total += len(await reader.readexactly(size + 2))
    if length is not None:
        return status, total + len(await reader.readexactly(length)), keep
    body = await reader.read()  # no framing: the body ends with the connection
    return status, total + len(body), False


def build_request(
    method: str, target: str, host: str, headers: dict[str, str], body: bytes
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if args.auth:
        headers["Authorization"] = args.auth
    body = b"x" * args.body_bytes
    if body:
        headers.setdefault("Content-Type", "application/octet-stream")
    fixed = build_request(args.method, target, url.netloc, headers, body)
    interval = args.connections / args.rate if args.rate > 0 else 0.0
    local = (args.source, 0) if args.source else None
    tally = Tally()
    end = time.monotonic() + args.duration
    counter = 0

    def next_request(conn: int) -> bytes:
        nonlocal counter
        if not args.wrong_password_for:
            return fixed
        counter += 1
        cred = f"{args.wrong_password_for}:wrong-{conn}-{counter}".encode()
        hdrs = dict(headers, Authorization="Basic " + base64.b64encode(cred).decode())
        return build_request(args.method, target, url.netloc, hdrs, body)

    async def connection(conn: int) -> None:
        slot = time.monotonic()
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            except OSError:
                tally.connect += 1
                await asyncio.sleep(0.01)
                continue
            try:
                while True:
                    if interval:
                        slot = max(slot + interval, time.monotonic())
                        if slot > time.monotonic():
                            await asyncio.sleep(slot - time.monotonic())
                    if time.monotonic() >= end:
                        return
                    t0 = time.perf_counter_ns()
                    try:
                        writer.write(next_request(conn))
                        await writer.drain()
                    except OSError:
                        tally.write += 1
                        break
                    try:
                        status, n, keep = await asyncio.wait_for(
                            read_response(reader, args.method == "HEAD"), args.timeout
                        )
                    except TimeoutError:
                        tally.timeout += 1
                        break
                    except (
                        OSError,
                        asyncio.IncompleteReadError,
                        asyncio.LimitOverrunError,
                        ValueError,
                    ):
                        tally.read += 1
                        break
                    if time.monotonic() > end:
                        return  # finished after the window closed: not counted
                    tally.latencies_us.append((time.perf_counter_ns() - t0) // 1000)
                    if args.announce and len(tally.latencies_us) == 1:
                        print("BENCH_READY", flush=True)
                    tally.statuses[status] += 1
                    tally.bytes += n
                    if not keep:
                        break
            finally:
                writer.close()

    started = time.monotonic()
    tasks = [asyncio.create_task(connection(i)) for i in range(args.connections)]
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    duration = time.monotonic() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = sorted(tally.latencies_us) or [0]

    def pct(q: float) -> int:
        return lat[min(len(lat) - 1, int(len(lat) * q / 100))]

    return {
        "tool": "python",
        "requests": len(tally.latencies_us),
        "duration_us": int(duration * 1e6),
        "bytes": tally.bytes,
        "latency_us": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "p99.9": pct(99.9),
            "min": lat[0],
            "max": lat[-1],
            "mean": round(sum(lat) / len(lat), 1),
        },
        "errors": {
            "connect": tally.connect,
            "read": tally.read,
            "write": tally.write,
            "status": sum(n for s, n in tally.statuses.items() if s > 399),
            "timeout": tally.timeout,
        },
        "statuses": {str(s): n for s, n in sorted(tally.statuses.items())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("--connections", "-c", type=int, default=32)
    p.add_argument("--duration", "-d", type=float, default=5.0)
    p.add_argument("--method", default="GET")
    p.add_argument("--header", "-H", action="append", default=[])
    p.add_argument("--auth", help="Authorization header value")
    p.add_argument("--body-bytes", type=int, default=0)
    p.add_argument(
        "--wrong-password-for",
        metavar="USER",
        help="send USER with a unique wrong password on every request",
    )
    p.add_argument(
        "--rate", type=float, default=0.0, help="requests/s over all connections (0: unpaced)"
    )
    p.add_argument("--source", help="local address to bind, e.g. 127.0.0.2")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument(
        "--announce",
        action="store_true",
        help="print BENCH_READY once the first response is in (the harness waits on it)",
    )
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
