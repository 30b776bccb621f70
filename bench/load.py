"""Drive load with wrk (Debian's package) when present, else with bench.loadgen.

Both are bounded in time and print one `BENCH_JSON {...}` line: requests, duration, latency
percentiles in µs, errors (status = responses > 399) and, for the flood, counts per status.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import BenchError

LUA_DIR = Path(__file__).resolve().parent / "lua"
ROOT = LUA_DIR.parent.parent


@dataclass(frozen=True)
class Load:
    """What one client sends: one request shape, a fixed number of keep-alive connections."""

    path: str
    auth: str | None
    method: str = "GET"
    body_bytes: int = 0
    connections: int = 32
    threads: int = 2


@dataclass(frozen=True)
class Flood:
    """A second client: a unique wrong password on every request, paced to `rate` req/s (0: as
    fast as answers come back)."""

    user: str
    path: str
    connections: int = 16
    rate: float = 0.0
    source: str = "127.0.0.2"


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _parse(out: str, what: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            return result
    raise BenchError(f"{what}: no result line in its output:\n{out[-800:]}")


def _wrk_env(extra: dict[str, str]) -> dict[str, str]:
    return dict(os.environ, BENCH_LUA_DIR=str(LUA_DIR), **extra)


def run_load(tool: str, base_url: str, load: Load, duration: int, timeout_s: int) -> dict[str, Any]:
    """Run one client for `duration` seconds against `base_url`; return its result."""
    if tool == "wrk":
        env = _wrk_env(
            {
                "BENCH_METHOD": load.method,
                "BENCH_PATH": load.path,
                "BENCH_AUTH": load.auth or "",
                "BENCH_BODY_BYTES": str(load.body_bytes),
            }
        )
        argv = [
            "wrk",
            "-t",
            str(min(load.threads, load.connections)),
            "-c",
            str(load.connections),
            "-d",
            f"{duration}s",
            "--timeout",
            f"{timeout_s}s",
            "-s",
            str(LUA_DIR / "request.lua"),
            base_url,
        ]
    else:
        env = dict(os.environ)
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            base_url + load.path,
            "-c",
            str(load.connections),
            "-d",
            str(duration),
            "--method",
            load.method,
            "--body-bytes",
            str(load.body_bytes),
            "--timeout",
            str(timeout_s),
        ]
        if load.auth:
            argv += ["--auth", load.auth]
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=duration + timeout_s + 30,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish in time") from None
    if out.returncode != 0:
        raise BenchError(f"{argv[0]} exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return _parse(out.stdout, argv[0])


class FloodClient:
    """The flood runs beside the measured client; wait_sending() returns once it is answered.

    Always bench.loadgen: it binds the source address, so the flood can come from another
    loopback address (127.0.0.2: another client) or from the legitimate client's own
    (127.0.0.1: behind the same NAT or proxy) with the same generator either way.
    """

    def __init__(self, tool: str, base_url: str, flood: Flood, duration: float) -> None:
        self.tool = "python"
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            base_url + flood.path,
            "-c",
            str(flood.connections),
            "-d",
            str(duration),
            "--rate",
            str(flood.rate),
            "--wrong-password-for",
            flood.user,
            "--timeout",
            "10",
            "--announce",
        ]
        if flood.source:
            argv += ["--source", flood.source]
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
            cwd=ROOT,
        )
        self.duration = duration

    def wait_sending(self, deadline_s: float = 15.0) -> None:
        """Block (at most `deadline_s`) until the flood announces its first answered request."""
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], deadline_s)
        line = self.popen.stdout.readline() if ready else ""
        if not line.startswith("BENCH_READY"):
            self.kill()
            raise BenchError(
                f"flood client did not start within {deadline_s:.0f} s: {line.strip()!r}"
            )

    def result(self) -> dict[str, Any]:
        try:
            out, err = self.popen.communicate(timeout=self.duration + 40)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise BenchError("flood client did not finish in time") from None
        if self.popen.returncode != 0:
            raise BenchError(f"flood client exited {self.popen.returncode}: {err.strip()[-500:]}")
        result = _parse(out, "flood client")
        result["tool"] = self.tool
        return result

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.communicate()
