"""A real gateway whose audit log lives on a tiny tmpfs that fills up: requests are answered
as usual, the metric and /-/status count the errors, and writing resumes whole once space is
freed."""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SHIPPED_POLICY, Process, basic, fill, tmpfs, wait_until
from tests.integration.conftest import start_backend

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("GATEWAY_URL")), reason="starts its own processes"
)

OPS = basic("ops", "imtheops")
MANAGER = basic("manager", "imthemanager")
SALES = basic("sales", "imsales")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        yield disk


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def metric(url: str, name: str) -> float:
    conn = http.client.HTTPConnection(*_hostport(url), timeout=10)
    try:
        status, body = call(conn, "GET", "/-/metrics", OPS)
    finally:
        conn.close()
    assert status == 200, body
    m = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def load(url: str, tag: str, per_thread: int, threads: int = 4) -> list[str]:
    """POST then GET an item, per_thread times in each thread on its own keep-alive
    connection; return every problem (connection errors, unexpected statuses)."""
    problems: list[str] = []

    def run(t: int) -> None:
        conn = http.client.HTTPConnection(*_hostport(url), timeout=10)
        try:
            for i in range(per_thread):
                name = f"{tag}-{t}-{i}"
                try:
                    status, body = call(
                        conn,
                        "POST",
                        "/api/inventory",
                        {**MANAGER, "Content-Type": "application/json"},
                        json.dumps({"name": name, "quantity": i}).encode(),
                    )
                    if status != 201:
                        problems.append(f"POST {name}: {status} {body[:100]!r}")
                    status, body = call(conn, "GET", f"/api/inventory?name={name}", SALES)
                    if status != 200:
                        problems.append(f"GET {name}: {status} {body[:100]!r}")
                except (OSError, http.client.HTTPException) as exc:
                    problems.append(f"{name}: {exc!r}")
                    conn.close()
                    conn = http.client.HTTPConnection(*_hostport(url), timeout=10)
        finally:
            conn.close()

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    return problems


def test_a_full_audit_disk_fails_no_request_and_writing_resumes(
    tmp_path: Path, tiny_disk: Path
) -> None:
    audit = tiny_disk / "audit.log"
    backend = start_backend(tmp_path)
    gw = Process(
        [
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--upstream",
            backend.url,
            "--policy",
            str(SHIPPED_POLICY),
            "--audit-log",
            str(audit),
            "--no-watch",
            "--workers",
            "1",  # one writer: "logged once per episode" is per process
        ],
        tmp_path / "gateway.log",
    )
    try:
        url = gw.wait_listening()
        gw.wait_healthy("/-/healthz")
        filler = fill(tiny_disk)
        problems = load(url, "full", per_thread=150)
        assert problems == [], problems[:10]
        wait_until(
            lambda: metric(url, "gateway_audit_write_errors_total") != 0,
            10,
            0.05,
            what="no audit write error counted",
        )
        assert metric(url, "gateway_audit_dropped_lines_total") >= 1
        # No request is missing from the metrics either.
        assert metric(url, r'gateway_requests_total\{decision="allow",status="201"\}') == 600
        conn = http.client.HTTPConnection(*_hostport(url), timeout=10)
        status, body = call(conn, "GET", "/-/status", OPS)
        conn.close()
        assert status == 200
        state = json.loads(body)["audit"]
        assert state["write_errors"] >= 1 and state["last_error"].startswith("ENOSPC")

        filler.unlink()  # space returns
        assert load(url, "after", per_thread=10) == []

        def written_again() -> bool:
            text = audit.read_bytes()
            lines = [json.loads(line) for line in text.splitlines()]  # every line whole
            return text.endswith(b"\n") and any(
                str(r.get("path")) == "/api/inventory"
                and r.get("method") == "POST"
                and r.get("status") == 201
                for r in lines[-40:]
            )

        wait_until(written_again, 10, 0.05, what="audit lines not written after space returned")
    finally:
        rc = gw.stop()
        backend.stop()
    out = gw.output()
    assert rc == 0, out
    assert "Traceback" not in out and "cannot listen" not in out, out
    assert out.count("cannot write") == 1, out  # once per episode
    assert "writing again" in out, out
    for line in audit.read_bytes().splitlines():
        json.loads(line)
