"""Running one gateway process: limits, listener, signals, graceful shutdown.

``serve(settings)`` runs until SIGINT/SIGTERM. With ``--workers N`` (N > 1) it hands over to
:mod:`gateway.supervisor`, which runs N of these processes and looks after them.

At start the soft open-file limit is raised to the hard one and the connection cap is derived
from it (leaving room for the upstream pool and files), so a flood of idle or slow connections
meets the cap — where the longest-waiting one is dropped — and never ``EMFILE``.
On SIGTERM: stop accepting, answer requests in flight with ``Connection: close`` for up to
``--shutdown-grace`` seconds, then cut the rest (each still gets its audit line) and say how many.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .errors import PolicyError
from .gateway import Gateway
from .http.server import Limits
from .memory import keep_freed_memory, settle
from .policy import PolicyStore
from .settings import Settings, SettingsError, tls_context
from .supervisor import WORKER_ENV, check_port, supervise, watch_parent
from .throttle import THROTTLE_FD_ENV, THROTTLE_KEY_ENV, SharedThrottle

log = logging.getLogger("gateway")

_FD_RESERVE = 64  # descriptors kept for files, the listener, DNS, bcrypt threads


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """The client connection cap: the flag, or what the descriptors allow."""
    room = max(16, fd_limit - settings.pool_size - _FD_RESERVE)
    if settings.max_connections:
        return min(settings.max_connections, room)
    return min(room, 100_000)


def limits_of(settings: Settings, fd_limit: int) -> Limits:
    return Limits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        body_timeout=settings.body_timeout,
        min_rate=settings.min_upload_rate,
        send_timeout=settings.upstream_timeout,
        max_connections=connection_cap(settings, fd_limit),
    )


def serve(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; exit status 0 on a clean stop, 1 when it cannot start."""
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
        try:
            ssl_ctx = tls_context(settings.tls_cert, settings.tls_key or "")
        except SettingsError as exc:
            print(f"gateway: --tls-cert: {exc}", file=sys.stderr)
            return 1
    if not is_worker():
        refusal = check_port(settings)
        if refusal:
            print(refusal, file=sys.stderr)
            return 1
        if settings.workers > 1:
            # the supervisor outwaits the workers' own drain before it kills them
            return supervise(settings, grace=settings.shutdown_grace + 5)
    log.debug("%s", keep_freed_memory())
    try:
        audit_open = Gateway.open_audit(settings)
    except OSError as exc:
        print(f"gateway: --audit-log {settings.audit_log}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        run(_main(settings, store, ssl_ctx, audit_open))
    except _ListenError as exc:
        print(f"gateway: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def shared_throttle() -> SharedThrottle | None:
    """In a worker: its link to the supervisor's failed-login throttle; None elsewhere."""
    fd = os.environ.get(THROTTLE_FD_ENV)
    if not fd or not is_worker():
        return None
    try:
        key = bytes.fromhex(os.environ.get(THROTTLE_KEY_ENV, ""))
        return SharedThrottle(socket.socket(fileno=int(fd)), key)
    except (OSError, ValueError) as exc:  # not ours to fix here: throttle on our own
        log.warning("no link to the shared login throttle (%s): throttling alone", exc)
        return None


def is_worker() -> bool:
    """True in a process started by the supervisor."""
    return bool(os.environ.get(WORKER_ENV))


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop."""
    import uvloop

    uvloop.run(coro)


class _ListenError(Exception):
    pass


async def _main(
    settings: Settings, store: PolicyStore, ssl_ctx: ssl.SSLContext | None, audit: Any
) -> None:
    fd_limit = raise_fd_limit()
    gw = Gateway(settings, store=store, audit=audit, throttle=shared_throttle())
    await gw.start()
    limits = limits_of(settings, fd_limit)
    server = gw.make_server(limits)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _join_supervisor(gw, loop, stop.set)
    try:
        try:
            host, port = await server.listen(
                settings.host,
                settings.port,
                ssl=ssl_ctx,
                reuse_port=is_worker() or settings.reuse_port,
            )
        except OSError as exc:
            raise _ListenError(exc.strerror or str(exc)) from None
        scheme = "https" if ssl_ctx else "http"
        # One line whatever the log level: scripts and tests read the port from it.
        print(f"gateway listening on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
        log.info(
            "upstream %s, policy %s, pid %d, up to %d connections",
            settings.upstream,
            settings.policy,
            os.getpid(),
            limits.max_connections,
        )
        if not await gw.probe_upstream():
            log.warning(
                "upstream %s does not answer %s yet; /-/ready says 503 until it does",
                settings.upstream,
                settings.upstream_health,
            )
        # everything built so far lives as long as the process: spare it every full collection
        log.debug("%d objects exempt from the cyclic collector", settle())
        await stop.wait()
        busy = server.busy()
        log.info(
            "gateway stopping: %d requests in flight, up to %gs to finish",
            busy,
            settings.shutdown_grace,
        )
        cut = await server.shutdown(settings.shutdown_grace)
        if cut:
            log.warning(
                "shutdown cut %d requests still in flight after %gs", cut, settings.shutdown_grace
            )
    finally:
        await gw.close()


def _join_supervisor(
    gw: Gateway, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]
) -> None:
    """In a worker: API reloads tell the supervisor (which tells every worker), and the
    worker stops when its supervisor is gone."""
    supervisor = os.environ.get(WORKER_ENV)
    if not supervisor:
        return
    pid = int(supervisor)

    def tell_supervisor() -> None:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError:
            pass

    gw.on_api_reload = tell_supervisor
    watch_parent(loop, stop)
