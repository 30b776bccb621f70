"""Adversarial review, process level: the real gateway process in front of the real backend."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from tests.helpers import SHIPPED_POLICY, basic
from tests.integration.conftest import start_backend, start_gateway


def _half_closed_get(port: int, auth: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            f"GET /api/inventory HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        s.shutdown(socket.SHUT_WR)  # what `printf ... | nc -N` does
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    return out


def test_half_closing_client_gets_its_answer_and_no_traceback_is_logged(tmp_path: Path) -> None:
    """Finding 7 against real processes: the half-closing client gets 0 bytes, and the
    gateway log shows 'Task exception was never retrieved' tracebacks from
    Connection._serve's unguarded flow.drain()."""
    policy = tmp_path / "rbac.yaml"
    shutil.copy(SHIPPED_POLICY, policy)
    backend = start_backend(tmp_path)
    try:
        gateway = start_gateway(tmp_path, backend.url, policy)
        try:
            port = int(gateway.url.rsplit(":", 1)[1])
            auth = basic("sales", "imsales")["Authorization"]
            answers = [_half_closed_get(port, auth) for _ in range(5)]
        finally:
            gateway.stop()
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), [a[:40] for a in answers]
        assert "Traceback" not in gateway.output(), gateway.output()[-2000:]
    finally:
        backend.stop()
