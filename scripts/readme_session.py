"""Run the README's terminal sessions against the real gateway and fail when they drift.

Every fenced block in README.md that follows a line ``<!-- session -->`` is a terminal
session: lines starting with ``$ `` are commands, the lines up to the next command are what
it printed (stdout and stderr, as a terminal shows them). This script starts the real
inventory backend (fresh SQLite database) and the real gateway (``serve --workers 1`` with a
copy of the shipped rbac.yaml) on ephemeral ports of 127.0.0.1, runs every command with ``bash`` in a
scratch directory that looks like a checkout after ``make run`` (``rbac.yaml``, ``.venv``),
and compares what it printed with the README.

    .venv/bin/python scripts/readme_session.py            # exit 1 and a diff on drift
    .venv/bin/python scripts/readme_session.py --update   # rewrite the blocks from real output

Commands are run as written except that ``127.0.0.1:8080`` and ``:8081`` become the ports in
use, and ``GATEWAY_URL`` points at the gateway (for ``rbac-gateway reload``). The outputs are
compared after normalising what changes from run to run: ports, dates, times, sha256
digests, pids and milliseconds. The watcher of the session gateway polls every 10 minutes, so
the reloads shown are the ones the commands make (under ``make run`` the watcher may be a
second faster; ``reload`` then prints ``unchanged``).

tests/integration/test_readme.py runs this; tests/integration/test_tutorial.py runs the
tutorial block (the first session) against a stack of its own or GATEWAY_URL.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "<!-- session -->"
GATEWAY_PORT, BACKEND_PORT = "8080", "8081"
COMMAND_TIMEOUT = 20.0

_NORMALISE = [
    (
        re.compile(r"Date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT"),
        "Date: <date>",
    ),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z"), "<time>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<sha256>"),
    (re.compile(r"\b[0-9a-f]{12}\b"), "<sha12>"),
    (re.compile(r'("pid":\s*)\d+'), r"\1<pid>"),
    (re.compile(r'("(?:upstream|total)_ms":\s*)[\d.]+'), r"\1<ms>"),
]


@dataclass
class Step:
    command: str
    output: str  # expected (from the README) or actual


@dataclass
class Block:
    start: int  # index of the opening fence line in the README's lines
    end: int  # index of the closing fence line
    steps: list[Step]


def normalise(text: str) -> str:
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    lines = [line.rstrip() for line in text.replace("\r", "").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def parse(readme: str) -> list[Block]:
    """The session blocks of ``readme``, in order."""
    lines = readme.split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == MARK:
            start = i + 1
            if start >= len(lines) or not lines[start].startswith("```"):
                raise SystemExit(f"README.md:{i + 1}: {MARK} must be followed by a ``` block")
            end = start + 1
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            steps: list[Step] = []
            for line in lines[start + 1 : end]:
                if line.startswith("$ "):
                    steps.append(Step(line[2:], ""))
                elif steps:
                    steps[-1].output += line + "\n"
                else:
                    raise SystemExit(f"README.md:{start + 2}: a session starts with '$ '")
            blocks.append(Block(start, end, steps))
            i = end
        i += 1
    return blocks


def run_step(
    command: str, cwd: Path, gateway: str, backend: str | None, env: dict[str, str]
) -> str:
    """Run one README command against ``gateway`` (http://host:port); its output with the
    ports put back as the README writes them."""
    g_host = gateway.split("://", 1)[1]
    cmd = command.replace(f"127.0.0.1:{GATEWAY_PORT}", g_host)
    if backend:
        cmd = cmd.replace(f"127.0.0.1:{BACKEND_PORT}", backend.split("://", 1)[1])
    proc = subprocess.run(
        ["bash", "-c", cmd],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        timeout=COMMAND_TIMEOUT,
    )
    out = proc.stdout.decode("utf-8", "replace").replace("\r\n", "\n")
    out = out.replace(g_host, f"127.0.0.1:{GATEWAY_PORT}")
    if backend:
        out = out.replace(backend.split("://", 1)[1], f"127.0.0.1:{BACKEND_PORT}")
    if out and not out.endswith("\n"):
        out += "\n"  # a body without a newline: the README puts the next $ below it
    return out


def run_block(
    block: Block,
    cwd: Path,
    gateway: str,
    backend: str | None = None,
    env: dict[str, str] | None = None,
) -> list[Step]:
    # PYTHONUNBUFFERED: stdout and stderr interleave as on a terminal
    env = {**os.environ, "GATEWAY_URL": gateway, "PYTHONUNBUFFERED": "1", **(env or {})}
    return [Step(s.command, run_step(s.command, cwd, gateway, backend, env)) for s in block.steps]


def differences(block: Block, actual: list[Step], where: str = "README.md") -> list[str]:
    """Unified diffs (normalised) between what the README shows and what ran."""
    problems = []
    for want, got in zip(block.steps, actual):
        a, b = normalise(want.output), normalise(got.output)
        if a != b:
            diff = "\n".join(
                difflib.unified_diff(a.split("\n"), b.split("\n"), "README", "actual", lineterm="")
            )
            problems.append(f"{where}:{block.start + 1}: $ {want.command}\n{diff}")
    return problems


# -- the stack -----------------------------------------------------------------------------

_LISTENING = re.compile(rb"listening on (https?://[\d.]+:\d+)")


class Service:
    """A real server process, stopped by PID."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT
        )
        self.url = ""

    def wait(self, health: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.url:
                m = _LISTENING.search(self.log.read_bytes())
                if m:
                    self.url = m.group(1).decode()
            if self.url:
                try:
                    with urllib.request.urlopen(self.url + health, timeout=2) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)  # polling a condition with a deadline
        raise RuntimeError(f"{self.log.name}: did not start:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode


def scratch_checkout(tmp: Path) -> Path:
    """A directory that looks like a checkout after ``make run``: rbac.yaml and .venv."""
    work = tmp / "checkout"
    work.mkdir()
    shutil.copy(ROOT / "rbac.yaml", work / "rbac.yaml")
    venv = ROOT / ".venv"
    if venv.is_dir():
        (work / ".venv").symlink_to(venv)
    return work


def run_all(readme: str, tmp: Path) -> tuple[list[Block], list[list[Step]], str]:
    """Start the stack, run every session; the blocks, their outputs and the gateway log."""
    work = scratch_checkout(tmp)
    backend = Service(
        ["-m", "inventory_backend", "--port", "0", "--db", str(tmp / "inventory.db")],
        tmp / "backend.log",
        ROOT,
    )
    gateway = None
    try:
        backend.wait("/healthz")
        gateway = Service(
            [
                "-m",
                "gateway",
                "serve",
                "--port",
                "0",
                "--upstream",
                backend.url,
                "--policy",
                "rbac.yaml",
                "--watch-interval",
                "600",
                "--workers",
                "1",  # one process answers every command: the counters shown add up
            ],
            tmp / "gateway.log",
            work,
        )  # audit lines on stdout, as make run
        gateway.wait("/-/healthz")
        blocks = parse(readme)
        outputs = [run_block(b, work, gateway.url, backend.url) for b in blocks]
    finally:
        if gateway is not None:
            gateway.stop()
        backend.stop()
    return blocks, outputs, (tmp / "gateway.log").read_text(errors="replace")


def rewrite(readme: str, blocks: list[Block], outputs: list[list[Step]]) -> str:
    lines = readme.split("\n")
    for block, steps in reversed(list(zip(blocks, outputs))):
        body = []
        for s in steps:
            body.append(f"$ {s.command}")
            body.extend(s.output.rstrip("\n").split("\n") if s.output.strip() else [])
        lines[block.start + 1 : block.end] = body
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--update",
        action="store_true",
        help="rewrite the README's session blocks with the real output",
    )
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument(
        "--show-log",
        action="store_true",
        help="print the gateway's output (server log and audit lines) at the end",
    )
    args = ap.parse_args(argv)
    readme = args.readme.read_text()
    with tempfile.TemporaryDirectory(prefix="readme-session-") as tmp:
        blocks, outputs, log = run_all(readme, Path(tmp))
    if args.show_log:
        print(log)
    if "Traceback" in log:
        print(f"the gateway logged a traceback:\n{log}", file=sys.stderr)
        return 1
    if args.update:
        args.readme.write_text(rewrite(readme, blocks, outputs))
        print(f"{args.readme}: {len(blocks)} session blocks rewritten")
        return 0
    problems = [p for b, o in zip(blocks, outputs) for p in differences(b, o, args.readme.name)]
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} README commands print something else now; fix the README or "
            f"run {Path(__file__).relative_to(ROOT)} --update and review the diff",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.readme.name}: {sum(len(b.steps) for b in blocks)} commands in "
        f"{len(blocks)} sessions match"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
