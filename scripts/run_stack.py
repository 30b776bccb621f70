"""`make run`: start the inventory backend and the gateway, stop both on Ctrl-C.

The backend listens on 127.0.0.1:8081 with data/inventory.db; the gateway on 127.0.0.1:8080
with the shipped rbac.yaml. Ports, policy and database follow the usual environment variables
(INVENTORY_PORT, INVENTORY_DB, GATEWAY_PORT, GATEWAY_POLICY, ...).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def wait_healthy(url: str, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)  # polling interval while waiting for a health endpoint
    return False


def main() -> int:
    backend_port = os.environ.get("INVENTORY_PORT", "8081")
    gateway_port = os.environ.get("GATEWAY_PORT", "8080")
    env = dict(os.environ)
    env.setdefault("INVENTORY_DB", "data/inventory.db")
    env.setdefault("GATEWAY_UPSTREAM", f"http://127.0.0.1:{backend_port}")
    procs: list[subprocess.Popen[bytes]] = []
    # Ctrl-C reaches the whole process group; the children stop themselves cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        services = [
            (
                ["-m", "inventory_backend", "--port", backend_port],
                f"http://127.0.0.1:{backend_port}/healthz",
                "the inventory backend",
            ),
            (
                ["-m", "gateway", "serve", "--port", gateway_port],
                f"http://127.0.0.1:{gateway_port}/-/healthz",
                "the gateway",
            ),
        ]
        for args, health, name in services:
            proc = subprocess.Popen([sys.executable, *args], env=env, preexec_fn=_default_sigint)
            procs.append(proc)
            if not wait_healthy(health, proc, time.monotonic() + 20):
                print(f"run: {name} did not start (see its messages above)", file=sys.stderr)
                return 1
        print(
            f"\nrbac-gateway on http://127.0.0.1:{gateway_port} -> inventory backend on "
            f"http://127.0.0.1:{backend_port}. Ctrl-C stops both.\n"
            f"  curl -u sales:imsales 'http://127.0.0.1:{gateway_port}/api/inventory"
            "?name=X-Men+1+(1991)'\n",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: _stop(procs))
        signal.signal(signal.SIGINT, lambda *_: _stop(procs))
        while all(p.poll() is None for p in procs):
            try:
                procs[0].wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        return 0 if all(p.returncode in (0, None) for p in procs) else 1
    finally:
        _stop(procs)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
