"""Streamed uploads do not make the gateway fault its heap back in on every request.

Counted, not timed: the minor page faults of the real gateway process (``/proc/PID/stat``)
while it relays 64 KiB uploads. With glibc's default thresholds every upload's freed buffers
were handed back to the kernel and faulted in again (14 faults per upload under the bench's
load); :mod:`gateway.memory` keeps them. The same run with an operator's own ``MALLOC_*_``
setting shows the faults come back when the gateway steps aside, so the count can fail.
"""

from __future__ import annotations

import http.client
import os
import platform
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gateway.memory import keep_freed_memory
from tests.helpers import SHIPPED_POLICY, Process, basic
from tests.integration.conftest import start_gateway

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("GATEWAY_URL")), reason="starts its own processes"),
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only"),
]

BODY = b"x" * (64 * 1024)
MANAGER = basic("manager", "imthemanager")
CLIENTS = 32
UPLOADS = 20  # per client and per measurement


def minor_faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])  # minflt: field 10 of stat, the 8th after the command name


def upload(url: str, n: int, errors: list[str]) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        for _ in range(n):
            conn.request("POST", "/api/inventory", BODY, {**MANAGER, "Content-Type": "text/plain"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors.append(f"status {r.status}")
    finally:
        conn.close()


def faults_per_upload(url: str, pid: int) -> float:
    def round_of_uploads() -> None:
        errors: list[str] = []
        threads = [
            threading.Thread(target=upload, args=(url, UPLOADS, errors)) for _ in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]

    round_of_uploads()  # warm: pool connections, caches, the heap's high-water mark
    before = minor_faults(pid)
    round_of_uploads()
    return (minor_faults(pid) - before) / (CLIENTS * UPLOADS)


@pytest.fixture
def recorder(tmp_path: Path):
    p = Process(
        ["-m", "tests.integration.recorder", "--port", "0", "--log", str(tmp_path / "req.jsonl")],
        tmp_path / "recorder.log",
    )
    try:
        p.wait_listening()
        yield p
    finally:
        p.stop()


def start(tmp_path: Path, upstream: str, env: dict[str, str]) -> Process:
    policy = tmp_path / "rbac.yaml"
    shutil.copy(SHIPPED_POLICY, policy)
    # one process: the test reads its memory by its pid
    return start_gateway(
        tmp_path, upstream, policy, "--log-level", "DEBUG", "--workers", "1", env=env
    )


def test_uploads_reuse_freed_heap_and_an_operator_setting_wins(tmp_path, recorder) -> None:
    gw = start(tmp_path, recorder.url, {})
    try:
        tuned = faults_per_upload(gw.url, gw.pid)
    finally:
        gw.stop()
    assert "malloc keeps up to 16 MiB freed for reuse" in gw.output()
    # glibc's own default, set by hand: the gateway leaves malloc to the environment
    gw = start(tmp_path, recorder.url, {"MALLOC_TOP_PAD_": str(128 * 1024)})
    try:
        untuned = faults_per_upload(gw.url, gw.pid)
    finally:
        gw.stop()
    assert "malloc left to the environment (MALLOC_TOP_PAD_)" in gw.output()
    assert tuned < 0.5, f"{tuned:.2f} page faults per 64 KiB upload"
    assert untuned > 1.0, f"glibc's defaults: {untuned:.2f} faults per upload (tuned {tuned:.2f})"


def test_the_thresholds_are_not_applied_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_freed_memory() == "malloc left to the environment (MALLOC_TRIM_THRESHOLD_)"
