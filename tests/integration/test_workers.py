"""--workers N: processes share the port, and a reload reaches every one of them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.helpers import (
    SHIPPED_POLICY,
    Process,
    basic,
    policy_doc,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("GATEWAY_URL")), reason="starts its own processes"
)
OPS = basic("ops", "imtheops")


def statuses(url: str, n: int = 40) -> list[dict]:
    out = []
    for _ in range(n):  # a new connection each time: SO_REUSEPORT spreads them
        req = urllib.request.Request(url + "/-/status", headers={**OPS, "Connection": "close"})
        with urllib.request.urlopen(req, timeout=5) as r:
            out.append(json.loads(r.read()))
    return out


def wait_all_workers(url: str, sha: str, workers: int, timeout: float = 30) -> set[int]:
    seen: list[dict] = []

    def all_there() -> set[int] | None:
        seen[:] = statuses(url)
        pids = {s["pid"] for s in seen}
        if len(pids) == workers and all(s["sha256"] == sha for s in seen):
            return pids
        return None

    return wait_until(
        all_there,
        timeout,
        0.05,
        what=lambda: f"not all {workers} workers reached {sha[:12]}: {seen[-3:]}",
    )


def login(url: str, user: str, password: str) -> int:
    """The status of one GET with these credentials, on a connection of its own."""
    req = urllib.request.Request(
        url + "/api/inventory", headers={**basic(user, password), "Connection": "close"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def two_workers(
    tmp_path: Path, upstream: str, policy: Path, *extra: str, count: int = 2
) -> Process:
    return Process(
        [
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--workers",
            str(count),
            "--no-watch",
            "--upstream",
            upstream,
            "--policy",
            str(policy),
            "--audit-log",
            "off",
            *extra,
        ],
        tmp_path / "gw.log",
    )


@pytest.mark.parametrize("trigger", ["SIGHUP", "api"])
def test_reload_reaches_every_worker(tmp_path, stack, trigger) -> None:
    policy = tmp_path / "rbac.yaml"
    shutil.copy(SHIPPED_POLICY, policy)
    gw = two_workers(tmp_path, stack.backend_url, policy)
    try:
        url = gw.wait_listening()
        gw.wait_healthy("/-/healthz")
        first = statuses(url)[0]["sha256"]
        pids = wait_all_workers(url, first, 2)
        assert gw.pid not in pids  # the supervisor serves nothing itself
        doc = yaml.safe_load(policy.read_text())
        doc["roles"]["sales"]["description"] = "changed"
        write_policy(policy, doc)
        if trigger == "SIGHUP":
            os.kill(gw.pid, signal.SIGHUP)
        else:
            req = urllib.request.Request(url + "/-/reload", method="POST", headers=OPS)
            with urllib.request.urlopen(req, timeout=10) as r:
                assert json.loads(r.read())["status"] == "reloaded"

        def changed() -> str | None:
            sha: str = statuses(url, 1)[0]["sha256"]
            return sha if sha != first else None

        new = wait_until(changed, 20, what="the policy's sha256 changed")
        assert new != first
        assert wait_all_workers(url, new, 2) == pids
    finally:
        rc = gw.stop()
    assert rc == 0, gw.output()
    assert "Traceback" not in gw.output()


def test_failed_logins_are_counted_once_over_all_workers(tmp_path, stack) -> None:
    """A guesser whose connections the kernel spreads over the workers meets one throttle:
    the supervisor's. With a throttle per worker it had ~N times the guesses."""
    doc = policy_doc()  # cost-4 hashes: fast; and one user whose check takes ~0.2 s
    doc["users"]["slow"] = {
        "password_hash": bcrypt.hashpw(b"slow-secret", bcrypt.gensalt(rounds=12)).decode(),
        "roles": ["sales"],
    }
    policy = write_policy(tmp_path / "rbac.yaml", doc)
    # the 429s answer at once: the back-off window outlasts the test
    gw = two_workers(tmp_path, stack.backend_url, policy, "--throttle-delay", "0.01")
    try:
        url = gw.wait_listening()
        gw.wait_healthy("/-/healthz")
        seen = statuses(url)
        wait_all_workers(url, seen[0]["sha256"], 2)  # both workers take connections
        assert all(s["login_throttle"] == {"shared": True, "unanswered": 0} for s in seen)
        # a new connection each: spread over both workers
        codes = [login(url, "manager", f"guess-{i}") for i in range(16)]
        # 5 failures are free, the 6th starts a 1 s back-off: then 429 whichever worker answers
        assert codes == [401] * 6 + [429] * 10, codes

        # Six guesses at once on fresh connections: two password checks run (one address
        # gets two at a time over all workers, as in one process), the others get 429 now.
        with ThreadPoolExecutor(6) as pool:
            at_once = sorted(pool.map(lambda i: login(url, "slow", f"guess-{i}"), range(6)))
        assert at_once == [401, 401, 429, 429, 429, 429], at_once
        after = statuses(url)
        assert all(s["login_throttle"]["unanswered"] == 0 for s in after)
        assert len({s["pid"] for s in after}) == 2
    finally:
        rc = gw.stop()
    assert rc == 0, gw.output()
    assert "Traceback" not in gw.output()


def test_a_cold_burst_of_good_logins_passes_whatever_the_worker_count(tmp_path, stack) -> None:
    """After a start every worker checks the same credentials once: those checks share one
    of the address's two slots (as one process's requests share one check), so a client's
    burst is never refused; nor are two users behind one address (a NAT)."""
    doc = policy_doc()
    for name in ("slow", "slow2"):  # cost 12: the checks overlap the whole burst
        doc["users"][name] = {
            "password_hash": bcrypt.hashpw(b"slow-secret", bcrypt.gensalt(rounds=12)).decode(),
            "roles": ["sales"],
        }
    policy = write_policy(tmp_path / "rbac.yaml", doc)
    gw = two_workers(tmp_path, stack.backend_url, policy, count=3)
    try:
        url = gw.wait_listening()
        gw.wait_healthy("/-/healthz")

        users = ["slow"] * 16 + ["slow2"] * 16
        with ThreadPoolExecutor(32) as pool:
            burst = list(pool.map(lambda user: login(url, user, "slow-secret"), users))
        assert burst == [200] * 32, burst
    finally:
        rc = gw.stop()
    assert rc == 0, gw.output()
    assert "Traceback" not in gw.output()
