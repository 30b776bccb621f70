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
import ssl
import sys

from aiohttp import web

from .app import WORKER_ENV, create_app
from .errors import PolicyError
from .fastserver import FastRunner
from .protocol import GatewayRunner
from .settings import Settings
from .store import PolicyStore
from .supervisor import supervise

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
