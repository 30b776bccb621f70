"""`make run`'s script: both services come up, serve the tutorial, and Ctrl-C stops both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers import ROOT, basic, wait_for_status

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("GATEWAY_URL")), reason="starts its own processes"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_script_serves_and_ctrl_c_stops_both(tmp_path) -> None:
    gw, be = free_port(), free_port()
    env = {
        **os.environ,
        "GATEWAY_PORT": str(gw),
        "INVENTORY_PORT": str(be),
        "INVENTORY_DB": str(tmp_path / "data" / "inventory.db"),
        "GATEWAY_AUDIT_LOG": str(tmp_path / "audit.log"),
    }
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "scripts/run_stack.py"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_status(f"http://127.0.0.1:{gw}/-/ready", 200, timeout=40)
        req = urllib.request.Request(
            f"http://127.0.0.1:{gw}/api/inventory?name=X-Men+1+(1991)",
            headers=basic("sales", "imsales"),
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
            assert b'"count": 5000' in r.read()
        assert (tmp_path / "data" / "inventory.db").exists()  # created and seeded when new
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rc = proc.wait(timeout=30)
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert rc == 0, out
    assert "Traceback" not in out, out
    for port in (gw, be):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"
