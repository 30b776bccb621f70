"""Real nginx and Caddy processes for the decision-mode tests, from the shipped configs.

The configs in ``deploy/`` are used as they are, with only their three addresses replaced
(the gateway, the upstream, the listener), so the tests test what operators copy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import ROOT, wait_until

NGINX = Path("/usr/sbin/nginx")
CADDY = Path("/usr/bin/caddy")
BINARIES = {"nginx": NGINX, "caddy": CADDY}
NGINX_SITE = ROOT / "deploy" / "nginx" / "rbac-gateway.conf"
CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile"


def _installing() -> bool:
    """True while an apt/dpkg run is in progress on this machine (it may bring the binary)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("apt", "apt-get", "dpkg", "aptitude"):
                return True
        except OSError:
            continue
    return False


def available(kind: str, timeout: float = 300.0) -> bool:
    """Whether the ``kind`` binary is installed; waits (polling, with a deadline) while a
    package install that may bring it is running."""
    path = BINARIES[kind]
    deadline = time.monotonic() + timeout
    while True:
        if path.exists() and os.access(path, os.X_OK):
            return True
        if time.monotonic() > deadline or not _installing():
            return False
        time.sleep(1.0)  # polling for a package install to finish, with a deadline


def free_port() -> int:
    """A port that was free a moment ago (nginx and Caddy need one in their config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hostport(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def _replace_once(text: str, old: str, new: str, source: Path) -> str:
    assert text.count(old) == 1, f"{source}: expected {old!r} exactly once"
    return text.replace(old, new)


@dataclass
class FrontProxy:
    """A running nginx or Caddy in front of ``upstream``, asking ``gateway``."""

    kind: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, kind: str, tmp: Path, gateway: str, upstream: str) -> FrontProxy:
        tmp.mkdir(parents=True, exist_ok=True)
        port = free_port()
        gw, up = _hostport(gateway), _hostport(upstream)
        log = tmp / f"{kind}.out"
        if kind == "nginx":
            site = NGINX_SITE.read_text()
            site = _replace_once(site, "server 127.0.0.1:9000;", f"server {gw};", NGINX_SITE)
            site = _replace_once(site, "server 127.0.0.1:8081;", f"server {up};", NGINX_SITE)
            site = _replace_once(
                site, "listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};", NGINX_SITE
            )
            (tmp / "site.conf").write_text(site)
            (tmp / "logs").mkdir(exist_ok=True)
            temp = " ".join(
                f"{k}_temp_path {tmp / k};"
                for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            (tmp / "nginx.conf").write_text(
                f"pid {tmp / 'nginx.pid'};\nerror_log {tmp / 'logs' / 'error.log'} info;\n"
                f"events {{ worker_connections 1024; }}\n"
                f"http {{\n  access_log {tmp / 'logs' / 'access.log'};\n  {temp}\n"
                f"  include {tmp / 'site.conf'};\n}}\n"
            )
            args = [
                str(NGINX),
                "-p",
                str(tmp),
                "-c",
                str(tmp / "nginx.conf"),
                "-g",
                "daemon off; worker_processes 1;",
            ]
            env = dict(os.environ)
        else:
            conf = CADDYFILE.read_text()
            conf = _replace_once(
                conf, "forward_auth 127.0.0.1:9000", f"forward_auth {gw}", CADDYFILE
            )
            conf = _replace_once(
                conf, "reverse_proxy 127.0.0.1:8081", f"reverse_proxy {up}", CADDYFILE
            )
            conf = _replace_once(
                conf, "http://127.0.0.1:8080 {", f"http://127.0.0.1:{port} {{", CADDYFILE
            )
            (tmp / "Caddyfile").write_text(conf)
            args = [str(CADDY), "run", "--config", str(tmp / "Caddyfile"), "--adapter", "caddyfile"]
            env = {
                **os.environ,
                "HOME": str(tmp),
                "XDG_DATA_HOME": str(tmp / "data"),
                "XDG_CONFIG_HOME": str(tmp / "config"),
            }
        with open(log, "wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        front = cls(kind, f"http://127.0.0.1:{port}", proc, log)
        front.wait_listening(port)
        return front

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited {self.proc.returncode}:\n"
                    f"{self.log.read_text(errors='replace')}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        try:
            wait_until(listening, timeout, 0.05)
        except AssertionError:
            self.stop()
            raise TimeoutError(f"{self.kind} did not listen on {port}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
