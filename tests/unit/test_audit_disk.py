"""The audit log on a failing disk: no error reaches the caller, lines are dropped whole and
counted, the failure is logged once per episode, and writing resumes by itself."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.metrics import Metrics
from tests.helpers import fill, tmpfs

RECORD = {
    "event": "request",
    "time": "2026-12-04T17:00:00.000Z",
    "client": "127.0.0.1",
    "user": "sales",
    "method": "GET",
    "path": "/api/inventory",
    "decision": "allow",
    "rule": "roles.sales.allow[0]",
    "status": 200,
    "upstream_ms": 1.5,
    "total_ms": 2.5,
}


def record(i: int) -> dict[str, object]:
    return {**RECORD, "seq": i, "pad": "é" * (i % 300)}  # lines of varied length, non-ASCII


def parsed(path: Path) -> list[dict[str, object]]:
    text = path.read_bytes()
    assert text == b"" or text.endswith(b"\n"), text[-80:]
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        yield disk


def test_dev_full_never_raises_counts_and_logs_once_then_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    audit = AuditLog.to_file("/dev/full")
    for i in range(10):
        audit.write(record(i))
    audit.flush()
    for i in range(10, 15):
        audit.write(record(i))
    audit.flush()
    assert audit.write_errors == 2 and audit.dropped_lines == 15
    assert audit.last_error is not None and audit.last_error.startswith("ENOSPC")
    assert audit.status()["failing"] is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    # Space comes back: the same fd now leads to a normal file.
    good = os.open(tmp_path / "audit.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    fd = audit.fileno()
    assert fd is not None
    os.dup2(good, fd)
    os.close(good)
    audit.write(record(99))
    audit.flush()
    assert [r["seq"] for r in parsed(tmp_path / "audit.log")] == [99]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("writing again; 15 lines were dropped" in m for m in infos), infos
    assert audit.status()["failing"] is False
    audit.close()


def test_metrics_count_audit_write_errors() -> None:
    audit = AuditLog.to_file("/dev/full")
    metrics = Metrics()
    metrics.watch_audit(audit)
    audit.write(RECORD)
    audit.write(RECORD)
    audit.flush()
    text = metrics.render().decode()
    assert "gateway_audit_write_errors_total 1.0" in text
    assert "gateway_audit_dropped_lines_total 2.0" in text
    audit.close()


def test_a_full_tmpfs_drops_lines_whole_and_writing_resumes(tiny_disk: Path) -> None:
    path = tiny_disk / "audit.log"
    audit = AuditLog.to_file(str(path))
    filler = fill(tiny_disk)
    filler.write_bytes(filler.read_bytes()[: -12 * 1024])  # leave ~12 KiB free
    seq = 0
    while audit.write_errors == 0 and seq < 100_000:  # until the disk is full
        audit.write(record(seq))
        seq += 1
    assert audit.write_errors >= 1
    written = parsed(path)  # whole lines only: the partial one was cut off
    assert written and audit.dropped_lines > 0
    assert len(written) + audit.dropped_lines == seq
    for _ in range(3):
        audit.write(record(seq))
        audit.flush()
        seq += 1
    filler.unlink()  # space returns
    audit.write(record(seq))
    audit.flush()
    lines = parsed(path)
    assert lines[-1]["seq"] == seq
    assert len(lines) + audit.dropped_lines == seq + 1
    audit.close()


def test_a_fragment_that_cannot_be_cut_is_ended_before_the_next_line() -> None:
    # A pipe cannot be truncated: a partial write leaves a fragment, the next write must then
    # begin with a newline so that the lines after it are whole.
    r, w = os.pipe()
    audit = AuditLog.to_file(f"/proc/self/fd/{w}")
    fd = audit.fileno()
    assert fd is not None
    os.set_blocking(fd, False)
    seq = 0
    while audit.write_errors == 0:
        audit.write(record(seq))
        seq += 1
    got = b""
    os.set_blocking(r, False)
    while True:
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            break
        got += chunk
    audit.write(record(1000))
    audit.flush()
    got += os.read(r, 1 << 16)
    lines = got.split(b"\n")
    assert lines[-1] == b""
    bad = [i for i, line in enumerate(lines[:-1]) if not _is_json(line)]
    assert len(bad) == 1  # the one fragment, alone on its line
    assert json.loads(lines[-2])["seq"] == 1000
    audit.close()
    os.close(w)
    os.close(r)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


async def test_the_periodic_flush_outlives_errors_and_resumes(tmp_path: Path) -> None:
    audit = AuditLog.to_file("/dev/full")
    task = asyncio.create_task(audit.flush_every(0.01))
    audit.write(record(1))
    for _ in range(200):
        if audit.write_errors:
            break
        await asyncio.sleep(0.01)
    assert audit.write_errors >= 1 and not task.done()
    good = os.open(tmp_path / "audit.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    fd = audit.fileno()
    assert fd is not None
    os.dup2(good, fd)
    os.close(good)
    audit.write(record(2))
    for _ in range(200):
        if (tmp_path / "audit.log").stat().st_size:
            break
        await asyncio.sleep(0.01)
    assert [r["seq"] for r in parsed(tmp_path / "audit.log")] == [2]
    task.cancel()
    audit.close()


def test_close_on_a_full_disk_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog.to_file("/dev/full")
    audit.write(RECORD)
    audit.close()
    assert "closed while failing" in caplog.text
    audit.write(RECORD)  # after close: ignored, not an error
    audit.close()


def test_a_closed_stream_does_not_fail_the_writer() -> None:
    buf = io.StringIO()
    audit = AuditLog(buf)
    buf.close()
    audit.write(RECORD)
    assert audit.write_errors == 1 and audit.dropped_lines == 1
