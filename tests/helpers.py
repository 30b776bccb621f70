"""Helpers shared by the test suites (imported, not fixtures)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import bcrypt
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_POLICY = ROOT / "rbac.yaml"

# The tutorial's demo credentials, plus test-only users.
PASSWORDS = {
    "sales": "imsales",
    "warehouse": "imthewarehouse",
    "manager": "imthemanager",
    "ops": "imtheops",
}


T = TypeVar("T")


def _describe(what: str | Callable[[], str] | None, condition: object) -> str:
    if what is None:
        return str(condition)
    return what if isinstance(what, str) else what()


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    interval: float = 0.01,
    *,
    what: str | Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds.
    The one way tests wait for something that happens in the background.

    ``condition`` may return an awaitable (an ``async def`` predicate): it is awaited.
    Returns the first truthy value. ``what`` (a string, or a callable giving one when the
    wait fails, to show the last state seen) names what was awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if loop.time() > deadline:
            raise AssertionError(
                f"condition not met within {timeout}s: {_describe(what, condition)}"
            )
        await asyncio.sleep(interval)


def wait_until(
    condition: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.02,
    *,
    what: str | Callable[[], str] | None = None,
) -> T:
    """:func:`eventually` for code outside an event loop (integration tests).
    Returns the first truthy value of ``condition``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"condition not met within {timeout}s: {_describe(what, condition)}"
            )
        time.sleep(interval)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def fast_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def policy_doc(
    extra_users: dict[str, tuple[str, list[str]]] | None = None,
    extra_roles: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The shipped policy with cost-4 hashes of the same passwords (fast tests), plus extras."""
    doc = yaml.safe_load(SHIPPED_POLICY.read_text())
    for name, password in PASSWORDS.items():
        doc["users"][name]["password_hash"] = fast_hash(password)
    for name, spec in (extra_roles or {}).items():
        doc["roles"][name] = spec
    for name, (password, roles) in (extra_users or {}).items():
        doc["users"][name] = {"password_hash": fast_hash(password), "roles": roles}
    return doc


def write_policy(path: Path, doc: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename), as an editor would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path


_LISTENING = re.compile(r"listening on (https?://[\d.]+:\d+)")


class Process:
    """A real server process started by a test; stopped by PID in ``stop``."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        self.url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.log.read_text(errors="replace"))
            if m:
                self.url = m.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.02)  # polling a log file for a condition, with a deadline
        raise TimeoutError(f"process did not start listening:\n{self.output()}")

    def wait_healthy(self, path: str, timeout: float = 30.0) -> None:
        wait_for_status(self.url + path, 200, timeout)

    def output(self) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode


def wait_for_status(
    url: str, status: int, timeout: float = 30.0, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                last = r.status
        except urllib.error.HTTPError as e:
            last = e.code
        except (urllib.error.URLError, OSError) as e:
            last = e
        if last == status:
            return
        time.sleep(0.05)  # polling a condition with a deadline
    raise TimeoutError(f"{url} did not answer {status} in {timeout}s (last: {last})")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path`` (needs root): a disk that can fill up.
    Skips the test where mounting is not permitted."""
    import pytest

    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with a filler file; return it (delete it to free)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def nginx_check(method: str, uri: str, **extra: str) -> dict[str, str]:
    """The headers nginx's auth_request (deploy/nginx) puts on a check request."""
    return {"X-Original-Method": method, "X-Original-URI": uri, **extra}
