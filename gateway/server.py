"""Running the gateway: one process, or a supervisor with ``--workers N`` processes.

Each worker is a whole gateway (its own policy store, credential cache, throttle and upstream
pool); workers share the listening port through SO_REUSEPORT. The supervisor forwards SIGHUP to
every worker (each reloads from the file) and stops them on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
from typing import Callable

from aiohttp import web

from .app import WORKER_ENV, create_app
from .errors import PolicyError
from .fastserver import FastRunner
from .protocol import GatewayRunner
from .settings import Settings
from .policy import PolicyStore

log = logging.getLogger("gateway")

SHUTDOWN_TIMEOUT = 10.0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def serve(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; exit status 0 on a clean stop, 1 if the policy is refused."""
    configure_logging(settings.log_level)
    try:
        store = PolicyStore.open(settings.policy)
    except PolicyError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"gateway: policy {settings.policy} refused; not starting", file=sys.stderr)
        return 1
    ssl_ctx = None
    if settings.tls_cert:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"gateway: cannot load TLS certificate/key: {exc}", file=sys.stderr)
            return 1
    if settings.workers > 1 and WORKER_ENV not in os.environ:
        return supervise(settings)
    try:
        _run(_main(settings, store, ssl_ctx))
    except OSError as exc:
        print(f"gateway: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


def _run(coro: "asyncio.Future[None] | object") -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (the `fast` extra); plain asyncio works too
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


async def _main(settings: Settings, store: PolicyStore, ssl_ctx: ssl.SSLContext | None) -> None:
    app = create_app(settings, store=store)
    runner_class = FastRunner if settings.server == "fast" else GatewayRunner
    runner = runner_class(app, access_log=None, handle_signals=False,
                          shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = WORKER_ENV in os.environ
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_ctx,
                       reuse_port=worker, backlog=1024)
    try:
        await site.start()
        scheme = "https" if ssl_ctx else "http"
        host, port = _bound(runner)
        # One line whatever the log level: scripts and tests read the port from it.
        print(f"gateway listening on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
        log.info("upstream %s, policy %s, pid %d", settings.upstream, settings.policy,
                 os.getpid())
        await stop.wait()
        log.info("gateway stopping")
    finally:
        await runner.cleanup()


def _bound(runner: web.BaseRunner) -> tuple[str, int]:
    for addr in runner.addresses:
        return str(addr[0]), int(addr[1])
    return "?", 0


def supervise(settings: Settings) -> int:
    """Start ``settings.workers`` worker processes on one port and look after them."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((settings.host, settings.port))
    except OSError as exc:
        print(f"gateway: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    port = holder.getsockname()[1]   # held (not listening) so port 0 resolves once for all
    argv = [a for a in sys.argv[1:]]
    env = dict(os.environ, **{WORKER_ENV: str(os.getpid()), "GATEWAY_PORT": str(port),
                              "GATEWAY_WORKERS": "1"})
    cmd = [sys.executable, "-m", "gateway", *_without_port(argv)]
    procs = [subprocess.Popen(cmd, env=env) for _ in range(settings.workers)]
    log.info("gateway supervisor %d: %d workers on %s:%d", os.getpid(), len(procs),
             settings.host, port)

    def forward(sig: int) -> Callable[[int, object], None]:
        def handler(_s: int, _f: object) -> None:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(sig)
        return handler

    signal.signal(signal.SIGHUP, forward(signal.SIGHUP))
    stopping = {"yes": False}

    def stop(_s: int, _f: object) -> None:
        stopping["yes"] = True
        forward(signal.SIGTERM)(_s, _f)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    status = 0
    for p in procs:
        while True:
            try:
                code = p.wait()
                break
            except InterruptedError:
                continue
        if code != 0 and not stopping["yes"]:
            status = code
            stop(signal.SIGTERM, None)
    holder.close()
    return status


def _without_port(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--port", "--workers"):
            skip = True
            continue
        if a.startswith(("--port=", "--workers=")):
            continue
        out.append(a)
    return out
