"""Integration fixtures: real processes on ephemeral ports, or an existing stack (GATEWAY_URL).

Local mode (default): a real ``python -m inventory_backend`` on a temp SQLite file and a real
``python -m gateway serve`` with a copy of the shipped rbac.yaml, both on 127.0.0.1 port 0.
Compose mode: ``GATEWAY_URL`` points at a running gateway (e.g. the docker-compose stack); the
same tests then run against it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import SHIPPED_POLICY, Process


@dataclass
class Stack:
    gateway_url: str
    backend_url: str | None = None  # None: not reachable from the tests (compose)
    policy_path: Path | None = None  # the policy file the gateway reads, when local
    gateway: Process | None = None
    backend: Process | None = None

    @property
    def local(self) -> bool:
        return self.gateway is not None


def start_backend(tmp: Path) -> Process:
    p = Process(
        ["-m", "inventory_backend", "--port", "0", "--db", str(tmp / "inv.db")], tmp / "backend.log"
    )
    p.wait_listening()
    p.wait_healthy("/healthz")
    return p


def start_gateway(
    tmp: Path, upstream: str, policy: Path, *extra: str, env: dict[str, str] | None = None
) -> Process:
    p = Process(
        [
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--upstream",
            upstream,
            "--policy",
            str(policy),
            "--audit-log",
            str(tmp / "audit.log"),
            *extra,
        ],
        tmp / "gateway.log",
        env=env,
    )
    p.wait_listening()
    p.wait_healthy("/-/healthz")
    return p


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url = os.environ.get("GATEWAY_URL")
    if url:
        yield Stack(gateway_url=url.rstrip("/"))
        return
    tmp = tmp_path_factory.mktemp("stack")
    policy = tmp / "policy" / "rbac.yaml"
    policy.parent.mkdir()
    shutil.copy(SHIPPED_POLICY, policy)
    backend = start_backend(tmp)
    try:
        gateway = start_gateway(tmp, backend.url, policy)
    except BaseException:
        backend.stop()
        raise
    try:
        yield Stack(gateway.url, backend.url, policy, gateway, backend)
    finally:
        gw_rc = gateway.stop()
        be_rc = backend.stop()
        assert "Traceback" not in gateway.output(), gateway.output()
        assert gw_rc == 0 and be_rc == 0, (gw_rc, be_rc)
