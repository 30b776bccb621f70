"""Instructions per request, counted by valgrind (callgrind): repeatable where wall-clock CPU
is not (this machine is shared; the same run swings 20-40%).

    python -m bench.instructions [--method POST --body-bytes 65536] [--requests 800]

Starts the bench's nginx upstream, then the gateway twice under callgrind (shipped-size policy,
audit log to a file): once serving only a warm-up, once serving ``--requests`` more on 8
keep-alive connections. The difference over the request count is the gateway's user-space
instructions per request: Python, the C parsers, libc; not the kernel (system calls are not
counted), and ``rep movsb`` copies count one per byte. Same commit twice: within ~1%. Takes
~1 minute per pair; valgrind is from Debian (``apt-get install valgrind``), not a dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import policies, servers
from bench.procs import BenchError, free_port
from bench.servers import Server

_WARM = 20  # requests on one connection before counting: credentials cached, pool open
_CONNS = 8
_AT_LEAST = 10_000  # no Python HTTP server answers a request in fewer instructions


async def _client(port: int, request: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(request)
            line = await reader.readline()
            if b" 200 " not in line:
                raise BenchError(f"the gateway answered {line!r}")
            length = 0
            while (header := await reader.readline()) != b"\r\n":
                if header.lower().startswith(b"content-length:"):
                    length = int(header.split(b":", 1)[1])
            await reader.readexactly(length)
    finally:
        writer.close()


async def _drive(port: int, request: bytes, count: int) -> None:
    await _client(port, request, _WARM)
    share, extra = divmod(count, _CONNS)
    await asyncio.gather(*(_client(port, request, share + (i < extra)) for i in range(_CONNS)))


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 240.0) -> None:
    """Poll the health endpoint (the gateway starts slowly under valgrind)."""
    url = f"http://127.0.0.1:{port}/-/healthz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the gateway under callgrind exited ({proc.returncode})")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)  # polling a process we cannot be notified by
    raise BenchError("the gateway under callgrind did not become healthy")


def count_run(tmp: Path, policy: Path, up: Server, request: bytes, count: int) -> int:
    """Total instructions of one gateway process that served the warm-up and ``count``."""
    port = free_port()
    out = tmp / f"callgrind-{count}.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        *servers.gateway_argv(policy, up.base_url, port),
        "--audit-log",
        str(tmp / f"audit-{count}.log"),
        "--workers",
        "1",  # one process, the one callgrind traces (workers would be its children)
    ]
    with (tmp / f"callgrind-{count}.err").open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=servers.ROOT)
        try:
            _wait_healthy(port, proc)
            asyncio.run(_drive(port, request.replace(b"{port}", str(port).encode()), count))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(300)
    m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(errors="replace"), re.M)
    if m is None:
        raise BenchError(f"no instruction total in {out}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n")[0]
    )
    p.add_argument("--method", choices=("GET", "POST"), default="GET")
    p.add_argument("--body-bytes", type=int, default=0, help="POST body size (default 0)")
    p.add_argument("--requests", type=int, default=800)
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2
    body = b"x" * args.body_bytes if args.method == "POST" else b""
    try:
        with servers.scratch("rbac-instructions-") as (tmp, creds, files, started):
            up = servers.start_upstream(tmp, workers=1)
            started.append(up)
            framing = (
                b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n" % len(body)
                if args.method == "POST"
                else b""
            )
            request = (
                b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: %s\r\n%s\r\n%s"
                % (
                    args.method.encode(),
                    policies.BENCH_PATH.encode(),
                    creds.header().encode(),
                    framing,
                    body,
                )
            )
            base = count_run(tmp, files["small"], up, request, 0)
            full = count_run(tmp, files["small"], up, request, args.requests)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if (full - base) / args.requests < _AT_LEAST:
        print(
            f"error: {(full - base) / args.requests:,.0f} instructions/request: the traced "
            "process did not serve the requests (a supervisor with workers?)",
            file=sys.stderr,
        )
        return 1
    what = f"{args.method} {policies.BENCH_PATH}" + (
        f" with a {args.body_bytes}-byte body" if args.method == "POST" else ""
    )
    print(
        f"{what}: {(full - base) / args.requests:,.0f} instructions/request "
        f"(warm-up only {base:,}; with {args.requests} more {full:,})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
