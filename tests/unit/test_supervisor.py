"""The supervisor's pieces that need no worker processes: settings hand-over, the port probe,
the worker's watch on its supervisor's pipe."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import supervisor
from gateway.settings import Settings, parse_settings


def test_settings_reach_the_worker_unchanged() -> None:
    s = dataclasses.replace(
        parse_settings(
            [
                "--policy",
                "/etc/gw/rbac.yaml",
                "--port",
                "0",
                "--workers",
                "3",
                "--trusted-proxy",
                "10.0.0.0/8,::1",
                "--audit-log",
                "off",
                "--no-watch",
                "--reuse-port",
                "--log-level",
                "debug",
            ]
        ),
        max_header_bytes=1234,
        cache_ttl=1.5,
    )
    back = supervisor.decode_settings(supervisor.encode_settings(s))
    assert back == s
    assert isinstance(back.policy, Path)
    assert back.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))


def test_every_settings_field_survives_the_hand_over() -> None:
    # A field of a type the encoding does not know would come back different: this catches it.
    s = Settings()
    assert supervisor.decode_settings(supervisor.encode_settings(s)) == s
    assert set(json.loads(supervisor.encode_settings(s))) == {
        f.name for f in dataclasses.fields(Settings)
    }


def _listener(reuse_port: bool) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_in_use_is_refused_even_by_a_reuse_port_listener(reuse_port: bool) -> None:
    with _listener(reuse_port) as held:
        port = held.getsockname()[1]
        message = supervisor.check_port(Settings(port=port))
        assert message == (
            f"gateway: 127.0.0.1:{port} is already in use (another gateway?); "
            "refusing to start (--reuse-port to share it on purpose)"
        )
        assert supervisor.check_port(Settings(port=port, reuse_port=True)) is None


def test_a_free_port_passes_the_probe_and_stays_free() -> None:
    with _listener(False) as held:
        port = held.getsockname()[1]
    assert supervisor.check_port(Settings(port=port)) is None
    assert supervisor.check_port(Settings(port=port)) is None  # the probe left nothing bound


async def test_a_worker_notices_its_supervisor_pipe_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r, w = os.pipe()
    monkeypatch.setenv(supervisor.PARENT_FD_ENV, str(r))
    gone = asyncio.Event()
    assert supervisor.watch_parent(asyncio.get_running_loop(), gone.set)
    await asyncio.sleep(0.05)
    assert not gone.is_set()
    os.close(w)  # what the kernel does when the supervisor dies
    await asyncio.wait_for(gone.wait(), 2)
    os.close(r)


async def test_watch_parent_is_a_no_op_outside_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(supervisor.PARENT_FD_ENV, raising=False)
    assert not supervisor.watch_parent(asyncio.get_running_loop(), lambda: None)
    monkeypatch.delenv(supervisor.WORKER_ENV, raising=False)
    assert supervisor.worker_status() is None
    assert supervisor.worker_settings() is None


def test_a_worker_whose_supervisor_is_already_gone_does_not_start() -> None:
    # Its parent (this test) is not the supervisor it was told about: the supervisor died
    # before PR_SET_PDEATHSIG was armed, so the worker must not serve on as an orphan.
    env = {
        **os.environ,
        supervisor.WORKER_ENV: "1",
        supervisor.SETTINGS_ENV: supervisor.encode_settings(Settings(port=0)),
    }
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert "supervisor gone before the worker started" in r.stderr
