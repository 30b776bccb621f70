"""--workers N under faults: dead workers come back, workers die with their supervisor, and a
second gateway on the same port is refused."""

from __future__ import annotations

import http.client
import json
import os
import signal
from pathlib import Path

import pytest

from tests.helpers import SHIPPED_POLICY, Process, basic, wait_until

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("GATEWAY_URL")), reason="starts its own processes"),
    pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc"),
]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None once it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def running(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def workers_of(supervisor: int) -> list[int]:
    """Live children of the supervisor, oldest first (slot 0 first at the start)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == supervisor and st[0] not in ("Z", "X"):
                kids.append((st[2], int(entry)))
    return [pid for _, pid in sorted(kids)]


def serving_pids(url: str, n: int = 30) -> set[int]:
    """Worker pids that answered, one new connection per request (SO_REUSEPORT spreads them)."""
    return set(worker_statuses(url, n))


def worker_statuses(url: str, n: int = 30) -> dict[int, dict]:
    """pid -> the "worker" part of /-/status, for each worker that answered."""
    host, port = url.removeprefix("http://").split(":")
    pids = {}
    for _ in range(n):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", "/-/status", headers=basic("ops", "imtheops"))
            resp = conn.getresponse()
            if resp.status == 200:
                doc = json.loads(resp.read())
                pids[doc["pid"]] = doc.get("worker")
        except OSError:
            pass
        finally:
            conn.close()
    return pids


def get_retrying_once(url: str, path: str = "/-/healthz") -> int | None:
    """The answer's status, trying a second connection after a connection error; None if both
    failed."""
    host, port = url.removeprefix("http://").split(":")
    for _ in range(2):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        except OSError:
            continue
        finally:
            conn.close()
    return None


def kill_leftovers(pids: list[int]) -> None:
    """Failure clean-up: SIGKILL the workers this test saw that still run (by pid)."""
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def start(tmp: Path, name: str, *extra: str) -> Process:
    return Process(
        [
            "-m",
            "gateway",
            "serve",
            "--workers",
            "2",
            "--no-watch",
            "--upstream",
            "http://127.0.0.1:9",
            "--policy",
            str(SHIPPED_POLICY),
            "--audit-log",
            "off",
            *extra,
        ],
        tmp / f"{name}.log",
    )


def start_serving(tmp: Path, name: str, *extra: str, port: int = 0) -> tuple[Process, list[int]]:
    gw = start(tmp, name, "--port", str(port), *extra)
    gw.wait_listening()
    gw.wait_healthy("/-/healthz")
    wait_until(lambda: len(serving_pids(gw.url)) == 2, 30, what="both workers serving")
    return gw, workers_of(gw.pid)


@pytest.mark.parametrize("victim", [0, 1], ids=["first-worker", "second-worker"])
def test_a_killed_worker_is_replaced_and_clients_that_retry_see_no_failure(
    tmp_path, victim
) -> None:
    gw, workers = start_serving(tmp_path, "gw")
    fresh = workers
    try:
        assert len(workers) == 2
        dead = workers[victim]
        os.kill(dead, signal.SIGKILL)
        fresh = wait_until(
            lambda: (lambda w: w if len(w) == 2 and dead not in w else None)(workers_of(gw.pid)),
            2.0,
            what="worker replaced",
        )
        assert _stat(dead) is None, "the dead worker was not reaped (zombie)"
        assert gw.proc.poll() is None, gw.output()
        failures = [s for s in (get_retrying_once(gw.url) for _ in range(200)) if s != 200]
        assert failures == []
        wait_until(lambda: serving_pids(gw.url) == set(fresh), 20, what="the new worker serves")
        new = (set(fresh) - set(workers)).pop()
        assert worker_statuses(gw.url, 40).get(new) == {
            "supervisor": gw.pid,
            "slot": victim,
            "restarts": 1,
        }
        out = gw.output()
        assert f"worker {dead} (slot {victim}) died" in out and "signal SIGKILL" in out, out
        assert "restart #1" in out, out
    finally:
        rc = gw.stop()
        left = [p for p in {*workers, *fresh} if running(p)]
        kill_leftovers(left)
    assert rc == 0, gw.output()
    assert left == [], "workers left after SIGTERM"
    assert "Traceback" not in gw.output()


def test_workers_exit_when_their_supervisor_is_killed(tmp_path) -> None:
    gw, workers = start_serving(tmp_path, "old")
    port = int(gw.url.rsplit(":", 1)[1])
    os.kill(gw.pid, signal.SIGKILL)
    gw.stop()
    try:
        wait_until(
            lambda: not any(running(p) for p in workers),
            2.0,
            what=f"workers {workers} gone after their supervisor's death",
        )
    finally:
        kill_leftovers(workers)
    # The port is free again: a new generation starts on it and is alone there.
    new, new_workers = start_serving(tmp_path, "new", port=port)
    try:
        assert serving_pids(new.url) == set(new_workers)
    finally:
        assert new.stop() == 0, new.output()


def test_sigterm_stops_every_worker_and_exits_0(tmp_path) -> None:
    gw, workers = start_serving(tmp_path, "gw")
    os.kill(gw.pid, signal.SIGTERM)
    assert gw.proc.wait(timeout=15) == 0, gw.output()
    gw.stop()
    left = [p for p in workers if running(p)]
    kill_leftovers(left)
    assert left == []
    assert "Traceback" not in gw.output()


def test_a_second_gateway_on_the_same_port_is_refused(tmp_path) -> None:
    first, workers = start_serving(tmp_path, "first")
    port = int(first.url.rsplit(":", 1)[1])
    try:
        second = start(tmp_path, "second", "--port", str(port))
        try:
            assert second.proc.wait(timeout=30) == 1, second.output()
        finally:
            second.stop()
        assert (
            f"gateway: 127.0.0.1:{port} is already in use (another gateway?); refusing to start"
        ) in second.output()
        assert serving_pids(first.url) == set(workers)
        # Asked for explicitly, sharing is allowed.
        shared = start(tmp_path, "shared", "--port", str(port), "--reuse-port")
        try:
            shared.wait_listening()
            assert shared.proc.poll() is None
        finally:
            assert shared.stop() == 0, shared.output()
    finally:
        assert first.stop() == 0, first.output()
        kill_leftovers(workers)


def test_a_worker_that_keeps_dying_is_retried_with_back_off(tmp_path) -> None:
    policy = tmp_path / "rbac.yaml"
    policy.write_bytes(SHIPPED_POLICY.read_bytes())
    gw, workers = start_serving(tmp_path, "gw", "--policy", str(policy))
    try:
        policy.write_text("version: 1\nroles: [not, a, mapping]\n")  # new workers refuse it
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: "restarting in 0.8 s" in gw.output(), 20, what="back-off reached 0.8 s")
        out = gw.output()
        assert [d for d in ("0.1", "0.2", "0.4") if f"restarting in {d} s" not in out] == []
        assert gw.proc.poll() is None and serving_pids(gw.url) == {workers[1]}
        policy.write_bytes(SHIPPED_POLICY.read_bytes())  # fixed: the next restart stays up
        wait_until(lambda: len(serving_pids(gw.url)) == 2, 20, what="the slot serves again")
    finally:
        rc = gw.stop()
        kill_leftovers(workers)
    assert rc == 0, gw.output()


def test_one_stop_signalled_two_ways_at_once_is_still_graceful(tmp_path) -> None:
    """Ctrl-C reaches the whole process group and a wrapper (make run) passes it on: the
    supervisor gets two signals within milliseconds. That is one stop, not 'kill now'."""
    gw, workers = start_serving(tmp_path, "gw")
    os.kill(gw.pid, signal.SIGINT)
    os.kill(gw.pid, signal.SIGTERM)
    assert gw.proc.wait(timeout=15) == 0, gw.output()
    gw.stop()
    left = [p for p in workers if running(p)]
    kill_leftovers(left)
    out = gw.output()
    assert left == [] and "killing it" not in out, out
    assert out.count("stopped: exit code 0") == 2, out
