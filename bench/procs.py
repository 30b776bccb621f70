"""The processes a bench run owns: start, health-wait, CPU accounting, stop.

Every server is started in its own session (so a Ctrl-C in the terminal reaches the harness,
which then stops the servers in order) and is stopped by its pid, then by its process group
(whose id is that same pid) for any worker it forked. Nothing else on the machine is touched.

CPU time comes from /proc/PID/stat: utime+stime of every live process in the tree, plus
cutime+cstime, which hold the time of descendants that have exited and been reaped (the kernel
folds a reaped child's own and children's time into its parent's c-fields, recursively). The sum
over the tree therefore only grows, whatever forks and exits during a measured window.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """A candidate could not be started or measured; the run reports it and goes on."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A server process we started; `pid` is also its process-group id."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    extra_roots: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server, then its group; SIGKILL whatever is left after `grace` s."""
        if self.alive():
            self._signal_pid(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(5)
        # Workers the server forked (same group) may outlive a leader that died abruptly.
        if self._group_exists():
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self._group_exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._group_exists():
                self._signal_group(signal.SIGKILL)

    def _signal_pid(self, sig: int) -> None:
        try:
            self.popen.send_signal(sig)
        except ProcessLookupError:
            pass

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _group_exists(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Proc:
    """Start a server with stdout+stderr to `log` (a file: a pipe could fill and stall it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"{name}: cannot start {argv[0]}: {exc}") from None
    return Proc(name, popen, log)


def http_status(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0
) -> int | None:
    """Status of a GET, or None when nothing answers."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)
    except (OSError, ValueError):
        return None


def wait_http(
    proc: Proc,
    url: str,
    accept: Callable[[int], bool] = lambda s: s == 200,
    *,
    headers: Mapping[str, str] | None = None,
    deadline_s: float = 30.0,
) -> int:
    """Poll `url` until its status is accepted; fail early if the process exits."""
    deadline = time.monotonic() + deadline_s
    last: int | None = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} before serving; log tail:\n"
                f"{proc.log_tail()}"
            )
        last = http_status(url, headers, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
        if last is not None and accept(last):
            return last
        time.sleep(0.05)
    raise BenchError(
        f"{proc.name}: {url} not ready within {deadline_s:.0f} s (last status {last}); "
        f"log tail:\n{proc.log_tail()}"
    )


def _stat_fields(pid: str) -> tuple[int, list[str]] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return int(rest[1]), rest  # rest[0] is state, rest[1] ppid


def _tree(roots: Iterable[int]) -> list[list[str]]:
    """The stat fields (from field 3 on) of every process in the trees under `roots`."""
    children: dict[int, list[int]] = {}
    fields: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        got = _stat_fields(entry)
        if got is None:
            continue
        ppid, rest = got
        pid = int(entry)
        fields[pid] = rest
        children.setdefault(ppid, []).append(pid)
    out: list[list[str]] = []
    seen: set[int] = set()
    todo = [r for r in roots if r in fields]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(fields[pid])
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_ticks(roots: Iterable[int]) -> int:
    """utime+stime+cutime+cstime summed over the process trees under `roots` (clock ticks)."""
    # Fields 14-17 of stat (1-based) are utime, stime, cutime, cstime; rest starts at 3.
    return sum(int(r[11]) + int(r[12]) + int(r[13]) + int(r[14]) for r in _tree(roots))


def tree_rss_bytes(roots: Iterable[int]) -> int:
    """Resident memory summed over the process trees under `roots` (stat field 24, pages)."""
    return sum(int(r[21]) for r in _tree(roots)) * PAGE_SIZE


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    return tree_cpu_ticks(roots) / CLK_TCK


def system_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


def wait_quiet(
    roots: Iterable[int],
    *,
    idle_share: float = 0.03,
    window_s: float = 0.2,
    deadline_s: float = 20.0,
) -> float:
    """Wait until the trees under `roots` use < `idle_share` of one CPU over `window_s`.

    A slow candidate (bcrypt on every request) keeps computing for requests the load generator
    already gave up on; that work must not be billed to the next candidate measured.
    Returns how long it took.
    """
    roots = list(roots)
    started = time.monotonic()
    deadline = started + deadline_s
    before = tree_cpu_ticks(roots)
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = tree_cpu_ticks(roots)
        if (now - before) / CLK_TCK < idle_share * window_s + 1.0 / CLK_TCK:
            break
        before = now
    return time.monotonic() - started
